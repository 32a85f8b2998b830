"""Helpers shared by the compression passes: which layers, in graph order."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from .blocks.base import LAYER_CLASSES, LAYER_TYPES
from .graph_utils import is_plain

__all__ = ["prunable_layers", "check_fraction"]



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


def check_fraction(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {value!r}")
    return float(value)
