"""Per-layer summary of a traced model: expansion, parameters and MACs.

Used by ``sntfx inspect``. MACs count multiply-accumulates of conv and linear
layers (and of every inner layer of an SNT block, run explicitly) on the
recorded example-input shapes; "folded" columns give the same for the layer
the block folds back into.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .blocks import LayerConfig, SNTBlock, get_style, layer_kind, layer_macs
from .graph_utils import count_parameters, output_shape

__all__ = ["LayerRow", "layer_summary"]


@dataclass
class LayerRow:
    path: str
    kind: str  # e.g. "conv2d 3x3 s2 g8", "linear"
    expansion: str  # "" when not expanded
    params: int
    params_folded: int
    macs: int | None
    macs_folded: int | None


def _describe(c: LayerConfig) -> str:
    if not c.is_conv:
        return "linear"
    text = f"{c.kind} {'x'.join(map(str, c.kernel))}"
    if any(s != 1 for s in c.stride):
        text += f" s{'x'.join(map(str, c.stride)) if len(set(c.stride)) > 1 else c.stride[0]}"
    if c.groups > 1:
        text += " dw" if c.groups == c.in_features else f" g{c.groups}"
    return text


def layer_summary(gm: fx.GraphModule) -> list[LayerRow]:
    """One row per conv/linear layer or SNT block the graph calls."""
    rows: dict[str, LayerRow] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if isinstance(m, SNTBlock):
            config = m.config
            expansion = m.style + (f" x{m.ratio}" if "ratio" in get_style(m.style).options else "")
            folded_params = config.in_features // config.groups * config.out_features * config.ktaps + (
                config.out_features if config.bias else 0
            )
        elif layer_kind(m) is not None:
            config, expansion, folded_params = LayerConfig.from_module(m), "", count_parameters(m)
        else:
            continue
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        in_shape, out_shape = (output_shape(src) if src is not None else None), output_shape(node)
        macs = folded = None
        if out_shape is not None:
            folded = layer_macs(config, out_shape)
            macs = m.macs(in_shape, out_shape) if isinstance(m, SNTBlock) and in_shape else folded
        row = rows.get(node.target)
        if row is None:
            rows[node.target] = LayerRow(node.target, _describe(config), expansion, count_parameters(m), folded_params, macs, folded)
        elif macs is not None and row.macs is not None:  # several call sites: add their cost
            row.macs += macs
            row.macs_folded += folded
    return list(rows.values())
