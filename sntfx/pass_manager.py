"""PassManager: run a list of passes, checked and measured.

Before anything runs, the manager walks the pipeline with the properties the
model has (:func:`graph_properties`) and each pass's ``requires`` /
``provides`` / ``invalidates``; a pass whose requirement is missing stops the
pipeline with a :class:`~sntfx.errors.PipelineOrderError` that names the pass
that would provide it.

It then checks every pass's preconditions on the context (``Pass.check``,
``Pass.check_replay`` when a saved model is rebuilt), again before anything
runs, and copies the model once if the caller asked for a copy.

For each pass it then: switches to eval mode when the pass asks (and back
afterwards); runs it (``replay`` while a saved model is rebuilt); checks that
an in-place pass returned the module it was given; lints and recompiles the graph; optionally compares outputs with the previous
ones when the pass claims exactness (``check=True``); records the pass in the
model's recipe (``gm.meta["sntfx"]["pipeline"]``); and adds a row to the
:class:`PipelineReport` (time, nodes and parameters before/after, stats).

Example::

    pm = PassManager.from_string("snt(style=linear,ratio=2),fold", check=True)
    report = pm.run(gm, PassContext(example_inputs=(x,)))
    folded = report.graph_module
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.fx as fx

from .errors import EquivalenceError, PassError, PassPreconditionError, PipelineOrderError, SntfxError
from .pass_base import Numerics, Pass, PassContext, PassResult, Property, parse_pipeline, registered_passes
from .graph_utils import count_parameters, mode
from .tracing import compare_outputs, sntfx_meta

__all__ = ["PassManager", "PassReport", "PipelineReport", "Instrument", "graph_properties", "count_parameters",
           "mode"]

log = logging.getLogger(__name__)


# Instruments attached to every pipeline in this process: for test suites and debugging sessions
# (``sntfx.testing.instrument_every_pipeline``), so that no test has to patch the manager.
_PROCESS_INSTRUMENTS: list = []


def graph_properties(gm: fx.GraphModule) -> set[Property]:
    """The properties ``gm`` has now, derived from the graph itself."""
    from .blocks import is_expanded  # local: blocks import nothing from here

    props: set[Property] = set()
    nodes = [n for n in gm.graph.nodes if n.op not in ("output",)]
    if nodes and all("tensor_meta" in n.meta for n in nodes if n.op != "get_attr"):
        props.add(Property.SHAPES)
    if is_expanded(gm):
        props.add(Property.EXPANDED)
    else:
        props.add(Property.FOLDED)
    return props


class Instrument(Protocol):
    """Attached from outside the passes: called around each pass."""

    def before_pass(self, p: Pass, gm: fx.GraphModule) -> None: ...

    def after_pass(self, p: Pass, result: PassResult) -> None: ...


@dataclass
class PassReport:
    """One pass's row in the pipeline report."""

    name: str
    spec: str
    seconds: float
    nodes_before: int
    nodes_after: int
    params_before: int
    params_after: int
    modified: bool
    numerics: str
    stats: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    max_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PipelineReport:
    """What a pipeline did, pass by pass; ``graph_module`` is the result."""

    graph_module: fx.GraphModule
    passes: list[PassReport]

    @property
    def modified(self) -> bool:
        return any(p.modified for p in self.passes)

    def to_dict(self) -> dict[str, Any]:
        return {"passes": [p.to_dict() for p in self.passes]}

    def __str__(self) -> str:
        lines = [f"{'pass':<28}{'time':>9}{'nodes':>15}{'params':>25}  stats"]
        for p in self.passes:
            stats = ", ".join(f"{k}={v}" for k, v in sorted(p.stats.items()))
            lines.append(
                f"{p.spec[:27]:<28}{p.seconds:>8.3f}s{p.nodes_before:>7}->{p.nodes_after:<6}"
                f"{p.params_before:>12}->{p.params_after:<11}  {stats}"
            )
        return "\n".join(lines)


class PassManager:
    """Compose passes; validate their order; run, lint, check and report.

    Args:
        passes: pass instances, or a pipeline string.
        check: compare outputs before/after each pass that claims exactness
            (needs ``ctx.example_inputs``) and raise
            :class:`~sntfx.errors.EquivalenceError` beyond its tolerance.
        instruments: objects with ``before_pass`` / ``after_pass`` hooks.
    """

    def __init__(
        self,
        passes: Sequence[Pass] | str,
        *,
        check: bool = False,
        instruments: Sequence[Instrument] = (),
    ):
        if isinstance(passes, str):
            passes = parse_pipeline(passes)
        for p in passes:
            if not isinstance(p, Pass):
                raise TypeError(f"PassManager takes Pass instances, got {type(p).__name__}")
        self.passes = list(passes)
        self.check = check
        self.instruments = list(instruments)

    @classmethod
    def from_string(cls, text: str, **kwargs: Any) -> PassManager:
        return cls(parse_pipeline(text), **kwargs)

    def validate(self, initial: set[Property]) -> None:
        """Raise PipelineOrderError if some pass's requirement is not met in order."""
        state = set(initial)
        done: list[str] = []
        for p in self.passes:
            missing = set(p.requires) - state
            if missing:
                names = ", ".join(sorted(m.value for m in missing))
                providers = sorted(
                    name for name, cls in registered_passes().items() if set(cls.provides) & missing
                )
                hint = f"; insert one of [{', '.join(providers)}] before it" if providers else ""
                after = f" after [{', '.join(done)}]" if done else " at the start of the pipeline"
                raise PipelineOrderError(
                    f"pass '{p.name}' requires {names}, which the model does not have{after}{hint}"
                )
            state -= set(p.invalidates)
            state |= set(p.provides)
            done.append(p.name)

    def check_preconditions(self, ctx: PassContext) -> None:
        """Raise PassPreconditionError for the first pass that lacks something in ``ctx``."""
        for position, p in enumerate(self.passes):
            missing = p.check_replay(ctx) if ctx.rebuild else p.check(ctx)
            if missing:
                raise PassPreconditionError(p.name, missing, position=position)

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None, *, inplace: bool = True) -> PipelineReport:
        """Run every pass on ``gm`` (or on one copy of it, ``inplace=False``); return the report.

        The result is ``report.graph_module``. Order and preconditions are
        checked for the whole pipeline first: when one fails, nothing has run.
        """
        if not isinstance(gm, fx.GraphModule):
            raise TypeError("PassManager.run needs a torch.fx.GraphModule; call sntfx.trace(model, inputs) first")
        ctx = ctx or PassContext()
        self.validate(graph_properties(gm))
        self.check_preconditions(ctx)
        if not inplace:
            gm = copy.deepcopy(gm)
        instruments = [*self.instruments, *_PROCESS_INSTRUMENTS]
        reports: list[PassReport] = []
        done: list[str] = []
        for p in self.passes:
            reference = None
            wants_check = self.check and p.numerics is not Numerics.CHANGES and ctx.example_inputs
            if wants_check:
                reference = _eval_outputs(gm, ctx.example_inputs)
            nodes_before, params_before = len(gm.graph.nodes), count_parameters(gm)
            for inst in instruments:
                inst.before_pass(p, gm)
            was_training = gm.training
            start = time.perf_counter()
            try:
                with mode(gm, training=False) if p.needs_eval else contextlib.nullcontext():
                    result = p.replay(gm, ctx) if ctx.rebuild else p.run(gm, ctx)
            except PassError:
                raise
            except SntfxError as exc:
                raise PassError(p.name, str(exc), previous=tuple(done)) from exc
            except Exception as exc:
                raise PassError(
                    p.name, f"{type(exc).__name__}: {exc}", previous=tuple(done)
                ) from exc
            seconds = time.perf_counter() - start
            if not isinstance(result, PassResult) or not isinstance(result.graph_module, fx.GraphModule):
                raise PassError(p.name, "run() must return PassResult(graph_module, modified, stats)")
            new_gm = result.graph_module
            if p.inplace and new_gm is not gm:
                raise PassError(p.name, "declares inplace=True but returned a different GraphModule; rewrite the "
                                "module it is given, or declare inplace = False", previous=tuple(done))
            if new_gm is not gm:
                new_gm.train(was_training)
                new_gm.meta.update({k: v for k, v in gm.meta.items() if k not in new_gm.meta})
            try:
                new_gm.graph.lint()
            except Exception as exc:
                raise PassError(p.name, f"left a malformed graph: {exc}", previous=tuple(done)) from exc
            new_gm.recompile()
            max_error = result.info.get("max_block_error")
            if reference is not None:
                err = compare_outputs(reference, _eval_outputs(new_gm, ctx.example_inputs))
                max_error = err
                if not err <= p.tolerance:
                    raise EquivalenceError(
                        p.name,
                        f"claims {p.numerics.value} numerics but changed the outputs by a relative "
                        f"error of {err:.3g} (tolerance {p.tolerance:g})",
                        previous=tuple(done),
                    )
            for inst in instruments:
                inst.after_pass(p, result)
            if result.modified or ctx.rebuild:
                # A replayed recipe keeps every step it replays, changed or not.
                sntfx_meta(new_gm).setdefault("pipeline", []).append({"name": p.name, "params": p.params()})
            reports.append(
                PassReport(
                    name=p.name,
                    spec=p.spec(),
                    seconds=seconds,
                    nodes_before=nodes_before,
                    nodes_after=len(new_gm.graph.nodes),
                    params_before=params_before,
                    params_after=count_parameters(new_gm),
                    modified=result.modified,
                    numerics=p.numerics.value,
                    stats=dict(Counter(result.stats)),
                    info=dict(result.info),
                    max_error=max_error,
                )
            )
            log.info("pass %s: modified=%s in %.3fs %s", p.spec(), result.modified, seconds, dict(result.stats))
            done.append(p.name)
            gm = new_gm
        return PipelineReport(graph_module=gm, passes=reports)


def _eval_outputs(gm: fx.GraphModule, inputs: tuple) -> Any:
    with mode(gm, training=False), torch.no_grad():
        return gm(*inputs)
