"""``fold``: collapse every SNT block back into the layer it replaced, exactly.

Rewrites (module swap; the graph keeps its nodes)::

    %y = call_module[target=features.3](%x)     # sntfx.blocks.BranchBlock
      ->
    %y = call_module[target=features.3](%x)     # nn.Conv2d, original shape

Each block computes its single equivalent weight and bias in float64 (see
:mod:`sntfx.blocks` for the algebra of each style) and casts back to its
dtype. A bias-free layer whose branch norms carried a shift hands that bias
to the BatchNorm that consumes it: ``running_mean -= bias``, exact in eval
mode. After fold the model has the original layers and parameter count.

The pass measures each block against its folded layer on the block's own
input (recorded from ``ctx.example_inputs``, or random inputs of the recorded
shape) and reports the largest relative error in ``info["max_block_error"]``.

Requires: nothing (a model without blocks is left alone, ``modified=False``).
Provides: ``folded``. Numerics: exact up to float rounding (tolerance 1e-5).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from sntfx.blocks import SNTBlock
from sntfx.errors import SntfxError
from sntfx.graph_utils import call_sites, find_bias_sink, output_shape, set_module
from sntfx.pass_base import Numerics, Pass, PassContext, PassResult, Property, register_pass
from sntfx.tracing import compare_outputs

__all__ = ["SNTFold"]


@register_pass
class SNTFold(Pass):
    """Fold every SNT block into one layer of the original type and shape."""

    name = "fold"
    provides = frozenset({Property.FOLDED})
    invalidates = frozenset({Property.EXPANDED})
    needs_eval = True
    tolerance = 1e-5

    @property
    def numerics(self) -> Numerics:
        return Numerics.EXACT

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return self._fold(gm, ctx, measure=True)

    def replay(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Fold without measuring each block's error (the weights are about to be loaded)."""
        return self._fold(gm, ctx, measure=False)

    def _fold(self, gm: fx.GraphModule, ctx: PassContext, *, measure: bool) -> PassResult:
        blocks = [(name, m) for name, m in gm.named_modules() if isinstance(m, SNTBlock)]
        if not blocks:
            return PassResult(gm, False, Counter({"no blocks": 1}))
        inputs = _block_inputs(gm, [n for n, _ in blocks], ctx) if measure else {}
        stats: Counter = Counter()
        errors: dict[str, float] = {}
        for name, block in blocks:
            layer, residual = block.fold()
            if residual is not None:
                c = block.config
                sink = find_bias_sink(gm, name, c.out_features, linear=not c.is_conv)
                if sink is None:
                    raise SntfxError(
                        f"block '{name}' folds to a bias, but its layer has none and its output no longer "
                        "feeds a single BatchNorm that could absorb it (was the graph edited after expansion?)"
                    )
                bn = gm.get_submodule(sink)
                with torch.no_grad():
                    bn.running_mean.sub_(residual.to(bn.running_mean))
                stats["bias moved into BatchNorm"] += 1
            x = inputs.get(name)
            if x is not None:
                with torch.no_grad():
                    want = block(x)
                    got = layer(x)
                    if residual is not None:
                        shape = [1, -1] + [1] * (got.dim() - 2)
                        got = got + residual.to(got).reshape(shape)
                errors[name] = compare_outputs(want, got)
            set_module(gm, name, layer)
            stats[f"folded: {block.style}"] += 1
        info = {}
        if errors:
            worst = max(errors, key=errors.get)
            info = {"max_block_error": errors[worst], "worst_block": worst, "block_errors": errors}
        return PassResult(gm, True, stats, info)


def _block_inputs(gm: fx.GraphModule, names: list[str], ctx: PassContext) -> dict[str, torch.Tensor]:
    """Each block's input: recorded on the example inputs, or random of the recorded shape."""
    captured: dict[str, torch.Tensor] = {}
    if ctx.example_inputs:
        hooks = []
        for name in names:
            def hook(mod, args, name=name):
                if name not in captured and args and isinstance(args[0], torch.Tensor):
                    captured[name] = args[0].detach()
            hooks.append(gm.get_submodule(name).register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                gm(*ctx.example_inputs)
        finally:
            for h in hooks:
                h.remove()
        return captured
    gen = ctx.generator(salt=17)
    for name in names:
        sites = call_sites(gm, name)
        if sites and isinstance(sites[0].args[0], fx.Node):
            shape = output_shape(sites[0].args[0])
            if shape is not None:
                p = next(gm.get_submodule(name).parameters())
                captured[name] = torch.randn(shape, generator=gen).to(p)
    return captured
