"""Median ms per training step: Adam, SAM, and SNT (explicit and online fold), as ratios to Adam.

CIFAR-style ResNet-20 at batch 128 on 32x32 inputs (random data: the step
cost does not depend on the values). All variants are measured in one run,
interleaved round by round, so that machine noise hits them alike.

    python benchmarks/bench_train_step.py [--steps 20] [--rounds 5] [--batch 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sntfx
from sntfx.sam import SAM
from sntfx.train import set_online_fold


def make_variants(device, batch):
    x = torch.randn(2, 3, 32, 32)
    base = sntfx.build_model("sntfx:resnet20")
    variants = {}
    for name in ("adam", "sam (2 passes)", "snt linear x4 explicit", "snt linear x4 online fold",
                 "snt branch"):
        if name.startswith("snt linear"):
            model = sntfx.transform(base, x, style="linear", ratio=4)
            set_online_fold(model, name.endswith("online fold"))
        elif name == "snt branch":
            model = sntfx.transform(base, x, style="branch")
        else:
            model = sntfx.trace(base, x)
        model.to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        if name.startswith("sam"):
            opt = SAM(model.parameters(), opt)
        variants[name] = (model, opt)
    return variants


def step(model, opt, x, y):
    if isinstance(opt, SAM):
        opt.step(model, lambda: F.cross_entropy(model(x), y))
    else:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench-results/train_step.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    variants = make_variants(device, args.batch)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for model, opt in variants.values():  # warm-up
        for _ in range(2):
            step(model, opt, x, y)
    for r in range(args.rounds):
        for name, (model, opt) in variants.items():
            for _ in range(args.steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step(model, opt, x, y)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t0) * 1000)
        print(f"round {r + 1}/{args.rounds}", flush=True)
    base = statistics.median(times["adam"])
    print(f"\nResNet-20, batch {args.batch}, 32x32, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'variant':<30}{'median ms/step':>16}{'x Adam':>10}")
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {"median_ms": med, "ratio_to_adam": med / base, "steps": len(ts)}
        print(f"{name:<30}{med:>16.1f}{med / base:>10.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(device), "batch": args.batch, "torch": torch.__version__,
                               "machine": platform.machine(), "results": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
