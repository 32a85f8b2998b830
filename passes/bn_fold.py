"""``fold_bn``: fold a model's own BatchNorm layers into the conv/linear before them.

Rewrites::

    %c = call_module[target=conv](%x)            # Conv2d, bias optional
    %y = call_module[target=bn](%c)              # BatchNorm2d, eval mode
      ->
    %c = call_module[target=conv](%x)            # Conv2d with bias

Algebra: with ``s = gamma / sqrt(var + eps)``, ``W' = s[o] W[o]`` and
``b' = s (b - mean) + beta``. Exact in eval mode (float64 internally).

Matches only when the layer is called once, its output has no other user, the
BatchNorm is called once on it and tracks running statistics, and (for a
Linear) the BatchNorm normalises the Linear's feature dimension. Anything
else is left alone and counted in ``stats`` with the reason.

Requires: ``folded`` (no SNT block may still route a bias into a BatchNorm).
Numerics: exact. Runs in eval mode.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch
import torch.fx as fx
from torch import nn

from sntfx.blocks.base import LAYER_CLASSES, LayerConfig
from sntfx.graph_utils import call_sites, is_plain, output_shape, set_module
from sntfx.pass_base import Numerics, Pass, PassContext, PassResult, Property, register_pass

__all__ = ["FoldBatchNorm"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@register_pass
class FoldBatchNorm(Pass):
    """Fold ``conv -> BatchNorm`` and ``linear -> BatchNorm1d`` pairs."""

    name = "fold_bn"
    requires = frozenset({Property.FOLDED})
    needs_eval = True

    @property
    def numerics(self) -> Numerics:
        return Numerics.EXACT

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        for bn_node in list(gm.graph.nodes):
            if bn_node.op != "call_module":
                continue
            bn = gm.get_submodule(bn_node.target)
            if type(bn) not in _BN:
                continue
            reason = _refuse(gm, bn_node, bn)
            if reason:
                stats[f"skip: {reason}"] += 1
                continue
            layer_node = bn_node.args[0]
            layer = gm.get_submodule(layer_node.target)
            set_module(gm, layer_node.target, _fused(layer, bn))
            bn_node.replace_all_uses_with(layer_node)
            gm.graph.erase_node(bn_node)
            gm.delete_submodule(bn_node.target)
            stats["folded"] += 1
        return PassResult(gm, stats["folded"] > 0, stats)


def _refuse(gm: fx.GraphModule, bn_node: fx.Node, bn: nn.Module) -> str:
    """Why this BatchNorm cannot be folded ('' when it can)."""
    if bn.running_mean is None or bn.running_var is None:
        return "BatchNorm without running statistics"
    if len(bn_node.args) != 1 or bn_node.kwargs or len(call_sites(gm, bn_node.target)) != 1:
        return "BatchNorm called more than once"
    src = bn_node.args[0]
    if not isinstance(src, fx.Node) or src.op != "call_module":
        return "input is not a layer"
    layer = gm.get_submodule(src.target)
    if not is_plain(layer, *LAYER_CLASSES.values()):
        return "input is not a conv/linear"
    if len(src.users) != 1 or len(call_sites(gm, src.target)) != 1:
        return "layer output used elsewhere"
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out != bn.num_features:
        return "channel mismatch"
    if isinstance(layer, nn.Linear):
        shape = output_shape(src)
        if shape is None or len(shape) != 2:
            return "linear output is not (N, C)"
    return ""


def _fused(layer: nn.Module, bn: nn.Module) -> nn.Module:
    w = layer.weight.detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    s = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.double()
    shift = bn.bias.double() if bn.bias is not None else torch.zeros_like(s)
    new_w = w * s.reshape(-1, *([1] * (w.dim() - 1)))
    new_b = (b - bn.running_mean.double()) * s + shift
    dtype = layer.weight.dtype
    return dataclasses.replace(LayerConfig.from_module(layer), bias=True).build(new_w.to(dtype), new_b.to(dtype))
