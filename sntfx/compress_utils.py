"""Helpers shared by the compression passes.

Which layers (in graph order), exact keep-masks (top-k per row or tensor,
N:M), the activation-aware input norms behind the Wanda score, and
BatchNorm re-estimation after pruning.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
from collections import Counter
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from .blocks.base import LAYER_CLASSES, LAYER_TYPES
from .graph_utils import is_plain, unsupported_weight_layers

__all__ = ["prunable_layers", "check_fraction", "check_exclude", "select_layers", "LayerSelection"]

log = logging.getLogger(__name__)


def prunable_layers(gm: fx.GraphModule, *, exclude_first: bool = False, exclude_last: bool = False,
                    types: tuple[str, ...] = LAYER_TYPES) -> list[tuple[str, nn.Module]]:
    """Plain conv/linear layers the graph calls, in order of first call, deduplicated."""
    classes = tuple(LAYER_CLASSES[t] for t in types)
    seen: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in seen:
            m = gm.get_submodule(node.target)
            if is_plain(m, *classes):
                seen.append(node.target)
    if exclude_first and seen:
        seen = seen[1:]
    if exclude_last and seen:
        seen = seen[:-1]
    return [(name, gm.get_submodule(name)) for name in seen]


def check_exclude(patterns) -> tuple[str, ...]:
    """Validate ``exclude`` (glob patterns over module names, e.g. ``"features.0"``, ``"*downsample*"``)."""
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) and p.strip() for p in patterns):
        raise ValueError(f"exclude must be a list of glob patterns over module names (e.g. ['features.0', "
                         f"'*.downsample.*']), got {patterns!r}")
    return tuple(p.strip() for p in patterns)


def select_layers(gm: fx.GraphModule, *, exclude: Sequence[str] = (), exclude_first: bool = False,
                  exclude_last: bool = False, types: tuple[str, ...] = LAYER_TYPES
                  ) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The layers a compression pass works on, and the names it leaves alone because of ``exclude``.

    ``exclude`` holds glob patterns (``fnmatch``, case-sensitive) matched
    against module names, like NNCF's ``ignored_scope`` or Torch-Pruning's
    ``ignored_layers``. Patterns that match no layer are logged; when none of
    them matches anything, :class:`ValueError` lists the layer names (a
    pattern that silently excludes nothing would deploy the wrong model).
    """
    layers = prunable_layers(gm, exclude_first=exclude_first, exclude_last=exclude_last, types=types)
    if not exclude:
        return layers, []
    every = [n for n, _ in prunable_layers(gm, types=types)]
    unmatched = [p for p in exclude if not any(fnmatch.fnmatchcase(n, p) for n in every)]
    if len(unmatched) == len(exclude):
        shown = ", ".join(every[:12]) + (", ..." if len(every) > 12 else "")
        raise ValueError(f"exclude {list(exclude)} matches none of the model's conv/linear layers ({shown}); "
                         "patterns are globs over these names, e.g. 'features.0' or '*.downsample.*'")
    for p in unmatched:
        log.warning("exclude pattern '%s' matches no conv/linear layer", p)
    excluded = [n for n, _ in layers if any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    return [(n, m) for n, m in layers if n not in excluded], excluded


class LayerSelection:
    """The layer-selection options every compression pass shares: ``exclude_first``, ``exclude_last``, ``exclude``.

    A pass mixes it in, calls :meth:`_select_options` from its ``__init__``,
    adds :meth:`selection_params` to its ``params()`` (so recipes replay the
    same selection) and takes its layers from :meth:`selected_layers`::

        class MyPrune(LayerSelection, Pass):
            def __init__(self, amount=0.5, exclude_first=False, exclude_last=False, exclude=None):
                self.amount = amount
                self._select_options(exclude_first, exclude_last, exclude)

            def params(self):
                return {"amount": self.amount, **self.selection_params()}

            def run(self, gm, ctx):
                stats = Counter()
                layers, excluded = self.selected_layers(gm, stats)
                ...
    """

    exclude_first: bool = False
    exclude_last: bool = False
    exclude: tuple[str, ...] = ()

    def _select_options(self, exclude_first: bool = False, exclude_last: bool = False, exclude=None) -> None:
        self.exclude_first, self.exclude_last = bool(exclude_first), bool(exclude_last)
        self.exclude = check_exclude(exclude)

    def selection_params(self) -> dict:
        return {"exclude_first": self.exclude_first, "exclude_last": self.exclude_last, "exclude": list(self.exclude)}

    def selected_layers(self, gm: fx.GraphModule, stats: Counter | None = None
                        ) -> tuple[list[tuple[str, nn.Module]], list[str]]:
        """:func:`select_layers` with this pass's options; counts ``excluded layers`` in ``stats`` when given."""
        layers, excluded = select_layers(gm, exclude=self.exclude, exclude_first=self.exclude_first,
                                         exclude_last=self.exclude_last)
        if stats is not None:
            if excluded:
                stats["excluded layers"] = len(excluded)
            for kind, n in unsupported_weight_layers(gm, *LAYER_CLASSES.values()).items():
                stats[f"left as is: {kind} (not supported)"] = n
        return layers, excluded


#: What a pass that calibrates asks for when the context has no calibration data.
CALIBRATION = "calibration data (PassContext(calibration=[batch, ...]), or --data NAME on the command line)"


def check_fraction(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {value!r}")
    return float(value)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask (weight-shaped, bool) holding the ``n`` highest ``scores`` in every ``m`` consecutive input weights.

    Groups run along the input-channel dimension (dim 1 of a weight), for
    each output channel and kernel tap: the layout sparse tensor cores use.
    Ties are broken by position. The input channels per group must be a
    multiple of ``m``.
    """
    s = scores.detach()
    moved = s.movedim(1, -1) if s.dim() > 2 else s  # (out, *k, in)
    groups = moved.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    keep.scatter_(1, order, True)
    keep = keep.reshape(moved.shape)
    return keep.movedim(-1, 1) if s.dim() > 2 else keep


def keep_top(scores: torch.Tensor, sparsity: float, *, per_row: bool) -> torch.Tensor:
    """Keep-mask zeroing exactly ``round(sparsity * n)`` lowest ``scores`` (per output row, or over the tensor).

    Ties are broken by position (a stable sort), so the count is exact.
    """
    flat = scores.detach().reshape(scores.shape[0], -1) if per_row else scores.detach().reshape(1, -1)
    k = int(round(sparsity * flat.shape[1]))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        drop = torch.sort(flat, dim=1, stable=True).indices[:, :k]
        keep.scatter_(1, drop, False)
    return keep.reshape(scores.shape)


def input_feature_norms(gm: nn.Module, layers: list[tuple[str, nn.Module]], batches) -> dict[str, torch.Tensor]:
    """Per layer, the L2 norm over ``batches`` of every input feature its weights multiply (weight-shaped).

    For a Linear the feature is an input column (norm over every leading
    dimension); for a conv it is one column of the unfolded (im2col) input:
    input channel ``i`` at kernel tap ``t``, padded the layer's way, at the
    layer's stride and dilation. So ``|W| * norm`` is exactly the Wanda score
    ``|W_ij| * ||X_j||``, expanded to the weight's shape (a grouped conv's
    output channel sees its own group's inputs). The model runs in eval mode.
    """
    from .blocks.base import LayerConfig
    from .graph_utils import mode

    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def hook_for(name: str, layer: nn.Module):
        config = LayerConfig.from_module(layer)

        def hook(mod, args):
            x = args[0].detach().double()
            if not config.is_conv:
                sq = x.reshape(-1, x.shape[-1]).square().sum(0)
            else:
                sq = _tap_sums(config, config.pad(x).square())
            sums[name] = sums[name] + sq if name in sums else sq

        return hook

    for name, layer in layers:
        hooks.append(layer.register_forward_pre_hook(hook_for(name, layer)))
    try:
        with mode(gm, training=False), torch.no_grad():
            for x in batches:
                gm(x)
    finally:
        for h in hooks:
            h.remove()
    norms = {}
    for name, layer in layers:
        if name not in sums:
            continue
        w = layer.weight
        norm = sums[name].sqrt().to(w.dtype)
        if w.dim() == 2:
            norms[name] = norm.expand_as(w)
        else:
            groups = layer.groups
            per_group = norm.reshape(groups, w.shape[1], *w.shape[2:])  # (groups, C_in/groups, *k)
            norms[name] = per_group.repeat_interleave(w.shape[0] // groups, dim=0)
    return norms


def _tap_sums(config, xp: torch.Tensor) -> torch.Tensor:
    """Per input channel and kernel tap, the sum over the batch and every output position of ``xp`` (padded).

    The im2col column sums of any conv's input, ``(C * taps,)`` in ``unfold``'s order (channel, then the taps
    row-major), for 1-, 2- and 3-d kernels alike: tap ``t`` reads the input shifted by ``t * dilation`` at the
    layer's stride.
    """
    spatial = xp.shape[2:]
    outs = [(n - d * (k - 1) - 1) // s + 1 for n, k, d, s in zip(spatial, config.kernel, config.dilation,
                                                                    config.stride)]
    reduce = (0, *range(2, xp.dim()))
    taps = []
    for tap in itertools.product(*(range(k) for k in config.kernel)):
        window = tuple(slice(t * d, t * d + s * (o - 1) + 1, s)
                       for t, d, s, o in zip(tap, config.dilation, config.stride, outs))
        taps.append(xp[(slice(None), slice(None), *window)].sum(dim=reduce))
    return torch.stack(taps, dim=1).reshape(-1)


def reestimate_batchnorm(gm: nn.Module, batches) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (no labels, no gradients).

    Only ``running_mean``, ``running_var`` and ``num_batches_tracked``
    change: the statistics are reset and recomputed as a cumulative average
    over the batches, with every other module in eval mode (dropout off).
    Returns how many BatchNorms were re-estimated (0 when the model has
    none, e.g. after ``fold_bn``).
    """
    from .graph_utils import mode

    norms = [m for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    with mode(gm, training=False), torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch weighs the same
            m.train()
        try:
            for x in batches:
                gm(x)
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
    return len(norms)
