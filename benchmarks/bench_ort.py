"""ONNX Runtime latency: original vs SNT-folded (same graph), and int8 QDQ vs fp32.

torchvision resnet18 (random weights; latency does not depend on them) at
224x224, batch 1 by default. Three ONNX files are exported and verified:

* ``original``: the traced model;
* ``snt-folded``: the same model transformed (linear, r=2), folded back;
* ``int8``: ``original`` quantized statically in QDQ format (per-channel int8
  weights, uint8 activations), calibrated on random inputs (latency only).

All three run interleaved, round by round, on one provider; the script prints
median latencies and the ratios folded/original (expected 1.00: the same
graph) and fp32/int8 (the int8 speed-up).

    python benchmarks/bench_ort.py [--provider cpu|cuda|tensorrt] [--batch 1] [--rounds 7] [--iters 30]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision

import sntfx
from sntfx.exporters import export_onnx, quantize_int8
from sntfx.exporters.ort_bench import _node_providers, resolve_providers


class RandomReader:
    def __init__(self, name, shape, n=16):
        rng = np.random.default_rng(0)
        self.batches = [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]
        self.it = iter(self.batches)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", default="bench-results/ort.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        original = sntfx.trace(model, x)
        folded = sntfx.fold(sntfx.transform(original, x, style="linear", ratio=2), x)
        export_onnx(original, tmp / "original.onnx", x)
        export_onnx(folded, tmp / "snt-folded.onnx", x)
        name = ort.InferenceSession(str(tmp / "original.onnx"), providers=["CPUExecutionProvider"]).get_inputs()[0].name
        quantize_int8(tmp / "original.onnx", tmp / "int8.onnx", RandomReader(name, tuple(x.shape)))
        providers = resolve_providers(args.provider)
        sessions, placement = {}, {}
        feed = {name: x.numpy()}
        for key in ("original", "snt-folded", "int8"):
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            sessions[key] = ort.InferenceSession(str(tmp / f"{key}.onnx"), sess_options=opts, providers=providers)
            placement[key] = {"session": sessions[key].get_providers()[0],
                              "nodes": _node_providers(tmp / f"{key}.onnx", providers, feed)}
            for _ in range(10):
                sessions[key].run(None, feed)
        times = {k: [] for k in sessions}
        for r in range(args.rounds):
            for key, sess in sessions.items():
                for _ in range(args.iters):
                    t0 = time.perf_counter()
                    sess.run(None, feed)
                    times[key].append((time.perf_counter() - t0) * 1000)
            print(f"round {r + 1}/{args.rounds}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{args.model} {args.size}x{args.size} batch {args.batch}, ONNX Runtime {ort.__version__}, "
          f"provider asked: {args.provider}")
    for k in med:
        print(f"  {k:<12} p50 {med[k]:8.2f} ms   ran on {placement[k]['session']}  nodes {placement[k]['nodes']}")
    ratio_fold = med["snt-folded"] / med["original"]
    speedup = med["original"] / med["int8"]
    print(f"  snt-folded / original = {ratio_fold:.3f}   (same graph: expected 1.00 +- 0.05)")
    print(f"  fp32 / int8 speed-up  = {speedup:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "batch": args.batch, "size": args.size, "provider": args.provider,
                               "onnxruntime": ort.__version__, "machine": platform.machine(), "median_ms": med,
                               "ratio_folded_to_original": ratio_fold, "int8_speedup": speedup,
                               "placement": placement}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
