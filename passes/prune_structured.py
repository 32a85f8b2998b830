"""``prune_channels``: structured channel pruning with torch-pruning.

Removes whole output channels (and, through torch-pruning's dependency
graph, everything coupled to them: the next layer's input channels,
BatchNorms, residual adds, concatenations, depthwise convs, attention
heads), so the result is a physically smaller model that runs, saves, loads
and exports. Channel importance: group magnitude (default), Taylor (needs
``ctx.calibration`` batches with labels) or LAMP. ``round_to`` keeps channel
counts multiples of e.g. 8 for hardware. The classifier is never pruned.

For save/load the pass records the resulting parameter shapes
(``params()["shapes"]``); replaying the recipe prunes to those shapes.

Requires: ``folded`` and example inputs. Keeps shapes current (re-propagated).
Numerics: changes the function.
"""

from __future__ import annotations

from collections import Counter

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from sntfx.blocks.base import LAYER_CLASSES
from sntfx.compress_utils import (CALIBRATION, check_exclude, check_fraction, prunable_layers, reestimate_batchnorm,
                                  select_layers)
from sntfx.errors import SntfxError
from sntfx.graph_utils import count_parameters
from sntfx.pass_base import Numerics, Pass, PassContext, PassResult, Property, register_pass
from sntfx.tracing import propagate_shapes

__all__ = ["StructuredPrune"]

IMPORTANCES = ("magnitude", "taylor", "lamp")


def _heads(model: nn.Module) -> dict:
    """Attention modules torch-pruning must prune head-consistently."""
    heads = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            heads[m] = m.num_heads
        elif hasattr(m, "qkv") and hasattr(m, "num_heads") and isinstance(m.qkv, nn.Linear):
            heads[m.qkv] = m.num_heads
    return heads


@register_pass
class StructuredPrune(Pass):
    """Remove ``sparsity`` of the channels of each prunable group (torch-pruning)."""

    name = "prune_channels"
    requires = frozenset({Property.FOLDED})
    provides = frozenset({Property.SHAPES})
    needs_eval = True

    def __init__(self, sparsity: float = 0.3, importance: str = "magnitude", round_to: int | None = None,
                 global_pruning: bool = False, exclude_first: bool = False, shapes: dict | None = None,
                 recalibrate_bn: bool = False, exclude=None):
        self.sparsity = check_fraction(sparsity, "channel sparsity")
        if importance not in IMPORTANCES:
            raise ValueError(f"unknown importance '{importance}'; use {', '.join(IMPORTANCES)}")
        if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
        self.importance, self.round_to, self.global_pruning = importance, round_to, bool(global_pruning)
        self.exclude_first, self.shapes = bool(exclude_first), shapes
        self.recalibrate_bn, self.exclude = bool(recalibrate_bn), check_exclude(exclude)

    @property
    def numerics(self) -> Numerics:
        return Numerics.CHANGES

    def params(self):
        return {"sparsity": self.sparsity, "importance": self.importance, "round_to": self.round_to,
                "global_pruning": self.global_pruning, "exclude_first": self.exclude_first, "shapes": self.shapes,
                "recalibrate_bn": self.recalibrate_bn, "exclude": list(self.exclude)}

    def check(self, ctx: PassContext) -> str | None:
        if not ctx.example_inputs:
            return "example inputs (PassContext(example_inputs=(x,)), or --data on the command line)"
        if self.importance == "taylor" and not ctx.calibration_labeled:
            return "labelled batches for Taylor importance (PassContext(calibration_labeled=[(x, y)]), or --data)"
        if self.recalibrate_bn and not ctx.calibration:
            return CALIBRATION
        return None

    def check_replay(self, ctx: PassContext) -> str | None:
        if not ctx.example_inputs:
            return "example inputs (the recipe's input spec) to trace the channel dependencies"
        if not self.shapes:
            return "the parameter shapes recorded when the model was pruned (this recipe has none)"
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        import torch_pruning as tp

        before = count_parameters(gm)
        excluded = self._prune(gm, tuple(ctx.example_inputs), ctx, tp)
        self.shapes = {k: list(v.shape) for k, v in gm.state_dict().items()}
        result = self._result(gm, ctx, before, modified=None)
        if excluded:
            result.stats["excluded layers"] = len(excluded)
            result.info["excluded"] = excluded
        if self.recalibrate_bn:
            result.stats["batchnorms re-estimated"] = reestimate_batchnorm(gm, ctx.calibration)
        return result

    def replay(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Prune to the recorded shapes (which channels survived does not matter: the weights are loaded next)."""
        before = count_parameters(gm)
        self._prune_to(gm, tuple(ctx.example_inputs), self.shapes)
        return self._result(gm, ctx, before, modified=True)

    def _result(self, gm, ctx: PassContext, before: int, modified: bool | None) -> PassResult:
        propagate_shapes(gm, ctx.example_inputs)
        after = count_parameters(gm)
        stats = Counter({"parameters removed": before - after})
        info = {"params_before": before, "params_after": after,
                "channels": {n: int(m.weight.shape[0]) for n, m in prunable_layers(gm)}}
        return PassResult(gm, after != before if modified is None else modified, stats, info)

    def _prune(self, gm, inputs, ctx, tp) -> list[str]:
        layers = prunable_layers(gm)
        ignored = [layers[-1][1]] if layers else []  # the classifier keeps its outputs
        if self.exclude_first and layers:
            ignored.append(layers[0][1])
        excluded: list[str] = []
        if self.exclude:  # Torch-Pruning's ignored_layers keep their output channels
            _, excluded = select_layers(gm, exclude=self.exclude)
            ignored += [gm.get_submodule(n) for n in excluded]
        if self.importance == "magnitude":
            imp = tp.importance.GroupMagnitudeImportance(p=2)
        elif self.importance == "lamp":
            imp = tp.importance.LAMPImportance(p=2)
        else:
            imp = tp.importance.GroupTaylorImportance()
        pruner = tp.pruner.BasePruner(
            gm, inputs, importance=imp, pruning_ratio=self.sparsity, ignored_layers=ignored,
            round_to=self.round_to, global_pruning=self.global_pruning, num_heads=_heads(gm),
        )
        if self.importance == "taylor":
            gm.zero_grad()
            for x, y in ctx.calibration_labeled:
                F.cross_entropy(gm(x), y).backward()
        pruner.step()
        gm.zero_grad(set_to_none=True)
        return excluded

    def _prune_to(self, gm, inputs, shapes: dict) -> None:
        """Prune trailing channels until every parameter has its recorded shape."""
        import torch_pruning as tp

        graph = tp.DependencyGraph().build_dependency(gm, example_inputs=inputs)
        for name, m in list(gm.named_modules()):
            key = f"{name}.weight"
            if key not in shapes or not isinstance(m, tuple(LAYER_CLASSES.values())):
                continue
            target, current = shapes[key][0], m.weight.shape[0]
            if current > target:
                fn = tp.prune_linear_out_channels if isinstance(m, nn.Linear) else tp.prune_conv_out_channels
                group = graph.get_pruning_group(m, fn, idxs=list(range(target, current)))
                group.prune()
        got = {k: list(v.shape) for k, v in gm.state_dict().items()}
        wrong = [k for k in shapes if got.get(k) != shapes[k]]
        if wrong:
            raise SntfxError(f"replaying structured pruning did not reproduce the saved shapes (e.g. {wrong[:3]})")

