"""Benchmark ONNX models on ONNX Runtime: latency, throughput, accuracy, size, and where nodes ran.

``bench_onnx(path, provider="auto", batch_sizes=(1, 8, 32))`` creates a session
with the requested execution provider (TensorRT, CUDA or CPU; ``auto`` takes
the best available), warms up, then times ``iters`` runs per batch size and
reports p50/p90/p99 latency and throughput (I/O binding on CUDA). It reports
the provider that actually ran the session and, from ONNX Runtime's profiler,
how many nodes each provider executed: asking for a GPU provider and getting
the CPU (whole session or some nodes, e.g. int8 convolutions, which have no
CUDA kernels) is flagged with ``fallback`` and a warning.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .onnx_export import ExportError, ort_session

__all__ = ["BenchResult", "bench_onnx", "resolve_providers", "PROVIDERS", "onnx_accuracy", "check_onnx_model",
           "gpu_present"]

log = logging.getLogger(__name__)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


@dataclass
class BenchResult:
    path: str
    requested: str
    provider: str  # the provider that ran the session (first in the session's list)
    session_providers: list[str]
    node_providers: dict[str, int]  # nodes executed per provider (from the profiler)
    fallback: bool
    warnings: list[str]
    size_bytes: int
    latency: dict[str, dict[str, float]] = field(default_factory=dict)  # batch -> p50/p90/p99 ms, throughput
    accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_PRELOADED = False


def _preload_gpu_libraries() -> None:
    """Let ONNX Runtime find the CUDA/cuDNN libraries that torch's CUDA wheels installed."""
    global _PRELOADED
    import onnxruntime as ort

    if _PRELOADED or not hasattr(ort, "preload_dlls"):
        return
    _PRELOADED = True
    try:
        import torch  # noqa: F401  (loads the nvidia-* libraries first, when present)

        ort.preload_dlls()
    except Exception as exc:  # noqa: BLE001 - without a GPU this fails; the session falls back and says so
        log.debug("onnxruntime.preload_dlls() failed: %s", exc)


def gpu_present() -> bool:
    """Whether this machine has a CUDA device (torch's view; ONNX Runtime's GPU build lists its GPU providers
    whether or not there is one)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no usable torch CUDA: no GPU as far as we can tell
        return False


def tensorrt_present() -> bool:
    """Whether TensorRT's runtime can be found (without it, the TensorRT provider fails to load, noisily)."""
    import ctypes.util
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None or ctypes.util.find_library("nvinfer") is not None


def resolve_providers(provider: str) -> list[str]:
    """Provider list for a session: the requested one first, the CPU as the last resort.

    ``auto`` means the hardware present: TensorRT (when its runtime is
    installed) and CUDA on a machine with a CUDA device, the CPU otherwise;
    nothing that cannot run here is tried.
    """
    import onnxruntime as ort

    if provider == "auto" and not gpu_present():
        return [PROVIDERS["cpu"]]
    if provider in ("auto", "cuda", "tensorrt"):
        _preload_gpu_libraries()
    available = ort.get_available_providers()
    if provider == "auto":
        wanted = [PROVIDERS["tensorrt"]] if tensorrt_present() else []
        chosen = [p for p in (*wanted, PROVIDERS["cuda"]) if p in available]
    elif provider in PROVIDERS:
        chosen = [PROVIDERS[provider]] if provider != "cpu" else []
    else:
        raise ValueError(f"unknown provider '{provider}'; use auto, tensorrt, cuda or cpu")
    return chosen + [PROVIDERS["cpu"]]


def check_onnx_model(path: str | Path, image_shape: tuple[int, ...] | None = None) -> None:
    """Raise :class:`ExportError` unless ONNX Runtime can load ``path`` (on the CPU) and, given ``image_shape``
    (one image, without the batch), the model takes batches of such images as its one input."""
    sess = ort_session(path, [PROVIDERS["cpu"]])
    if image_shape is None:
        return
    inp = _one_image_input(path, sess.get_inputs())
    fixed = [d if isinstance(d, int) else None for d in inp.shape[1:]]
    if len(fixed) != len(image_shape) or any(d is not None and d != s for d, s in zip(fixed, image_shape)):
        raise ExportError(f"'{path}' does not take this dataset's images: the model expects {inp.shape}, the images "
                          f"are {list(image_shape)} (without the batch); measure it on the dataset it was exported for")


def _one_image_input(path, inputs):
    if len(inputs) != 1:
        raise ExportError(f"'{path}' takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}), but a dataset "
                          "gives one image batch: accuracy on a dataset needs a model of one input (benchmark it "
                          "without --data)")
    return inputs[0]


def _input_shape(meta, batch: int) -> list[int]:
    return [batch if i == 0 and not isinstance(d, int) else (d if isinstance(d, int) else 1)
            for i, d in enumerate(meta.shape)]


#: numpy types of the ONNX input element types a benchmark feeds (others are fed as float32)
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
             "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def _feeds(inputs, batch: int, rng) -> dict[str, np.ndarray]:
    """Random values for every input of a session (normal floats, 0/1 integers), batch ``batch``."""
    feeds = {}
    for meta in inputs:
        dtype = _NP_TYPES.get(meta.type, np.float32)
        shape = _input_shape(meta, batch)
        feeds[meta.name] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                            else rng.integers(0, 2, shape).astype(dtype))
    return feeds


def _fixed_batch(meta) -> int | None:
    return meta.shape[0] if meta.shape and isinstance(meta.shape[0], int) else None


def _node_providers(path, providers, feeds) -> dict[str, int]:
    """Run once with profiling on and count executed nodes per provider."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = ort_session(path, providers, profile_prefix=str(Path(tmp) / "prof"))
        sess.run(None, feeds)
        trace = sess.end_profiling()
        events = json.loads(Path(trace).read_text())
    counts: Counter = Counter()
    seen = set()
    for ev in events:
        args = ev.get("args", {})
        if ev.get("cat") == "Node" and "provider" in args and ev.get("name") not in seen:
            seen.add(ev.get("name"))
            counts[args["provider"]] += 1
    return dict(counts)


def bench_onnx(path: str | Path, *, provider: str = "auto", batch_sizes=(1, 8, 32), warmup: int = 10,
               iters: int = 50, seed: int = 0) -> BenchResult:
    """Latency per batch size on the requested provider; see the module docstring."""
    path = Path(path)
    requested = resolve_providers(provider)
    warnings: list[str] = []
    import onnxruntime as ort

    available = ort.get_available_providers()
    for p in requested[:-1]:
        if p not in available:
            warnings.append(f"{p} is not available in this ONNX Runtime build ({', '.join(available)})")
    sess = ort_session(path, requested)
    actual = sess.get_providers()
    inputs = sess.get_inputs()
    rng = np.random.default_rng(seed)
    fixed = _fixed_batch(inputs[0])
    sizes = list(batch_sizes)
    if fixed is not None and any(b != fixed for b in sizes):
        warnings.append(f"the model has a fixed batch size of {fixed}; export with --dynamic-batch to vary it")
        sizes = [fixed]
    nodes = _node_providers(path, requested, _feeds(inputs, sizes[0], rng))
    wanted_gpu = [p for p in requested if p != PROVIDERS["cpu"]]
    fallback = False
    if wanted_gpu and actual[0] == PROVIDERS["cpu"]:
        fallback = True
        warnings.append(f"asked for {wanted_gpu[0]} but ONNX Runtime runs the whole session on the CPU")
    elif wanted_gpu and nodes.get(PROVIDERS["cpu"], 0):
        fallback = True
        warnings.append(f"{nodes[PROVIDERS['cpu']]} of {sum(nodes.values())} nodes fell back to the CPU "
                        "(e.g. int8 convolutions have no CUDA kernels)")
    for w in warnings:
        log.warning("%s: %s", path.name, w)
    result = BenchResult(str(path), provider, actual[0], actual, nodes, fallback, warnings, _size(path))
    use_binding = actual[0] in (PROVIDERS["cuda"], PROVIDERS["tensorrt"])
    for b in sizes:
        run = _runner(sess, _feeds(inputs, b, rng), use_binding)
        for _ in range(warmup):
            run()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1000)
        p50 = statistics.median(times)
        q = np.percentile(times, [90, 99])
        result.latency[str(b)] = {"p50_ms": p50, "p90_ms": float(q[0]), "p99_ms": float(q[1]),
                                  "throughput_per_s": b / (p50 / 1000)}
    return result


def _runner(sess, feeds: dict[str, np.ndarray], use_binding):
    if not use_binding:
        return lambda: sess.run(None, feeds)
    import onnxruntime as ort

    binding = sess.io_binding()
    on_device = {name: ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0) for name, x in feeds.items()}
    for name, value in on_device.items():
        binding.bind_ortvalue_input(name, value)
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cuda", 0)

    def run():
        sess.run_with_iobinding(binding)

    return run


def _size(path: Path) -> int:
    """Bytes of the model file plus any external-data files beside it that it references."""
    import onnx

    total = path.stat().st_size
    try:
        model = onnx.load(str(path), load_external_data=False)
        names = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        total += sum((path.parent / n).stat().st_size for n in names if (path.parent / n).exists())
    except Exception:  # noqa: BLE001 - size is informative only
        pass
    return total


def onnx_accuracy(path: str | Path, dataset, *, provider: str = "cpu", batch_size: int = 64,
                  limit: int | None = None) -> float:
    """Top-1 accuracy of an ONNX classifier on a dataset of (image, label) pairs."""
    sess = ort_session(path, resolve_providers(provider))
    inp = _one_image_input(path, sess.get_inputs())
    fixed = _fixed_batch(inp)
    bs = fixed or batch_size
    correct = total = 0
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for start in range(0, n - (n % bs if fixed else 0), bs):
        items = [dataset[i] for i in range(start, min(start + bs, n))]
        x = np.stack([np.asarray(it[0], dtype=np.float32) for it in items])
        y = np.array([int(it[1]) for it in items])
        try:
            out = sess.run(None, {inp.name: x})[0]
        except Exception as exc:  # noqa: BLE001 - a shape or type mismatch between model and data
            raise ExportError(f"'{path}' does not take this dataset's images: the model expects {inp.shape}, the "
                              f"images are {list(x.shape)}; measure it on the dataset it was exported for") from exc
        correct += int((out.argmax(1) == y).sum())
        total += len(y)
    return correct / max(total, 1)
