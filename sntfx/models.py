"""Model specs: where a model comes from, so that a saved file can rebuild it.

A spec is one of

* ``torchvision:NAME`` -- ``torchvision.models.get_model(NAME, weights=None)``;
  torchvision models have no input-channel argument, so sntfx adds one:
  ``in_channels`` replaces the stem (the first convolution) by one for that
  many channels, and is recorded like any constructor argument;
* ``timm:NAME`` -- ``timm.create_model(NAME, pretrained=False)``;
* ``sntfx:NAME`` -- a built-in model (:mod:`sntfx.zoo`);
* ``path/to/model.py`` or ``path/to/model.py:ENTRY`` -- a Python file defining
  a factory (``ENTRY``, else ``build_model``, ``model`` or ``get_model``) and,
  optionally, ``example_inputs()``;
* ``package.module:ATTR`` -- a factory importable from the Python path.

Constructor keyword arguments travel with the spec (``kwargs``). Nothing is
ever downloaded: zoo models are built with random weights, or with
``build(pretrained=True)`` from the pretrained weights torchvision or timm
already cached on this machine (:mod:`sntfx.weights`; a missing file is an
error, never a download). Weights are not part of the spec: a saved model
carries its own.

Rebuilding a file spec imports that Python file again, as the user did when
they first built the model; the file's SHA-256 is recorded and checked, so a
saved model never silently rebuilds from different code, and a saved file
itself never carries code. Because importing a file or module runs it, the
``file`` and ``import`` kinds are *code sources* (:attr:`ModelSpec.runs_code`):
:func:`sntfx.load` rebuilds them only when the user trusts the file (see
:mod:`sntfx.serialization`). The zoo kinds build architectures only: their
constructor arguments may not load or download weights.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelSpecError
from .zoo import BUILTIN_MODELS, default_input_shape

__all__ = ["ModelSpec", "FACTORY_NAMES", "parse_input_shape", "stem_conv"]

FACTORY_NAMES = ("build_model", "model", "get_model")
KINDS = ("torchvision", "timm", "sntfx", "file", "import")
CODE_KINDS = ("file", "import")  # rebuilding imports Python code, which runs it
# Constructor arguments through which a zoo factory would read a file or download weights.
WEIGHT_LOADING_KWARGS = frozenset({"pretrained", "weights", "weights_backbone", "checkpoint_path", "pretrained_cfg",
                                   "pretrained_cfg_overlay", "cache_dir", "pretrained_strict"})


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` -> ``(1, 3, 32, 32)``, with a clear error otherwise."""
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise ModelSpecError(
            f"bad input shape {text!r}: give positive integers separated by commas, batch first, e.g. 1,3,32,32"
        )
    return shape


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class ModelSpec:
    """Where a model comes from and how to build it."""

    kind: str
    name: str
    entry: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None

    @classmethod
    def parse(cls, text: str, *, entry: str | None = None, kwargs: dict | None = None) -> ModelSpec:
        """Parse a spec string (see the module docstring)."""
        kwargs = dict(kwargs or {})
        if entry is not None and not entry.isidentifier():
            raise ModelSpecError(f"the factory name (entry) must be a Python name, e.g. build_model; got {entry!r}")
        prefix, sep, rest = text.partition(":")
        if sep and prefix in ("torchvision", "timm", "sntfx"):
            if not rest:
                raise ModelSpecError(f"model spec {text!r} names no model, e.g. {prefix}:resnet18")
            if entry is not None:
                raise ModelSpecError(f"a factory name (--entry {entry}) applies to a model.py or module; '{text}' "
                                     "is a built-in architecture, so it would be ignored: drop it")
            return cls(prefix, rest, None, kwargs)
        if text.endswith(".py") or ".py:" in text:
            path_text, _, file_entry = text.rpartition(":") if not text.endswith(".py") else (text, "", "")
            path = Path(path_text)
            if not path.is_file():
                raise ModelSpecError(
                    f"model file '{path}' does not exist; give the path of a Python file that defines build_model()"
                )
            return cls("file", str(path.resolve()), entry or file_entry or None, kwargs, _sha256(path))
        if sep and all(part.isidentifier() for part in prefix.split(".")) and rest.isidentifier():
            return cls("import", prefix, entry or rest, kwargs)
        raise ModelSpecError(
            f"cannot understand model spec {text!r}: use a Python file (model.py), torchvision:NAME, "
            "timm:NAME, sntfx:NAME or package.module:factory"
        )

    @property
    def runs_code(self) -> bool:
        """True when building this spec imports Python code (a model file or an importable module)."""
        return self.kind in CODE_KINDS

    # -- (de)serialisation -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "entry": self.entry, "kwargs": self.kwargs, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        if not isinstance(data, dict) or data.get("kind") not in KINDS or not isinstance(data.get("name"), str):
            raise ModelSpecError(f"malformed model source in recipe: {data!r}")
        kwargs = data.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ModelSpecError(f"malformed constructor arguments in recipe: {kwargs!r}")
        return cls(data["kind"], data["name"], data.get("entry"), kwargs, data.get("sha256"))

    def __str__(self) -> str:
        if self.kind == "file":
            return f"{self.name}:{self.entry}" if self.entry else self.name
        if self.kind == "import":
            return f"{self.name}:{self.entry}"
        return f"{self.kind}:{self.name}"

    # -- building --------------------------------------------------------------
    def build(self, *, verify_hash: bool = True, pretrained: bool | str = False) -> nn.Module:
        """Construct the model: random weights, or with ``pretrained`` (torchvision and timm
        only) the pretrained weights from the local cache; nothing is ever downloaded.

        For torchvision, ``pretrained`` may name the weights (``"IMAGENET1K_V2"``; True is
        ``"DEFAULT"``); for timm the weights are chosen by the name's tag (``resnet18.a1_in1k``).
        """
        if self.kind not in CODE_KINDS:
            loading = sorted(WEIGHT_LOADING_KWARGS & set(self.kwargs))
            if loading:
                raise ModelSpecError(
                    f"constructor argument(s) {', '.join(loading)} of '{self}' would load or download weights; "
                    "sntfx builds the architecture from the spec and loads weights itself: drop them and use "
                    "--pretrained (torchvision/timm weights already in the local cache) or --weights FILE "
                    "(sntfx.build_model(spec, pretrained=True) / weights=PATH)"
                )
        if pretrained and self.kind not in ("torchvision", "timm"):
            raise ModelSpecError(
                f"pretrained weights come from torchvision's and timm's local caches; '{self}' is a "
                f"{'built-in' if self.kind == 'sntfx' else self.kind} model: give its weights with --weights FILE "
                "(weights=PATH)"
            )
        if isinstance(pretrained, str) and self.kind == "timm":
            raise ModelSpecError(f"timm chooses pretrained weights by the model name's tag (timm:{self.name}.TAG, "
                                 f"e.g. timm:resnet18.a1_in1k); pass pretrained=True, not {pretrained!r}")
        if self.kind == "sntfx":
            factory = BUILTIN_MODELS.get(self.name)
            if factory is None:
                raise ModelSpecError(f"unknown built-in model 'sntfx:{self.name}'; built-ins: {', '.join(BUILTIN_MODELS)}")
            return _call(factory, self.kwargs, str(self))
        if self.kind == "torchvision":
            import torchvision

            if self.name not in torchvision.models.list_models():
                raise ModelSpecError(
                    f"torchvision has no model '{self.name}'; see torchvision.models.list_models() for the names"
                )
            kwargs = dict(self.kwargs)
            in_channels = kwargs.pop("in_channels", None)
            model = _call(lambda **kw: torchvision.models.get_model(self.name, weights=None, **kw), kwargs, str(self))
            if in_channels is not None:
                _replace_stem(model, in_channels, str(self))
            if pretrained:
                from .weights import load_torchvision_pretrained

                load_torchvision_pretrained(model, self.name, None if pretrained is True else pretrained)
            return model
        if self.kind == "timm":
            import timm

            if not timm.is_model(self.name):
                raise ModelSpecError(f"timm has no model '{self.name}'; see timm.list_models() for the names")
            if not pretrained:
                return _call(lambda **kw: timm.create_model(self.name, pretrained=False, **kw), self.kwargs, str(self))
            from .weights import timm_pretrained_state

            state = timm_pretrained_state(self.name)  # read here, from the local cache: timm downloads nothing
            overlay = {"state_dict": state}
            return _call(lambda **kw: timm.create_model(self.name, pretrained=True, pretrained_cfg_overlay=overlay,
                                                        **kw), self.kwargs, str(self))
        module = self._module(verify_hash)
        names = (self.entry,) if self.entry else FACTORY_NAMES
        for attr in names:
            obj = getattr(module, attr, None)
            if obj is None:
                continue
            if isinstance(obj, nn.Module):
                return obj
            if callable(obj):
                return _call(obj, self.kwargs, f"{self}:{attr}")
        where = f"'{self.name}'" if self.kind == "file" else f"module '{self.name}'"
        wanted = f"'{self.entry}'" if self.entry else " or ".join(f"'{n}'" for n in FACTORY_NAMES)
        raise ModelSpecError(
            f"no model factory found in {where}: define a function {wanted} that returns an nn.Module, "
            "or name yours with --entry NAME"
        )

    def factory_parameters(self) -> set[str] | None:
        """Keyword parameters of a model file's (or module's) factory; None when it takes ``**kwargs`` or is no function.

        Imports the file, as building it does.
        """
        import inspect

        if self.kind not in ("file", "import"):
            return None
        module = self._module(True)
        obj = next((getattr(module, a) for a in ((self.entry,) if self.entry else FACTORY_NAMES)
                    if getattr(module, a, None) is not None), None)
        if obj is None or isinstance(obj, nn.Module) or not callable(obj):
            return None
        try:
            params = inspect.signature(obj).parameters.values()
        except (TypeError, ValueError):
            return None
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def _module(self, verify_hash: bool):
        if self.kind == "import":
            try:
                return importlib.import_module(self.name)
            except Exception as exc:
                raise ModelSpecError(f"cannot import module '{self.name}': {type(exc).__name__}: {exc}") from exc
        path = Path(self.name)
        if not path.is_file():
            raise ModelSpecError(
                f"model file '{path}' does not exist (the model was built from it); restore it, "
                "or give its new location (sntfx.load(..., model_file=PATH) / --model-file PATH)"
            )
        if verify_hash and self.sha256 and _sha256(path) != self.sha256:
            raise ModelSpecError(
                f"model file '{path}' changed since the model was saved (SHA-256 differs); restore the "
                "original file, or rebuild from the current one with model_file=PATH / --model-file PATH"
            )
        mod_name = f"sntfx_user_model_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ModelSpecError(f"'{path}' cannot be imported as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise ModelSpecError(f"importing model file '{path}' failed: {type(exc).__name__}: {exc}") from exc
        return module

    def example_inputs(self, input_shape: tuple[int, ...] | None = None) -> tuple[torch.Tensor, ...]:
        """Example inputs: ``input_shape`` if given, else the file's
        ``example_inputs()``, else the zoo's default input size."""
        gen = torch.Generator().manual_seed(0)
        if input_shape is not None:
            return (torch.randn(input_shape, generator=gen),)
        if self.kind == "sntfx":
            return (torch.randn(default_input_shape(self.name, self.kwargs), generator=gen),)
        if self.kind == "torchvision":
            size = 299 if self.name == "inception_v3" else 224
            return (torch.randn(1, self.kwargs.get("in_channels", 3), size, size, generator=gen),)
        if self.kind == "timm":
            import timm

            cfg = timm.models.get_pretrained_cfg(self.name)
            size = tuple(getattr(cfg, "input_size", None) or (3, 224, 224)) if cfg else (3, 224, 224)
            return (torch.randn(1, self.kwargs.get("in_chans", size[0]), *size[1:], generator=gen),)
        module = self._module(verify_hash=False)
        fn = getattr(module, "example_inputs", None)
        if fn is None:
            raise ModelSpecError(
                f"cannot tell the input shape of '{self}': define example_inputs() in the model file, "
                "or pass --input-shape, e.g. --input-shape 1,3,32,32"
            )
        try:
            value = fn() if callable(fn) else fn
        except Exception as exc:  # noqa: BLE001 - the model file's own code: its failure is the file's, not ours
            raise ModelSpecError(f"example_inputs() in '{self.name}' failed: {type(exc).__name__}: {exc}; fix it, or "
                                 "pass --input-shape instead (e.g. --input-shape 1,3,32,32)") from exc
        if isinstance(value, torch.Tensor):
            return (value,)
        if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
            return tuple(value)
        raise ModelSpecError(f"example_inputs() in '{self.name}' must return a tensor or a tuple of tensors")


def stem_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first 2-D convolution a model defines (the stem of torchvision's classifiers), with its name."""
    return next(((name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def _replace_stem(model: nn.Module, in_channels, what: str) -> None:
    """Give a torchvision model a stem convolution for ``in_channels`` input channels (same shape otherwise)."""
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ModelSpecError(f"in_channels of '{what}' must be a positive integer, got {in_channels!r}")
    found = stem_conv(model)
    if found is None or found[1].groups != 1:
        raise ModelSpecError(
            f"'{what}' has no plain stem convolution that sntfx could rebuild for {in_channels} input channels; "
            "build the model in a model file (model.py) with the input layer you need"
        )
    name, conv = found
    if conv.in_channels == in_channels:
        return
    stem = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                     dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode)
    model.set_submodule(name, stem)


def _call(factory, kwargs: dict, what: str) -> nn.Module:
    try:
        model = factory(**kwargs)
    except ModelSpecError:
        raise
    except Exception as exc:
        raise ModelSpecError(f"building '{what}' failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"'{what}' returned {type(model).__name__}, not an nn.Module")
    return model
