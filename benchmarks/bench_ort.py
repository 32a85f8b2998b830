"""ONNX Runtime latency: original vs SNT-folded (same graph), and int8 QDQ vs fp32.

torchvision resnet18 (random weights; latency does not depend on them) at
224x224, batch 1 by default. Three ONNX files are exported and verified:

* ``original``: the traced model;
* ``snt-folded``: the same model transformed (linear, r=2), folded back;
* ``int8``: what sntfx deploys: ``original`` quantized W8A8 by the ``quantize``
  pass (per-channel 8-bit weights, uint8 inputs of every conv/linear),
  calibrated on random inputs (latency only), exported as QDQ with the default
  weight container (``auto``: uint8 weights on an x86 CPU without VNNI, where
  ONNX Runtime's uint8 x int8 kernels can saturate; int8 elsewhere);
* ``int8-weights``: on such a CPU only, the same model with int8 weights, so
  that the run shows what exactness costs there;
* ``int8-ort-static``: for reference, ONNX Runtime's own static quantizer on
  the float file (it also quantizes the outputs of adds and pools, so more of
  the graph runs on integer kernels, but it is not what the sweeps measure).

All run interleaved, round by round, on one provider; the script prints
median latencies, the ratios folded/original (expected 1.00: the same
graph) and fp32/int8 (the int8 speed-up), and for each sntfx int8 file its
largest output error relative to the simulated model it was exported from.

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
from sntfx.exporters import export_onnx
from sntfx.exporters.ort_bench import _node_providers, resolve_providers
from sntfx.exporters.qdq import int8_kernels_may_saturate, integer_ops, resolve_weight_type
from sntfx.pass_base import PassContext
from sntfx.pass_manager import PassManager
from sntfx.passes import SimulatedQuantize


class RandomReader:
    def __init__(self, name, shape, n=16):
        rng = np.random.default_rng(0)
        self.batches = [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]
        self.it = iter(self.batches)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.batches)


def _ort_static(fp32: Path, out: Path, reader) -> None:
    """ONNX Runtime's static quantizer (QDQ, per-channel int8 weights, uint8 activations): the reference."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(fp32), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


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
        calibration = [torch.from_numpy(b[name]) for b in RandomReader(name, tuple(x.shape)).batches]
        quantized = PassManager([SimulatedQuantize(wbits=8, abits=8)]).run(
            original, PassContext(calibration=calibration), inplace=False).graph_module
        containers = {"int8": "auto"}
        if resolve_weight_type("auto") != "int8":  # a CPU where exactness costs int8 weights: measure both
            containers["int8-weights"] = "int8"
        for key, container in containers.items():
            export_onnx(quantized, tmp / f"{key}.onnx", x, quantized_min_top1=0.0, weight_type=container)
        _ort_static(tmp / "original.onnx", tmp / "int8-ort-static.onnx", RandomReader(name, tuple(x.shape)))
        providers = resolve_providers(args.provider)
        sessions, placement = {}, {}
        feed = {name: x.numpy()}
        keys = ("original", "snt-folded", *containers, "int8-ort-static")
        integer = {k: integer_ops(tmp / f"{k}.onnx") for k in keys[2:]}
        for key in keys:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            sessions[key] = ort.InferenceSession(str(tmp / f"{key}.onnx"), sess_options=opts, providers=providers)
            placement[key] = {"session": sessions[key].get_providers()[0],
                              "nodes": _node_providers(tmp / f"{key}.onnx", providers, feed)}
            for _ in range(10):
                sessions[key].run(None, feed)
        with torch.no_grad():
            simulated = quantized(x).numpy()
        # each sntfx int8 file's largest output error, relative to the simulated model's largest output
        error = {k: float(np.abs(sessions[k].run(None, feed)[0] - simulated).max() / np.abs(simulated).max())
                 for k in containers}
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
        print(f"  {k:<15} p50 {med[k]:8.2f} ms   ran on {placement[k]['session']}  nodes {placement[k]['nodes']}")
    ratio_fold = med["snt-folded"] / med["original"]
    speedups = {k: med["original"] / med[k] for k in containers}
    speedup_static = med["original"] / med["int8-ort-static"]
    print(f"  snt-folded / original = {ratio_fold:.3f}   (same graph: expected 1.00 +- 0.05)")
    for k, container in containers.items():
        print(f"  fp32 / {k} speed-up = {speedups[k]:.2f}x  (sntfx W8A8 QDQ, {resolve_weight_type(container)} weights; "
              f"output error vs the simulated model {error[k]:.1e}; integer ops {integer[k]})")
    print(f"  fp32 / ORT static int8 = {speedup_static:.2f}x  (reference; integer ops {integer['int8-ort-static']})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "batch": args.batch, "size": args.size, "provider": args.provider,
                               "onnxruntime": ort.__version__, "machine": platform.machine(), "median_ms": med,
                               "int8_kernels_may_saturate": int8_kernels_may_saturate(),
                               "weight_types": {k: resolve_weight_type(c) for k, c in containers.items()},
                               "ratio_folded_to_original": ratio_fold, "int8_speedup": speedups["int8"],
                               "int8_speedups": speedups, "relative_error_vs_simulated": error,
                               "ort_static_int8_speedup": speedup_static, "integer_ops": integer,
                               "placement": placement}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
