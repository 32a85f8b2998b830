"""Tracing: turn any ``nn.Module`` into a ``torch.fx.GraphModule``.

``trace`` runs ``torch.fx`` symbolic tracing. When tracing fails inside a
submodule (data-dependent control flow, iteration over a proxy, ...), that
submodule is kept as an opaque leaf and tracing is retried, repeatedly; the
modules kept opaque are reported in ``gm.meta["sntfx"]["opaque_modules"]``.
When the failure is in the root module's own ``forward``, tracing is
impossible and a :class:`~sntfx.errors.TraceError` names the reason.

The traced module is checked against the original on the example inputs
(eval mode), and tensor shapes are propagated once into
``node.meta["tensor_meta"]`` so passes can ask for them.

Tracing happens in eval mode: Python-level branches on ``self.training`` are
resolved as in inference. Dropout, BatchNorm and the stochastic-depth modules
listed in ``DEFAULT_LEAF_TYPES`` stay modules, so they still train normally.

Example::

    gm = sntfx.trace(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_leaves

from .blocks import LAYER_CLASSES, SNTBlock
from .errors import TraceError
from .graph_utils import is_plain, mode

__all__ = [
    "trace",
    "propagate_shapes",
    "as_input_tuple",
    "input_spec",
    "inputs_from_spec",
    "compare_outputs",
    "sntfx_meta",
    "DEFAULT_LEAF_TYPES",
]

log = logging.getLogger(__name__)

MAX_RETRIES = 64


# Modules whose training-time behaviour would be lost if traced through (they
# branch on ``self.training`` inside a function). Matched by class name, so
# that importing sntfx does not import torchvision or timm.
DEFAULT_LEAF_TYPES = frozenset({
    ("torchvision.ops.stochastic_depth", "StochasticDepth"),
    ("timm.layers.drop", "DropPath"),
    ("timm.models.layers.drop", "DropPath"),
})


def _is_default_leaf(m: nn.Module) -> bool:
    return any((cls.__module__, cls.__qualname__) in DEFAULT_LEAF_TYPES for cls in type(m).__mro__)


class _RetryTracer(fx.Tracer):
    """A tracer that remembers in which submodule a failure happened."""

    def __init__(self, opaque: set[str]):
        super().__init__()
        self.opaque = opaque
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.opaque:
            return True
        if _is_default_leaf(m):
            return True
        if isinstance(m, SNTBlock) or is_plain(m, *LAYER_CLASSES.values()):
            return True  # user subclasses that keep the layer's forward stay layers
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                # The innermost module an exception propagates through is
                # the one whose own forward could not be traced.
                try:
                    self.failed_in = self.path_of_module(m)
                except NameError:
                    self.failed_in = ""
            raise


def as_input_tuple(example_inputs: Any) -> tuple:
    """Normalise a tensor, a tuple/list of tensors, or None to a tuple."""
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


def input_spec(inputs: Sequence[torch.Tensor]) -> list[dict]:
    """A JSON-able description (shape, dtype) of example inputs."""
    return [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in inputs]


def inputs_from_spec(spec: Sequence[dict], *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random tensors matching an :func:`input_spec` (normal floats, small ints)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for item in spec:
        dtype = getattr(torch, item["dtype"])
        shape = tuple(int(s) for s in item["shape"])
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dtype))
        else:
            out.append(torch.randint(0, 2, shape, generator=gen).to(dtype))
    return tuple(out)


def sntfx_meta(gm: nn.Module) -> dict:
    """The sntfx section of ``gm.meta`` (created on first use)."""
    meta = getattr(gm, "meta", None)
    if meta is None:
        raise TypeError("expected a torch.fx.GraphModule; call sntfx.trace(model, example_inputs) first")
    return meta.setdefault("sntfx", {})


def compare_outputs(a: Any, b: Any) -> float:
    """Largest norm-wise relative error ``||a - b|| / ||a||`` over output tensors.

    Outputs may be nested (tuples, dicts); their tensor leaves are compared
    pairwise in float64. A structural mismatch returns ``inf``.
    """
    la = [t for t in tree_leaves(a) if isinstance(t, torch.Tensor)]
    lb = [t for t in tree_leaves(b) if isinstance(t, torch.Tensor)]
    if len(la) != len(lb):
        return float("inf")
    worst = 0.0
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            return float("inf")
        if not x.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(x, y) else float("inf"))
            continue
        x64, y64 = x.detach().double(), y.detach().double()
        denom = x64.norm().item()
        err = (x64 - y64).norm().item()
        worst = max(worst, err / denom if denom > 0 else err)
    return worst


def propagate_shapes(gm: fx.GraphModule, example_inputs: Any) -> None:
    """Record ``tensor_meta`` (shape, dtype, ...) on every node, in eval mode."""
    inputs = as_input_tuple(example_inputs)
    with mode(gm, training=False), torch.no_grad():
        ShapeProp(gm).propagate(*inputs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[str] = (),
    check: bool = True,
    rtol: float = 1e-5,
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule with shapes recorded on every node.

    Args:
        model: any ``nn.Module``.
        example_inputs: a tensor or tuple of tensors the model accepts.
        leaf_modules: qualified names of submodules to keep opaque from the start.
        check: compare the traced module's outputs with the model's (eval mode).
        rtol: relative tolerance of that comparison.

    Returns:
        A ``torch.fx.GraphModule``; ``gm.meta["sntfx"]`` holds
        ``opaque_modules`` (kept as leaves after a failure) and ``input_spec``.

    Raises:
        TraceError: the model cannot be traced, or the traced graph computes
            something else than the model on the example inputs.
    """
    if isinstance(model, fx.GraphModule) and "sntfx" in getattr(model, "meta", {}):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"sntfx.trace expects an nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    if not inputs:
        raise TraceError(
            "no example inputs given: pass a tensor (or a tuple of tensors) shaped like "
            "the model's input, e.g. torch.randn(1, 3, 224, 224)"
        )
    with torch.no_grad():
        _check_runs(model, inputs)

    was_training = model.training
    model.eval()
    opaque: list[str] = list(leaf_modules)
    try:
        for _ in range(MAX_RETRIES):
            tracer = _RetryTracer(set(opaque))
            try:
                graph = tracer.trace(model)
                break
            except Exception as exc:  # noqa: BLE001 - any tracing failure is retried
                where = tracer.failed_in
                reason = _first_line(exc)
                if not where:
                    raise TraceError(
                        f"cannot trace {type(model).__name__}: its own forward() is not "
                        f"symbolically traceable ({reason}). Move the data-dependent part "
                        "into a submodule (it will be kept opaque) or make the control flow "
                        "independent of tensor values.",
                        module_path="",
                        reason=reason,
                    ) from exc
                if where in opaque:
                    raise TraceError(
                        f"cannot trace {type(model).__name__}: module '{where}' failed even "
                        f"when kept opaque ({reason})",
                        module_path=where,
                        reason=reason,
                    ) from exc
                log.info("tracing failed inside '%s' (%s); keeping it opaque", where, reason)
                opaque.append(where)
        else:  # pragma: no cover - needs > MAX_RETRIES nested failures
            raise TraceError(f"gave up tracing after {MAX_RETRIES} retries; opaque: {opaque}")
        name = type(model).__name__
        gm = fx.GraphModule(tracer.root, graph, name)
    finally:
        model.train(was_training)

    new_opaque = [p for p in opaque if p not in leaf_modules]
    if new_opaque:
        log.warning(
            "kept %d module(s) opaque (not traced, not transformed): %s",
            len(new_opaque),
            ", ".join(new_opaque),
        )
    meta = sntfx_meta(gm)
    meta["opaque_modules"] = list(opaque)
    meta["input_spec"] = input_spec(inputs)

    if check:
        model.eval()
        gm.eval()
        try:
            with torch.no_grad():
                err = compare_outputs(model(*inputs), gm(*inputs))
        finally:
            model.train(was_training)
        if not err <= rtol:
            raise TraceError(
                f"the traced graph of {type(model).__name__} does not reproduce the model "
                f"(relative error {err:.3g} > {rtol:g}); a value computed from the inputs was "
                "probably baked in as a constant. Keep the offending submodule opaque with "
                "leaf_modules=[...]."
            )
    propagate_shapes(gm, inputs)
    gm.train(was_training)
    return gm


def _check_runs(model: nn.Module, inputs: tuple) -> None:
    try:
        with mode(model, training=False):
            model(*inputs)
    except Exception as exc:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs if isinstance(t, torch.Tensor))
        raise TraceError(
            f"{type(model).__name__} does not run on the example inputs of shape {shapes}: "
            f"{_first_line(exc)}. Give an input shape the model accepts (e.g. --input-shape 1,3,224,224)."
        ) from exc
