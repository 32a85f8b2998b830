"""Helpers for testing passes, shipped with the library so that users writing passes can use them too.

* :class:`WellFormed`: an instrument that lints the graph and checks that
  every ``call_module`` target exists after each pass.
* :func:`instrument_every_pipeline`: attach instruments to every
  :class:`~sntfx.pass_manager.PassManager` run in this process for the
  duration of a ``with`` block (test suites, debugging), without patching.
* :func:`assert_equivalent`: run a pass on a copy of a model and check the
  outputs against the original at the pass's declared tolerance.

Example (pytest)::

    @pytest.fixture(autouse=True)
    def well_formed():
        with sntfx.testing.instrument_every_pipeline(sntfx.testing.WellFormed()):
            yield
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx

from .errors import EquivalenceError
from .graph_utils import mode
from .pass_base import Numerics, Pass, PassContext, PassResult
from .pass_manager import _PROCESS_INSTRUMENTS, PassManager, PipelineReport
from .tracing import compare_outputs

__all__ = ["WellFormed", "instrument_every_pipeline", "assert_equivalent"]


class WellFormed:
    """Instrument: after each pass the graph lints and every called submodule exists."""

    def before_pass(self, p: Pass, gm: fx.GraphModule) -> None:
        pass

    def after_pass(self, p: Pass, result: PassResult) -> None:
        gm = result.graph_module
        gm.graph.lint()
        for node in gm.graph.nodes:
            if node.op == "call_module":
                gm.get_submodule(node.target)


@contextlib.contextmanager
def instrument_every_pipeline(*instruments: Any) -> Iterator[None]:
    """Attach ``instruments`` to every pipeline run in this process inside the ``with`` block."""
    _PROCESS_INSTRUMENTS.extend(instruments)
    try:
        yield
    finally:
        for inst in instruments:
            _PROCESS_INSTRUMENTS.remove(inst)


def assert_equivalent(p: Pass, gm: fx.GraphModule, inputs: tuple, *, tolerance: float | None = None,
                      ctx: PassContext | None = None) -> PipelineReport:
    """Run ``p`` on a copy of ``gm``; raise EquivalenceError if outputs moved beyond ``tolerance``.

    ``tolerance`` defaults to the pass's own; a pass that declares
    :attr:`Numerics.CHANGES` is compared only when a tolerance is given.
    Returns the report (the rewritten copy is ``report.graph_module``).
    """
    ctx = ctx or PassContext(example_inputs=inputs)
    tol = p.tolerance if tolerance is None else tolerance
    with mode(gm, training=False), torch.no_grad():
        want = gm(*inputs)
    report = PassManager([p]).run(gm, ctx, inplace=False)
    if tolerance is None and p.numerics is Numerics.CHANGES:
        return report
    out = report.graph_module
    with mode(out, training=False), torch.no_grad():
        got = out(*inputs)
    err = compare_outputs(want, got)
    if not err <= tol:
        raise EquivalenceError(p.name, f"changed the outputs by a relative error of {err:.3g} (tolerance {tol:g})")
    return report
