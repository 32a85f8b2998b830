"""Transform and fold time on torchvision resnet50, next to torch.fx.symbolic_trace.

Everything is measured in one run, interleaved, and reported as medians and
as ratios to ``torch.fx.symbolic_trace`` (these machines are noisy: compare
ratios, not absolute times).

    python benchmarks/bench_transform.py [--repeats 5] [--out bench-results/transform.json]

What each column times:
  symbolic_trace  torch.fx.symbolic_trace(model)
  sntfx.trace     trace + output check against the model + shape propagation
  transform       sntfx.transform(model, x): trace + the `snt` expand pass
  fold            sntfx.fold(snt, x): the `fold` pass, including the per-block error measurement
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.fx
import torchvision

import sntfx


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", default="bench-results/transform.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    configs = [("linear", 4), ("linear", 2), ("branch", None), ("qa-branch", None)]
    times: dict[str, list[float]] = {"symbolic_trace": [], "sntfx.trace": []}
    for style, ratio in configs:
        times[f"transform {style}" + (f" x{ratio}" if ratio else "")] = []
        times[f"fold {style}" + (f" x{ratio}" if ratio else "")] = []
    for rep in range(args.repeats):
        times["symbolic_trace"].append(timed(lambda: torch.fx.symbolic_trace(model))[0])
        times["sntfx.trace"].append(timed(lambda: sntfx.trace(model, x))[0])
        for style, ratio in configs:
            key = style + (f" x{ratio}" if ratio else "")
            t, snt = timed(lambda: sntfx.transform(model, x, style=style, ratio=ratio))
            times[f"transform {key}"].append(t)
            t, _ = timed(lambda: sntfx.fold(snt, x, inplace=True))
            times[f"fold {key}"].append(t)
        print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
    base = statistics.median(times["symbolic_trace"])
    rows = {k: {"median_s": statistics.median(v), "ratio_to_symbolic_trace": statistics.median(v) / base, "runs": v}
            for k, v in times.items()}
    print(f"\n{args.model} at {args.size}x{args.size}, {args.repeats} repeats, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'step':<28}{'median':>12}{'x symbolic_trace':>20}")
    for k, r in rows.items():
        print(f"{k:<28}{r['median_s'] * 1000:>10.1f}ms{r['ratio_to_symbolic_trace']:>20.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "input": list(x.shape), "torch": torch.__version__,
                               "machine": platform.machine(), "threads": torch.get_num_threads(),
                               "results": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
