"""The pass contract: what a pass declares, what it returns, how it is named.

A pass is an object with

* ``name``: the registered name used in pipeline strings (``"snt"``, ``"fold"``);
* ``requires`` / ``provides`` / ``invalidates``: :class:`Property` sets that
  the :class:`~sntfx.pass_manager.PassManager` checks before running anything;
* ``needs_eval``: run in eval mode (BatchNorm uses running statistics); the
  manager switches the mode and restores it, passes never do;
* ``numerics``: whether outputs stay :attr:`Numerics.EXACT`, stay within
  ``tolerance`` (:attr:`Numerics.TOLERANCE`), or change on purpose
  (:attr:`Numerics.CHANGES`);
* ``inplace``: the pass rewrites the module it is given and returns it (the
  manager checks); copying, when the caller wants it, happens once, at the
  entry of :meth:`~sntfx.pass_manager.PassManager.run`;
* ``check(ctx)`` / ``check_replay(ctx)``: what the pass needs from the context
  (example inputs, calibration data), checked for the whole pipeline before
  any pass runs, so a pipeline never fails half done for a missing input;
* ``run(gm, ctx) -> PassResult(gm, modified, stats)``;
* ``replay(gm, ctx)``: what the pass does while :func:`sntfx.load` rebuilds a
  saved model, whose weights are loaded afterwards: recreate the structure
  (modules, graph, shapes), skip data-dependent work. The default is ``run``,
  right for passes whose structure does not depend on the weights; a pass
  that only changes weights replays as a no-op, one that measures skips it.

Adding a pass is one module: a subclass decorated with :func:`register_pass`,
imported by ``sntfx.passes`` (or by your code before the pipeline is parsed).

Passes are registered by name with :func:`register_pass` so a pipeline can be
written as a string: ``parse_pipeline("snt(style=linear,ratio=4),fold")``.
"""

from __future__ import annotations

import abc
import enum
import inspect
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from .errors import PipelineError, SntfxError

__all__ = [
    "Property",
    "Numerics",
    "PassContext",
    "PassResult",
    "Pass",
    "register_pass",
    "get_pass_class",
    "registered_passes",
    "parse_pipeline",
    "format_pipeline",
    "pass_from_spec",
    "pass_parameters",
]


class Property(str, enum.Enum):
    """Facts about a graph module that passes require, provide or invalidate."""

    SHAPES = "shapes"  # node.meta["tensor_meta"] is current on every node
    EXPANDED = "expanded"  # the model holds SNT blocks
    FOLDED = "folded"  # the model holds no SNT block (original architecture)


class Numerics(str, enum.Enum):
    """What a pass does to the model's outputs."""

    EXACT = "exact"
    TOLERANCE = "within tolerance"
    CHANGES = "changes numerics"


@dataclass
class PassContext:
    """Everything a pass may use besides the graph; passed explicitly.

    Attributes:
        example_inputs: inputs for numerical checks and measurements.
        seed: seeds every random initialisation a pass does.
        rebuild: True while a saved recipe is replayed; the manager then
            calls each pass's ``replay`` instead of ``run``.
        calibration: batches of real inputs, for passes that calibrate
            (activation quantization).
        calibration_labeled: ``(inputs, labels)`` batches, for passes that
            need a loss (Taylor importance).
    """

    example_inputs: tuple | None = None
    seed: int = 0
    rebuild: bool = False
    calibration: list | None = None
    calibration_labeled: list | None = None

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded from ``seed`` (and a per-use ``salt``)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)


@dataclass
class PassResult:
    """What a pass returns.

    ``modified`` must be true exactly when the graph or a module changed.
    ``stats`` counts what happened, including skips with their reason
    (``stats["skip: shared weight"] += 1``). ``info`` holds measurements
    (e.g. ``max_block_error``).
    """

    graph_module: fx.GraphModule
    modified: bool
    stats: Counter = field(default_factory=Counter)
    info: dict[str, Any] = field(default_factory=dict)


class Pass(abc.ABC):
    """Base class of every sntfx pass. Subclasses set the class attributes."""

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[Property]] = frozenset()
    provides: ClassVar[frozenset[Property]] = frozenset()
    invalidates: ClassVar[frozenset[Property]] = frozenset()
    needs_eval: ClassVar[bool] = False
    inplace: ClassVar[bool] = True
    tolerance: ClassVar[float] = 1e-5
    #: Parameters added after files were saved, with the value such a file meant (applied on load only).
    legacy_params: ClassVar[dict[str, Any]] = {}

    @property
    def numerics(self) -> Numerics:
        """Override when it depends on the pass's parameters."""
        return Numerics.EXACT

    def params(self) -> dict[str, Any]:
        """JSON-able constructor arguments: ``type(self)(**self.params())`` rebuilds the pass."""
        return {}

    def check(self, ctx: PassContext) -> str | None:
        """What ``run`` needs from ``ctx`` and does not find (e.g. "example inputs"), or None."""
        return None

    def check_replay(self, ctx: PassContext) -> str | None:
        """What ``replay`` needs from ``ctx`` and does not find, or None."""
        return None

    @abc.abstractmethod
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Rewrite ``gm`` in place and say what happened."""

    def replay(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Redo the structural part of :meth:`run` while a saved model is rebuilt (see the module docstring)."""
        return self.run(gm, ctx)

    def spec(self) -> str:
        """This pass as a pipeline-string item, e.g. ``snt(style=linear,ratio=4)``."""
        simple = {k: v for k, v in self.params().items() if _is_scalar(v)}
        if not simple:
            return self.name
        inner = ",".join(f"{k}={_format_value(v)}" for k, v in simple.items())
        return f"{self.name}({inner})"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec()}>"


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name``."""
    if not cls.name or not re.fullmatch(r"[a-z][a-z0-9_]*", cls.name):
        raise ValueError(f"{cls.__name__}.name must be a lowercase identifier, got {cls.name!r}")
    other = _REGISTRY.get(cls.name)
    if other is not None and other is not cls:
        raise ValueError(f"pass name '{cls.name}' is taken by {other.__module__}.{other.__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """Name -> class of every registered pass."""
    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[Pass]:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise PipelineError(f"unknown pass '{name}'; registered passes: {known}") from None


def pass_from_spec(name: str, params: dict[str, Any]) -> Pass:
    """Instantiate a registered pass; bad parameters become a PipelineError."""
    cls = get_pass_class(name)
    accepted = pass_parameters(cls)
    if accepted is not None:
        unknown = [key for key in params if key not in accepted]
        if unknown:
            listing = (f"its parameters (with defaults): {', '.join(accepted.values())}" if accepted
                       else "it takes no parameters")
            raise PipelineError(f"pass '{name}' has no parameter {', '.join(repr(k) for k in unknown)}; {listing}")
    try:
        return cls(**params)
    except (TypeError, ValueError, SntfxError) as exc:
        raise PipelineError(f"pass '{name}': bad parameters {params}: {exc}") from exc


def pass_parameters(cls: type) -> dict[str, str] | None:
    """A pass class's parameters as ``{name: "name=default"}``, defaults written as a pipeline string takes them
    (``scope=global``, ``exclude=none``); None where it takes ``**kwargs`` (any name)."""
    if cls.__init__ is object.__init__:
        return {}
    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    out: dict[str, str] = {}
    for p in list(signature.parameters.values())[1:]:
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            out[p.name] = p.name if p.default is p.empty else f"{p.name}={_format_value(p.default)}"
    return out


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _format_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.\-*/:+]+", v) and _parse_value(v) == v:
        return v
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<punct>[(),=])|(?P<word>[^\s(),="]+))')


def _tokens(text: str):
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise PipelineError(f"cannot parse pipeline at character {pos}: {text[pos:pos + 20]!r}")
        pos = m.end()
        if m.group("str") is not None:
            raw = m.group("str")[1:-1]
            yield ("str", re.sub(r"\\(.)", r"\1", raw))
        elif m.group("punct") is not None:
            yield ("punct", m.group("punct"))
        elif m.group("word") is not None:
            yield ("word", m.group("word"))


def parse_pipeline(text: str) -> list[Pass]:
    """Parse ``"name(key=value,...),name2"`` into pass instances.

    Values are ints, floats, ``true``/``false``, ``none`` or strings (quote a
    string that contains punctuation: ``include="layer1.*"``).

    >>> [p.name for p in parse_pipeline("snt(style=linear,ratio=4),fold")]
    ['snt', 'fold']
    """
    toks = list(_tokens(text))
    passes: list[Pass] = []
    i = 0

    def expect(kind: str, value: str | None = None) -> str:
        nonlocal i
        if i >= len(toks):
            raise PipelineError(f"pipeline {text!r} ends early: expected {value or kind}")
        k, v = toks[i]
        if k != kind or (value is not None and v != value):
            raise PipelineError(f"pipeline {text!r}: expected {value or kind}, found {v!r}")
        i += 1
        return v

    while i < len(toks):
        name = expect("word")
        params: dict[str, Any] = {}
        if i < len(toks) and toks[i] == ("punct", "("):
            i += 1
            while toks[i:i + 1] != [("punct", ")")]:
                key = expect("word")
                expect("punct", "=")
                if i >= len(toks):
                    raise PipelineError(f"pipeline {text!r}: missing value for '{key}'")
                kind, val = toks[i]
                i += 1
                if kind == "punct":
                    raise PipelineError(f"pipeline {text!r}: missing value for '{key}'")
                params[key] = val if kind == "str" else _parse_value(val)
                if toks[i:i + 1] == [("punct", ",")]:
                    i += 1
                if i >= len(toks):
                    raise PipelineError(f"pipeline {text!r}: missing ')' after '{name}('")
            i += 1
        passes.append(pass_from_spec(name, params))
        if i < len(toks):
            expect("punct", ",")
            if i >= len(toks):
                raise PipelineError(f"pipeline {text!r} ends with a comma")
    if not passes:
        raise PipelineError("empty pipeline: give at least one pass, e.g. 'snt,fold'")
    return passes


def format_pipeline(passes: list[Pass]) -> str:
    """Inverse of :func:`parse_pipeline` for passes with scalar parameters."""
    return ",".join(p.spec() for p in passes)
