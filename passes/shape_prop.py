"""``shapes``: record tensor shapes on every node (``node.meta["tensor_meta"]``).

Runs the model once on ``ctx.example_inputs`` in eval mode with
``torch.fx.passes.shape_prop.ShapeProp``. Insert it after a pass that
invalidates shapes (structured pruning) when a later pass requires them.

Requires: example inputs in the context. Provides: ``shapes``. Numerics: exact
(the model is not changed).
"""

from __future__ import annotations

from collections import Counter

from sntfx.pass_base import Pass, PassContext, PassResult, Property, register_pass
from sntfx.tracing import propagate_shapes

__all__ = ["ShapePropagation"]


@register_pass
class ShapePropagation(Pass):
    """Propagate shapes from ``ctx.example_inputs`` into node metadata."""

    name = "shapes"
    provides = frozenset({Property.SHAPES})

    needs_eval = True

    def check(self, ctx: PassContext) -> str | None:
        return None if ctx.example_inputs else "example inputs (PassContext(example_inputs=(x,)))"

    check_replay = check

    def run(self, gm, ctx: PassContext) -> PassResult:
        propagate_shapes(gm, ctx.example_inputs)
        # Metadata only: the module and its graph are unchanged.
        return PassResult(gm, False, Counter({"nodes": len(gm.graph.nodes)}))
