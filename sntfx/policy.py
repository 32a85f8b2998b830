"""Expansion policy: which layers the SNT pass expands, and how.

A policy selects layers by type, module-name glob and size, can skip the
first and last eligible layers, and sets style and ratio per layer through
rules (first matching rule wins). It is plain data: ``Policy.from_dict`` /
``to_dict`` round-trip through JSON or TOML, so a policy travels inside a
saved model's recipe.

Example policy file (TOML)::

    style = "linear"
    ratio = 4
    skip_first = true
    exclude = ["head.*"]

    [[rules]]
    pattern = "layer4.*"
    style = "branch"

    [[rules]]
    pattern = "fc"
    skip = true
"""

from __future__ import annotations

import fnmatch
import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .blocks import LAYER_TYPES, style_names
from .errors import PolicyError
from .pipelines import DEFAULT_RATIO, DEFAULT_STYLE

__all__ = ["Policy", "Rule", "Decision", "LAYER_TYPES"]



@dataclass(frozen=True)
class Rule:
    """Per-layer override for modules whose path matches ``pattern`` (a glob)."""

    pattern: str
    style: str | None = None
    ratio: int | None = None
    skip: bool = False


@dataclass(frozen=True)
class Decision:
    """What the policy decided for one layer."""

    expand: bool
    style: str = ""
    ratio: int = 0
    reason: str = ""  # why it is skipped


@dataclass(frozen=True)
class Policy:
    """Which layers to expand, with which style and ratio.

    Attributes:
        style: default style, any registered one (``sntfx transform --help`` lists them).
        ratio: default expansion ratio (used by ``linear``).
        types: layer kinds to consider, among ``conv1d``, ``conv2d``, ``conv3d``, ``linear``.
        include / exclude: module-path globs; a layer must match one include
            and no exclude.
        min_params / max_params: expand only layers whose weight has at least /
            at most this many elements (``max_params`` keeps a huge classifier plain).
        skip_first / skip_last: skip the first / last eligible layer in graph order.
        rules: per-layer overrides, first match wins.
    """

    style: str = DEFAULT_STYLE
    ratio: int = DEFAULT_RATIO
    types: tuple[str, ...] = LAYER_TYPES
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    min_params: int = 0
    max_params: int | None = None
    skip_first: bool = False
    skip_last: bool = False
    rules: tuple[Rule, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check_style(self.style, "style")
        _check_ratio(self.ratio, "ratio")
        bad = [t for t in self.types if t not in LAYER_TYPES]
        if bad:
            raise PolicyError(f"unknown layer type(s) {bad} in policy 'types'; use {', '.join(LAYER_TYPES)}")
        if self.min_params < 0:
            raise PolicyError(f"min_params must be >= 0, got {self.min_params}")
        if self.max_params is not None and self.max_params < self.min_params:
            raise PolicyError(f"max_params ({self.max_params}) must be >= min_params ({self.min_params})")
        for r in self.rules:
            if r.style is not None:
                _check_style(r.style, f"rule '{r.pattern}' style")
            if r.ratio is not None:
                _check_ratio(r.ratio, f"rule '{r.pattern}' ratio")

    def decide(self, path: str, kind: str, numel: int, *, first: bool, last: bool) -> Decision:
        """The decision for the layer at module path ``path``."""
        if kind not in self.types:
            return Decision(False, reason=f"type {kind} not selected")
        if not any(fnmatch.fnmatchcase(path, pat) for pat in self.include):
            return Decision(False, reason="not included")
        if any(fnmatch.fnmatchcase(path, pat) for pat in self.exclude):
            return Decision(False, reason="excluded")
        if first and self.skip_first:
            return Decision(False, reason="first layer")
        if last and self.skip_last:
            return Decision(False, reason="last layer")
        if numel < self.min_params:
            return Decision(False, reason="below min_params")
        if self.max_params is not None and numel > self.max_params:
            return Decision(False, reason="above max_params")
        for rule in self.rules:
            if fnmatch.fnmatchcase(path, rule.pattern):
                if rule.skip:
                    return Decision(False, reason=f"rule {rule.pattern}")
                return Decision(True, rule.style or self.style, rule.ratio or self.ratio)
        return Decision(True, self.style, self.ratio)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["types"], d["include"], d["exclude"] = list(self.types), list(self.include), list(self.exclude)
        d["rules"] = [{k: v for k, v in asdict(r).items() if v not in (None, False)} for r in self.rules]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        if not isinstance(data, dict):
            raise PolicyError(f"a policy must be a mapping, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise PolicyError(f"unknown policy key(s) {sorted(unknown)}; known keys: {', '.join(sorted(known))}")
        kwargs = dict(data)
        for key in ("types", "include", "exclude"):
            if key in kwargs:
                val = kwargs[key]
                kwargs[key] = (val,) if isinstance(val, str) else tuple(val)
        rules = []
        for i, r in enumerate(kwargs.get("rules", ())):
            if not isinstance(r, dict) or "pattern" not in r:
                raise PolicyError(f"policy rule #{i + 1} needs a 'pattern' (a module-path glob): {r!r}")
            extra = set(r) - {"pattern", "style", "ratio", "skip"}
            if extra:
                raise PolicyError(f"policy rule '{r['pattern']}' has unknown key(s) {sorted(extra)}")
            rules.append(Rule(**r))
        kwargs["rules"] = tuple(rules)
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise PolicyError(f"bad policy: {exc}") from exc

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        """Read a policy from a ``.json`` or ``.toml`` file."""
        path = Path(path)
        if not path.is_file():
            raise PolicyError(f"policy file '{path}' does not exist")
        text = path.read_text()
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError(f"policy file '{path}' is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from exc
        return cls.from_dict(data)


def _check_style(style: Any, what: str) -> None:
    if style not in style_names():
        raise PolicyError(f"unknown {what} '{style}'; choose one of {', '.join(style_names())}")


def _check_ratio(ratio: Any, what: str) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise PolicyError(f"{what} must be an integer >= 1, got {ratio!r}")
