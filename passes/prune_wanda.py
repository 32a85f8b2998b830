"""``prune_wanda``: activation-aware pruning without retraining (the Wanda criterion).

Each weight is scored by its magnitude times the L2 norm of the input feature
it multiplies, over calibration data: ``score[o, j] = |W[o, j]| * ||X_j||``
(Sun et al., 2023). For a conv, ``j`` is an input channel at one kernel tap
and ``X_j`` that column of the unfolded input (padding, stride and dilation
as the layer applies them). Scores are compared

* within each output row (``scope=row``, Wanda's choice): every output
  channel keeps the same fraction; or within each layer (``scope=layer``);
  exactly ``round(sparsity * n)`` weights are zeroed per row / layer;
* or, with ``pattern="N:M"``, within every group of ``M`` consecutive input
  channels (per output channel and tap): the ``N`` best are kept (2:4 runs on
  sparse tensor cores). Layers whose input channels per group are not a
  multiple of ``M`` are skipped and counted.

Input norms come from the unpruned model (one calibration pass), as in Wanda.
``recalibrate_bn`` re-estimates the BatchNorm statistics on the same
calibration batches afterwards. Zeros are baked into the weights.

Requires: ``folded`` and calibration data. Numerics: changes the function.
"""

from __future__ import annotations

from collections import Counter

import torch

from sntfx.compress_utils import (CALIBRATION, LayerSelection, check_fraction, input_feature_norms, keep_top,
                                  nm_mask, reestimate_batchnorm)
from sntfx.pass_base import Numerics, Pass, PassContext, PassResult, Property, register_pass

__all__ = ["WandaPrune"]

@register_pass
class WandaPrune(LayerSelection, Pass):
    """Zero the weights with the lowest ``|W| * ||X||`` (activation-aware, no retraining).

    Args:
        sparsity: fraction of zeros in [0, 1) (unstructured; default 0.5); not with ``pattern``.
        pattern: ``"N:M"`` semi-structured sparsity instead (e.g. ``"2:4"``).
        scope: ``row`` (per output channel, Wanda) or ``layer``.
        recalibrate_bn: re-estimate BatchNorm statistics after pruning.
        exclude_first / exclude_last: keep the first / last layer dense.
        exclude: glob patterns over module names to keep dense (e.g. ``["features.0"]``).
    """

    name = "prune_wanda"
    requires = frozenset({Property.FOLDED})
    needs_eval = True

    def __init__(self, sparsity: float | None = None, pattern: str | None = None, scope: str = "row",
                 recalibrate_bn: bool = False, exclude_first: bool = False, exclude_last: bool = False, exclude=None):
        if pattern is not None:
            from .prune_nm import NMPrune

            if sparsity is not None:
                raise ValueError(f"an N:M pattern fixes the sparsity ({pattern} keeps N of every M): give a sparsity "
                                 "or a pattern, not both")
            self.n, self.m = NMPrune.parse_pattern(pattern)
            self.sparsity = None
        else:
            self.sparsity = check_fraction(0.5 if sparsity is None else sparsity, "sparsity")
            self.n = self.m = None
        if scope not in ("row", "layer"):
            raise ValueError(f"scope must be 'row' or 'layer', got {scope!r}")
        self.pattern = None if pattern is None else f"{self.n}:{self.m}"
        self.scope, self.recalibrate_bn = scope, bool(recalibrate_bn)
        self._select_options(exclude_first, exclude_last, exclude)

    @property
    def numerics(self) -> Numerics:
        return Numerics.EXACT if self.sparsity == 0 else Numerics.CHANGES

    def params(self):
        return {"sparsity": self.sparsity, "pattern": self.pattern, "scope": self.scope,
                "recalibrate_bn": self.recalibrate_bn, **self.selection_params()}

    def check(self, ctx: PassContext) -> str | None:
        return None if ctx.calibration else CALIBRATION

    def run(self, gm, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        layers, excluded = self.selected_layers(gm, stats)
        norms = input_feature_norms(gm, layers, ctx.calibration)
        info: dict = {"layers": {}, "excluded": excluded}
        with torch.no_grad():
            for name, layer in layers:
                if name not in norms:
                    stats["skip: not called on the calibration data"] += 1
                    continue
                if self.m is not None and layer.weight.shape[1] % self.m:
                    stats[f"skip: in-channels not divisible by {self.m}"] += 1
                    continue
                score = layer.weight.abs() * norms[name]
                keep = nm_mask(score, self.n, self.m) if self.m is not None else \
                    keep_top(score, self.sparsity, per_row=self.scope == "row")
                layer.weight.mul_(keep.to(layer.weight.dtype))
                info["layers"][name] = float((layer.weight == 0).float().mean())
                stats["pruned layers"] += 1
        if self.recalibrate_bn:
            stats["batchnorms re-estimated"] = reestimate_batchnorm(gm, ctx.calibration)
        total = sum(m.weight.numel() for _, m in layers)
        info["sparsity"] = sum(int((m.weight == 0).sum()) for _, m in layers) / max(total, 1)
        return PassResult(gm, stats["pruned layers"] > 0, stats, info)

    def replay(self, gm, ctx: PassContext) -> PassResult:
        """Pruning changes only weights and statistics, which a rebuilt model loads from its file."""
        return PassResult(gm, False, Counter())
