"""``prune``: unstructured magnitude pruning of conv and linear weights.

Zeroes the ``round(sparsity * n)`` smallest-magnitude weights, either over
all selected layers together (``scope=global``, one threshold) or in each
layer separately (``scope=layer``). Exactly that many weights are zero
afterwards (ties are broken by position), and the zeros are baked into the
weights: no masks, hooks or parametrizations remain. Biases and
normalisation parameters are not pruned.

Requires: ``folded`` (prune the deployable architecture, not SNT blocks).
Numerics: changes the function.
"""

from __future__ import annotations

from collections import Counter

import torch

from sntfx.compress_utils import CALIBRATION, LayerSelection, check_fraction, reestimate_batchnorm
from sntfx.pass_base import Numerics, Pass, PassContext, PassResult, Property, register_pass

__all__ = ["MagnitudePrune"]


@register_pass
class MagnitudePrune(LayerSelection, Pass):
    """Zero the smallest weights to reach ``sparsity``.

    Args:
        sparsity: fraction of zeros in [0, 1).
        scope: ``global`` (one threshold for all layers) or ``layer``.
        exclude_first / exclude_last: keep the first / last layer dense.
        exclude: glob patterns over module names to keep dense (e.g. ``["features.0", "*.fc"]``).
        recalibrate_bn: re-estimate BatchNorm statistics on ``ctx.calibration`` afterwards.
    """

    name = "prune"
    requires = frozenset({Property.FOLDED})

    def __init__(self, sparsity: float = 0.5, scope: str = "global", exclude_first: bool = False,
                 exclude_last: bool = False, recalibrate_bn: bool = False, exclude=None):
        self.sparsity = check_fraction(sparsity, "sparsity")
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        self.scope, self.recalibrate_bn = scope, bool(recalibrate_bn)
        self._select_options(exclude_first, exclude_last, exclude)

    @property
    def numerics(self) -> Numerics:
        return Numerics.CHANGES if self.sparsity > 0 else Numerics.EXACT

    def params(self):
        return {"sparsity": self.sparsity, "scope": self.scope, "recalibrate_bn": self.recalibrate_bn,
                **self.selection_params()}

    def check(self, ctx: PassContext) -> str | None:
        return CALIBRATION if self.recalibrate_bn and not ctx.calibration else None

    def run(self, gm, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        layers, excluded = self.selected_layers(gm, stats)
        if not layers or self.sparsity == 0:
            return PassResult(gm, False, stats, {"excluded": excluded})
        with torch.no_grad():
            if self.scope == "layer":
                for _, m in layers:
                    stats["zeroed"] += _zero_smallest([m.weight], self.sparsity)
            else:
                stats["zeroed"] += _zero_smallest([m.weight for _, m in layers], self.sparsity)
        total = sum(m.weight.numel() for _, m in layers)
        zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
        stats["layers"] = len(layers)
        if self.recalibrate_bn:
            stats["batchnorms re-estimated"] = reestimate_batchnorm(gm, ctx.calibration)
        info = {"sparsity": zeros / total, "layers": {n: float((m.weight == 0).float().mean()) for n, m in layers},
                "excluded": excluded}
        return PassResult(gm, stats["zeroed"] > 0, stats, info)

    def replay(self, gm, ctx: PassContext) -> PassResult:
        """Pruning changes only weights, which a rebuilt model loads from its file: nothing to redo."""
        return PassResult(gm, False, Counter())


def _zero_smallest(weights: list[torch.Tensor], fraction: float) -> int:
    """Zero exactly round(fraction * n) entries of smallest magnitude across ``weights``."""
    flat = torch.cat([w.detach().abs().reshape(-1).float() for w in weights])
    k = int(round(fraction * flat.numel()))
    if k == 0:
        return 0
    idx = torch.topk(flat, k, largest=False, sorted=False).indices
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask[idx] = False
    offset = 0
    for w in weights:
        n = w.numel()
        w.mul_(mask[offset:offset + n].reshape(w.shape).to(w.dtype))
        offset += n
    return k
