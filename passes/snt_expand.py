"""``snt``: expand every eligible conv/linear layer into an over-parameterized block.

Rewrites (module swap; the graph keeps its nodes)::

    %y = call_module[target=layer1.0.conv1](%x)        # nn.Conv2d
      ->
    %y = call_module[target=layer1.0.conv1](%x)        # sntfx.blocks.LinearExpansion

Eligible: ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Linear`` called as modules
(any kernel, stride, padding and padding mode, dilation, groups, bias), and
subclasses that keep their parent's forward. A layer called at several places
becomes one shared block. Skipped, with the reason counted in ``stats``:
layers whose weight is shared with another module, subclasses with their own
forward, layers inside modules kept opaque by tracing, layers the policy
excludes, and convolutions or matmuls called functionally on raw parameters.

Styles, folding algebra and initialisation: :mod:`sntfx.blocks`. For
``branch`` styles on a bias-free layer, the branch norms keep their shift only
when the layer's output feeds a single BatchNorm (the fold moves the bias
there); otherwise they are scale-only.

Requires: nothing. Provides: ``expanded``. Numerics: changes the function
(fresh initialisation), or exact with ``preserve=True``.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import nn

from sntfx.blocks import SNTBlock, get_style, layer_kind, make_block
from sntfx.graph_utils import call_sites, find_bias_sink, is_plain, set_module, shared_parameter_owners
from sntfx.pass_base import Numerics, Pass, PassContext, PassResult, Property, register_pass
from sntfx.policy import Policy

__all__ = ["SNTExpand", "FUNCTIONAL_LAYERS"]

log = logging.getLogger(__name__)

FUNCTIONAL_LAYERS = {
    F.conv1d: "conv",
    F.conv2d: "conv",
    F.conv3d: "conv",
    F.linear: "linear",
}


@register_pass
class SNTExpand(Pass):
    """Expand eligible layers into SNT blocks.

    Args:
        style: ``linear``, ``branch`` or ``qa-branch`` (overrides the policy's default).
        ratio: expansion ratio for ``linear`` (overrides the policy's default).
        policy: a :class:`~sntfx.policy.Policy`, its dict, or a JSON/TOML file path.
        preserve: initialise every block to compute exactly the layer it replaces.
        online: ``linear`` blocks compose their kernel and run one conv per call.
        seed: initialisation seed (default: the context's seed).

    Example::

        pm = PassManager([SNTExpand(style="branch")])
    """

    name = "snt"
    provides = frozenset({Property.EXPANDED})
    invalidates = frozenset({Property.FOLDED})

    def __init__(
        self,
        style: str | None = None,
        ratio: int | None = None,
        policy: Policy | dict | str | Path | None = None,
        preserve: bool = False,
        online: bool = False,
        seed: int | None = None,
    ):
        if isinstance(policy, (str, Path)):
            policy = Policy.from_file(policy)
        elif isinstance(policy, dict):
            policy = Policy.from_dict(policy)
        policy = policy or Policy()
        overrides: dict[str, Any] = {}
        if style is not None:
            overrides["style"] = style
        if ratio is not None:
            overrides["ratio"] = ratio
        self.policy = Policy.from_dict({**policy.to_dict(), **overrides}) if overrides else policy
        self.preserve = bool(preserve)
        self.online = bool(online)
        self.seed = seed

    @property
    def numerics(self) -> Numerics:
        return Numerics.EXACT if self.preserve else Numerics.CHANGES

    def params(self) -> dict[str, Any]:
        return {"policy": self.policy.to_dict(), "preserve": self.preserve, "online": self.online, "seed": self.seed}

    def spec(self) -> str:
        return f"snt(style={self.policy.style},ratio={self.policy.ratio}" + (",preserve=true)" if self.preserve else ")")

    def run(self, gm, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        modules = dict(gm.named_modules())
        targets: list[str] = []
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target not in targets and layer_kind(modules[node.target]):
                targets.append(node.target)
            elif node.op == "call_function" and node.target in FUNCTIONAL_LAYERS:
                stats[f"skip: functional {FUNCTIONAL_LAYERS[node.target]}"] += 1

        # Layers the graph never calls sit inside an opaque (leaf) module.
        for path, mod in modules.items():
            if layer_kind(mod) and path not in targets and not _inside(path, targets) and not isinstance(mod, SNTBlock):
                if not any(isinstance(modules.get(p), SNTBlock) for p in _ancestors(path)):
                    stats["skip: inside opaque module"] += 1

        shared = shared_parameter_owners(gm)
        gen_seed = self.seed if self.seed is not None else ctx.seed
        gen = PassContext(seed=gen_seed).generator()
        expanded = 0
        for index, path in enumerate(targets):
            layer = modules[path]
            kind = layer_kind(layer)
            if not is_plain(layer, nn.Conv1d, nn.Conv2d, nn.Linear):
                stats[f"skip: custom forward ({type(layer).__name__})"] += 1
                continue
            if any(id(p) in shared for p in layer.parameters(recurse=False)):
                stats["skip: shared weight"] += 1
                continue
            decision = self.policy.decide(
                path, kind, layer.weight.numel(), first=index == 0, last=index == len(targets) - 1
            )
            if not decision.expand:
                stats[f"skip: {decision.reason}"] += 1
                continue
            center = True
            style = get_style(decision.style)
            if style.bias_sink and layer.bias is None:
                out = layer.out_features if kind == "linear" else layer.out_channels
                center = find_bias_sink(gm, path, out, linear=kind == "linear") is not None
            block = make_block(
                layer, decision.style, ratio=decision.ratio, center=center, preserve=self.preserve, gen=gen
            )
            if self.online and style.trains_online:
                block.online = True
            set_module(gm, path, block)
            expanded += 1
            stats[f"expanded: {decision.style}"] += 1
            if len(call_sites(gm, path)) > 1:
                stats["shared block (several call sites)"] += 1
        log.info("snt: expanded %d of %d layers", expanded, len(targets))
        return PassResult(gm, expanded > 0, stats)


def _ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _inside(path: str, targets: list[str]) -> bool:
    return any(path.startswith(t + ".") for t in targets)

