"""Glue between model specs, saved files, weights and datasets, shared by the CLI commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from .data import DatasetInfo
from .errors import SntfxError
from .graph_utils import required_inputs
from .models import ModelSpec
from .serialization import load
from .tracing import sntfx_meta, trace

__all__ = ["model_for_data", "is_model_file", "fit_to_data", "check_fits_data", "check_saved_takes_data",
           "build_traced"]


def is_model_file(text: str) -> bool:
    return text.endswith(".pt") or (Path(text).is_file() and not text.endswith(".py"))


def fit_to_data(spec: ModelSpec, info: DatasetInfo) -> dict[str, Any]:
    """Set the constructor arguments that make a zoo model take ``info``'s images and predict its classes.

    Arguments already in ``spec.kwargs`` win. Built-ins get ``in_channels`` and
    ``num_classes`` (and ``image_size`` where they take it), timm models
    ``in_chans`` and ``num_classes``, torchvision models ``num_classes`` and, for
    other than 3 channels, sntfx's ``in_channels`` (a new stem convolution).
    A model file's factory gets ``num_classes`` and ``in_channels`` (or
    ``in_chans``) when its signature names them; otherwise it is left as it is.
    Returns the arguments set.
    """
    defaults: dict[str, Any] = {}
    if spec.kind == "sntfx":
        from .zoo import BUILTIN_MODELS, accepts

        defaults = {"in_channels": info.channels, "num_classes": info.num_classes}
        if spec.name in BUILTIN_MODELS and accepts(spec.name, "image_size"):
            defaults["image_size"] = list(info.size) if info.size[0] != info.size[1] else info.size[0]
    elif spec.kind == "torchvision":
        defaults = {"num_classes": info.num_classes}
        if info.channels != 3:
            defaults["in_channels"] = info.channels
    elif spec.kind == "timm":
        defaults = {"num_classes": info.num_classes, "in_chans": info.channels}
    elif spec.kind in ("file", "import"):
        params = spec.factory_parameters() or set()
        if "num_classes" in params:
            defaults["num_classes"] = info.num_classes
        channels = next((n for n in ("in_channels", "in_chans") if n in params), None)
        if channels:
            defaults[channels] = info.channels
    added = {k: v for k, v in defaults.items() if k not in spec.kwargs}
    spec.kwargs = {**defaults, **spec.kwargs}
    return added


def fit_hint(kind: str, name: str, info: DatasetInfo, *, saved: bool = False) -> str:
    """How to build a model of this family for ``info``'s input channels and classes."""
    c, n = info.channels, info.num_classes
    redo = f"transform the model again with --data {info.name}, which builds it for {c} channels and {n} classes; " \
        if saved else ""
    if kind == "timm":
        return f"{redo}timm models take in_chans and num_classes: --kwargs '{{\"in_chans\": {c}, \"num_classes\": {n}}}'"
    if kind == "torchvision":
        return (f"{redo}torchvision models take num_classes (--kwargs '{{\"num_classes\": {n}}}') but have no "
                f"input-channels argument of their own: --data {info.name} replaces the stem convolution for {c} "
                "channels (recorded as in_channels), or build the model in a model file")
    if kind == "sntfx":
        from .zoo import BUILTIN_MODELS, accepts

        size = name in BUILTIN_MODELS and accepts(name, "image_size")
        args = {"in_channels": c, "num_classes": n, **({"image_size": info.size[0]} if size else {})}
        import json

        return (f"{redo}sntfx:{name} takes {', '.join(args)}: --kwargs '{json.dumps(args)}'")
    return (f"{redo}a model file's factory takes its own arguments: name them num_classes and in_channels (or "
            f"in_chans) and --data sets them to {n} and {c}, or pass the ones it has with --kwargs")


def _mismatch(model: torch.nn.Module, info: DatasetInfo) -> tuple[str, str] | None:
    """Run ``model`` (eval mode) on a batch of 2 of ``info``'s images: None when it takes them and predicts
    ``info``'s classes, else ``("input" | "output", what went wrong)``."""
    x = torch.zeros(info.input_shape(2))
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - whatever the model raises, it does not take these images
        return "input", (f"does not accept {info.name} images of shape {tuple(x.shape[1:])} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    finally:
        model.train(training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != info.num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        return "output", f"outputs {shape} for a batch of 2, but {info.name} has {info.num_classes} classes"
    return None


def check_fits_data(model: torch.nn.Module, info: DatasetInfo, *, what: str, kind: str, name: str = "",
                    saved: bool = False) -> None:
    """Refuse a model that does not take ``info``'s images or does not predict its classes, with a hint for
    its family (``kind``, as in a model spec: sntfx, torchvision, timm, file, import)."""
    wrong = _mismatch(model, info)
    if wrong is None:
        return
    hint = fit_hint(kind, name, info, saved=saved)
    fix = (f"build it for {info.channels} input channels and {info.size[0]}x{info.size[1]} images"
           if wrong[0] == "input" else f"build it with {info.num_classes} outputs")
    raise SntfxError(f"model {what} {wrong[1]}; {fix}: {hint}")


def check_saved_takes_data(model: torch.nn.Module, info: DatasetInfo, path: str) -> None:
    """Refuse a saved (trained) model that does not take ``info``'s images or predict its classes, before a
    command measures, calibrates or exports it on them; the error names the inputs it was saved for."""
    placeholders = required_inputs(model) if isinstance(model, fx.GraphModule) else []
    if len(placeholders) > 1:
        raise SntfxError(
            f"model '{path}' takes {len(placeholders)} inputs ({', '.join(placeholders)}), but a dataset gives one "
            f"image batch; measuring, calibrating or exporting it on {info.name} needs a model of one input (without "
            "--data, export uses the input shapes it was saved with)")
    wrong = _mismatch(model, info)
    if wrong is None:
        return
    spec = sntfx_meta(model).get("input_spec") or []
    saved_for = ", ".join("x".join(str(d) for d in item["shape"][1:]) for item in spec)
    hint = (f"it was saved for inputs of shape {saved_for} (without the batch): give the dataset it was "
            "built for with --data, or transform the model again for this one" if saved_for else
            f"give the dataset it was built for with --data, or transform the model again with --data {info.name}")
    raise SntfxError(f"model '{path}' {wrong[1]}; {hint}")


def build_traced(spec: ModelSpec, inputs: tuple, *, weights: Any = None, pretrained: bool | str = False,
                 info: DatasetInfo | None = None) -> fx.GraphModule:
    """Build ``spec`` with its initial weights, trace it on ``inputs`` and record where it came from.

    With ``info`` the model is first fitted to that dataset (:func:`fit_to_data`)
    and checked to take its images and predict its classes.
    """
    from .weights import build_with_weights

    fitted = fit_to_data(spec, info) if info is not None else {}
    hint = ""
    if fitted:
        args = ", ".join(f"{k}={v}" for k, v in fitted.items())
        hint = (f"--data set {args} for the dataset, and weights saved for another model do not fit it "
                "strictly: build it as the weights were saved (--kwargs), start from --pretrained (torchvision and "
                "timm: the classifier starts fresh), or give weights for this architecture")
    model = build_with_weights(spec, weights=weights, pretrained=pretrained, hint=hint)
    if info is not None:
        check_fits_data(model, info, what=str(spec), kind=spec.kind, name=spec.name)
    gm = trace(model, inputs)
    sntfx_meta(gm)["source"] = spec.to_dict()
    return gm


def model_for_data(model: str, info: DatasetInfo, *, kwargs: dict | None = None, entry: str | None = None,
                   model_file: str | None = None, trust_source: bool = False, weights: Any = None,
                   pretrained: bool | str = False) -> fx.GraphModule:
    """A traced model that takes ``info``'s images and predicts its classes.

    ``model`` is a saved sntfx file (e.g. from ``sntfx transform``) or a model
    spec, fitted to the dataset by :func:`fit_to_data` unless ``kwargs`` says
    otherwise and started from ``weights`` (a file) or the ``pretrained``
    weights when given. ``model_file`` and ``trust_source`` are passed to
    :func:`sntfx.load` for a saved file.
    """
    if is_model_file(model):
        if weights is not None or pretrained:
            raise SntfxError(f"'{model}' is a saved model with its own weights; --weights and --pretrained apply to "
                             "a model spec")
        gm = load(model, model_file=model_file, trust_source=trust_source)
        source = sntfx_meta(gm).get("source") or {}
        check_fits_data(gm, info, what=f"'{model}'", kind=source.get("kind", "file"), name=source.get("name", ""),
                        saved=True)
    else:
        spec = ModelSpec.parse(model, entry=entry, kwargs=kwargs or {})
        gm = build_traced(spec, (torch.zeros(info.input_shape(2)),), weights=weights, pretrained=pretrained, info=info)
    gm.train()
    return gm
