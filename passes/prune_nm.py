"""``prune_nm``: N:M semi-structured sparsity (2:4, 4:8, ...).

In every group of ``m`` consecutive weights along the input-channel
dimension (for each output channel and kernel tap) the ``n`` largest in
magnitude are kept and the others zeroed: the pattern sparse tensor cores
accelerate. Layers whose input channels per group are not a multiple of
``m`` are skipped and counted (``skip: in-channels not divisible by m``).

Requires: ``folded``. Numerics: changes the function.
"""

from __future__ import annotations

from collections import Counter

import torch

from sntfx.compress_utils import CALIBRATION, LayerSelection, nm_mask, reestimate_batchnorm
from sntfx.pass_base import Numerics, Pass, PassContext, PassResult, Property, register_pass

__all__ = ["NMPrune", "nm_groups"]


def nm_groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    """A view-copy of ``weight`` as ``(-1, m)`` groups along the input-channel dimension."""
    w = weight.detach()
    if w.dim() > 2:  # (out, in, *k) -> (out, *k, in)
        w = w.movedim(1, -1)
    return w.reshape(-1, m)


@register_pass
class NMPrune(LayerSelection, Pass):
    """Keep ``n`` of every ``m`` consecutive input weights."""

    name = "prune_nm"
    requires = frozenset({Property.FOLDED})

    def __init__(self, n: int = 2, m: int = 4, exclude_first: bool = False, exclude_last: bool = False,
                 recalibrate_bn: bool = False, exclude=None):
        if not (isinstance(n, int) and isinstance(m, int)) or n < 1 or m < 2 or n >= m:
            raise ValueError(f"N:M sparsity needs integers 1 <= N < M, got {n}:{m}")
        self.n, self.m = n, m
        self.recalibrate_bn = bool(recalibrate_bn)
        self._select_options(exclude_first, exclude_last, exclude)

    @staticmethod
    def parse_pattern(text: str) -> tuple[int, int]:
        """``"2:4"`` -> ``(2, 4)``; ValueError naming the expected form otherwise."""
        parts = str(text).split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"an N:M pattern is two integers with a colon, e.g. 2:4 or 4:8; got {text!r}")
        n, m = (int(p) for p in parts)
        if n < 1 or m < 2 or n >= m:
            raise ValueError(f"N:M sparsity needs integers 1 <= N < M, got {n}:{m}")
        return n, m

    @property
    def numerics(self) -> Numerics:
        return Numerics.CHANGES

    def params(self):
        return {"n": self.n, "m": self.m, "recalibrate_bn": self.recalibrate_bn, **self.selection_params()}

    def check(self, ctx: PassContext) -> str | None:
        return CALIBRATION if self.recalibrate_bn and not ctx.calibration else None

    def run(self, gm, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        layers, excluded = self.selected_layers(gm, stats)
        for name, layer in layers:
            in_per_group = layer.weight.shape[1]
            if in_per_group % self.m:
                stats[f"skip: in-channels not divisible by {self.m}"] += 1
                continue
            with torch.no_grad():
                layer.weight.mul_(nm_mask(layer.weight.abs(), self.n, self.m).to(layer.weight.dtype))
            stats["pruned layers"] += 1
        if self.recalibrate_bn:
            stats["batchnorms re-estimated"] = reestimate_batchnorm(gm, ctx.calibration)
        return PassResult(gm, stats["pruned layers"] > 0, stats, {"excluded": excluded})

    def replay(self, gm, ctx: PassContext) -> PassResult:
        """Pruning changes only weights, which a rebuilt model loads from its file: nothing to redo."""
        return PassResult(gm, False, Counter())

