"""Option types and checks shared by the commands: finite numbers, non-blank text, options that must
not be ignored, the trust and initial-weights options, model-spec and file helpers."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import SntfxError


def exclude_option(what: str = "Leave conv/linear layers whose module name matches GLOB alone"):
    """``--exclude GLOB`` (repeatable): layers left alone, matched against module names; ``what`` starts the help."""
    return click.option("--exclude", multiple=True, type=TEXT, metavar="GLOB",
                        help=f"{what} (repeatable; e.g. --exclude features.0 --exclude '*.downsample.*'; "
                             "`sntfx inspect` lists the names).")


def alias(old: str, dest: str, **kwargs):
    """A hidden old spelling of an option: ``@alias("--act-method", "act_method_alias")``."""
    return click.option(old, dest, hidden=True, default=None, **kwargs)


def merge_alias(value, old_value, dest: str, new_flag: str, old_flag: str):
    """The value of option ``dest``, given with its new spelling ``new_flag`` or its old one (not both)."""
    if old_value is None:
        return value
    if given(dest):
        raise SntfxError(f"{old_flag} is the old spelling of {new_flag}: give only {new_flag}")
    return old_value


class FiniteFloat(click.ParamType):
    """A float that must be finite, optionally within bounds."""

    name = "number"

    def __init__(self, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def convert(self, value, param, ctx):
        import math

        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        low_bad = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        high_bad = self.high is not None and (number >= self.high if self.high_open else number > self.high)
        if low_bad or high_bad:
            left = "(" if self.low_open else "["
            right = ")" if self.high_open else "]"
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            self.fail(f"{number:g} is not in {left}{lo}, {hi}{right}", param, ctx)
        return number


class Text(click.ParamType):
    """Free text that may not be blank (an empty --data or --model would otherwise mean "the default")."""

    name = "text"

    def convert(self, value, param, ctx):
        if not isinstance(value, str) or not value.strip():
            self.fail("an empty value is not allowed; give one or leave the option out", param, ctx)
        return value


class Budget(FiniteFloat):
    """A non-negative fraction, or ``none`` (no limit)."""

    name = "fraction|none"

    def __init__(self):
        super().__init__(0)

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            return None
        return super().convert(value, param, ctx)


TEXT = Text()
BUDGET = Budget()
POSITIVE = FiniteFloat(0, low_open=True)
NON_NEGATIVE = FiniteFloat(0)
FRACTION = FiniteFloat(0, 1, high_open=True)


def given(name: str) -> bool:
    """Whether the user set option ``name`` (on the command line or by environment), not its default."""
    from click.core import ParameterSource

    source = click.get_current_context().get_parameter_source(name)
    return source not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def only_with(names: list[str], condition: bool, needs: str) -> None:
    """Refuse options that would be silently ignored unless ``condition`` holds."""
    ctx = click.get_current_context()
    unused = [n for n in names if given(n)]
    if unused and not condition:
        opts = ", ".join(next(p.opts[0] for p in ctx.command.params if p.name == n) for n in unused)
        raise SntfxError(f"{opts} only appl{'ies' if len(unused) == 1 else 'y'} with {needs}, so "
                         f"{'it' if len(unused) == 1 else 'they'} would be ignored here: drop "
                         f"{'it' if len(unused) == 1 else 'them'} or add {needs}")


def trust_options(fn):
    """--trust-source and --model-file for commands that read a saved model."""
    fn = click.option("--trust-source", is_flag=True,
                      help="Rebuild a model whose file names Python code (a model.py or module) although it was "
                           "not saved by you on this machine: importing runs that code.")(fn)
    fn = click.option("--model-file", "source_file", default=None, type=click.Path(exists=True, dir_okay=False),
                      help="Rebuild from this model.py instead of the recorded one (naming it trusts it).")(fn)
    return fn


def weights_options(fn):
    """--weights and --pretrained for commands that build a model from a spec."""
    fn = click.option("--pretrained", is_flag=True,
                      help="Start from the pretrained weights of a torchvision: or timm: model, read from the "
                           "local cache ($TORCH_HOME/hub/checkpoints, the Hugging Face hub cache); never "
                           "downloaded.")(fn)
    fn = click.option("--weights", "weights_file", default=None, type=click.Path(exists=True, dir_okay=False),
                      help="Start from these weights: a state dict (.safetensors, .pt, .pth), loaded strictly.")(fn)
    return fn


def check_weights_options(spec, weights_file: str | None, pretrained: bool) -> None:
    """Refuse --weights with --pretrained, and --pretrained for a model no cache holds weights for, before any work."""
    if weights_file and pretrained:
        raise SntfxError("--weights and --pretrained both set the initial weights: choose one")
    if pretrained and spec.kind not in ("torchvision", "timm"):
        raise SntfxError(f"--pretrained reads torchvision's and timm's local caches; '{spec}' is not from either: "
                         "give its weights with --weights FILE")


def model_spec(model: str, entry: str | None, kwargs: str | None):
    from ..models import ModelSpec

    return ModelSpec.parse(model, entry=entry, kwargs=json_kwargs(kwargs))


def inputs_for(path_or_spec: str) -> list[str]:
    return [path_or_spec.rsplit(":", 1)[0] if ".py:" in path_or_spec else path_or_spec]


def world_size() -> int:
    import os

    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def load_folded(path: str, source_file: str | None = None, trust_source: bool = False):
    from ..compress import ensure_folded
    from ..serialization import load

    gm = load(path, model_file=source_file, trust_source=trust_source)
    ensure_folded(gm, f"'{path}'")
    return gm


def unique_names(paths) -> list[str]:
    """Short names for result tables (file stems); two files with one stem are told apart by their folder."""
    stems = [Path(p).stem for p in paths]
    if len(set(map(str, paths))) != len(paths):
        raise SntfxError("the same model file is given twice; list each model once")
    return [f"{Path(p).resolve().parent.name}_{Path(p).stem}" if stems.count(Path(p).stem) > 1 else Path(p).stem
            for p in paths]


def json_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise SntfxError(f"--kwargs must be a JSON object, e.g. '{{\"num_classes\": 10}}': {exc}") from exc
    if not isinstance(value, dict):
        raise SntfxError("--kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value
