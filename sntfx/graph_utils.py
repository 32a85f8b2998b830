"""Small helpers shared by passes: module lookup and replacement, call sites."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch
import torch.fx as fx
from torch import nn

__all__ = [
    "saved_for_backward",
    "count_parameters",
    "set_module",
    "call_sites",
    "find_bias_sink",
    "output_shape",
    "shared_parameter_owners",
    "is_plain",
    "unsupported_weight_layers",
    "required_inputs",
    "randomize_",
    "mode",
]


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` with ``new``."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def call_sites(gm: fx.GraphModule, target: str) -> list[fx.Node]:
    """Every ``call_module`` node that calls the submodule ``target``."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]


def output_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The node's output shape from ``node.meta["tensor_meta"]``, if recorded."""
    tm = node.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    return tuple(shape) if shape is not None else None


def find_bias_sink(gm: fx.GraphModule, target: str, out_features: int, *, linear: bool) -> str | None:
    """The BatchNorm that alone consumes the output of the layer at ``target``, if any.

    A bias added to the layer's output can be moved exactly into such a
    BatchNorm's running mean: ``BN(y + b)`` with ``running_mean - b`` equals
    ``BN(y)`` in eval mode. Requires one call of the layer, whose only user is
    one call of a BatchNorm with running statistics over the layer's output
    features (dimension 1: a conv's channels, or a Linear on ``(N, C)``).
    """
    sites = call_sites(gm, target)
    if len(sites) != 1 or len(sites[0].users) != 1:
        return None
    user = next(iter(sites[0].users))
    if user.op != "call_module" or len(user.args) != 1 or user.args[0] is not sites[0] or user.kwargs:
        return None
    bn = gm.get_submodule(user.target)
    if type(bn) not in (nn.BatchNorm1d, nn.BatchNorm2d) or bn.running_mean is None:
        return None
    if bn.num_features != out_features or len(call_sites(gm, user.target)) != 1:
        return None
    shape = output_shape(sites[0])
    if shape is None or len(shape) < 2 or shape[1] != out_features:
        return None
    if linear and len(shape) != 2:
        return None  # a Linear on (N, L, C): BatchNorm1d would normalise L, not C
    return user.target


def shared_parameter_owners(root: nn.Module) -> dict[int, set[str]]:
    """id(parameter) -> the module paths that own it, for parameters owned twice or more."""
    owners: dict[int, set[str]] = {}
    for mod_name, mod in root.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(mod_name)
    return {k: v for k, v in owners.items() if len(v) > 1}


def is_plain(module: nn.Module, *bases: type) -> bool:
    """True when ``module`` is one of ``bases`` or a subclass that keeps its forward."""
    for base in bases:
        if isinstance(module, base):
            cls = type(module)
            return cls.forward is base.forward and getattr(cls, "_conv_forward", None) is getattr(base, "_conv_forward", None)
    return False


#: Weighted layers called as functions (a traced custom ``forward`` that calls ``super().forward`` becomes one).
FUNCTIONAL_WEIGHT_OPS = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
                         torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d,
                         torch.nn.functional.conv_transpose3d, torch.nn.functional.linear,
                         torch.nn.functional.bilinear)


def unsupported_weight_layers(gm: fx.GraphModule, *supported: type, functional: bool = True,
                              custom_forwards: bool = True) -> Counter:
    """Conv- and linear-like layers the graph calls that are not plain ``supported`` modules, by kind.

    ``ConvTranspose2d``, ``Bilinear``, (``custom_forwards``) a
    subclass of a ``supported`` class with its own ``forward`` kept as a
    module, and (``functional``) weighted layers the graph calls as functions
    (``functional conv2d``): a pass that handles only ``supported`` leaves
    these as they are, and says so by counting them rather than skipping them
    silently. A pass that counts some of them its own way turns them off here.
    """
    weighted = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)
    seen: set[str] = set()
    out: Counter = Counter()
    for node in gm.graph.nodes:
        if functional and node.op == "call_function" and node.target in FUNCTIONAL_WEIGHT_OPS:
            out[f"functional {node.target.__name__}"] += 1
        if node.op != "call_module" or node.target in seen:
            continue
        seen.add(node.target)
        m = gm.get_submodule(node.target)
        custom = isinstance(m, supported)  # a supported class's subclass with its own forward
        if isinstance(m, weighted) and not is_plain(m, *supported) and (custom_forwards or not custom):
            out[type(m).__name__] += 1
    return out


def required_inputs(gm: fx.GraphModule) -> list[str]:
    """The names of the inputs a traced model must be given (its placeholders without a default value)."""
    return [n.name for n in gm.graph.nodes if n.op == "placeholder" and not n.args]


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Randomise weights and normalisation statistics, for equivalence tests.

    Conv/linear weights keep their default-init scale, BatchNorm-like layers
    get weight in [0.5, 1.5], bias and running mean ~ N(0, 0.2), running
    variance in [0.5, 2].
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if hasattr(m, "running_var") and isinstance(getattr(m, "running_var"), torch.Tensor):
                w, b = getattr(m, "weight", None), getattr(m, "bias", None)
                rm = getattr(m, "running_mean", None)
                if isinstance(w, torch.Tensor):
                    w.copy_(torch.empty(w.shape).uniform_(0.5, 1.5, generator=gen))
                if isinstance(b, torch.Tensor):
                    b.copy_(torch.empty(b.shape).normal_(0, 0.2, generator=gen))
                if isinstance(rm, torch.Tensor):
                    rm.copy_(torch.empty(rm.shape).normal_(0, 0.2, generator=gen))
                m.running_var.copy_(torch.empty(m.running_var.shape).uniform_(0.5, 2.0, generator=gen))
    return module


@contextlib.contextmanager
def mode(module: torch.nn.Module, *, training: bool) -> Iterator[torch.nn.Module]:
    """Put ``module`` in training or eval mode for a ``with`` block, then restore its mode exactly.

    Restores every submodule's own flag (a model may keep, say, frozen
    BatchNorms in eval mode inside a training model), also on an error.
    """
    saved = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield module
    finally:
        for m, flag in saved:
            m.training = flag


@contextlib.contextmanager
def saved_for_backward(exclude=()) -> Iterator[dict[int, int]]:
    """Record what autograd keeps for the backward pass inside the block: {storage address: bytes}, each storage
    once, the storages of the tensors in ``exclude`` (parameters, buffers) left out. ``sum(d.values())`` is the
    total."""
    own = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved
