"""Glue between model specs, saved files and datasets, shared by the CLI commands."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.fx as fx

from .data import DatasetInfo
from .errors import SntfxError
from .models import ModelSpec
from .serialization import load
from .tracing import sntfx_meta, trace

__all__ = ["model_for_data", "is_model_file"]


def is_model_file(text: str) -> bool:
    return text.endswith(".pt") or (Path(text).is_file() and not text.endswith(".py"))


def model_for_data(model: str, info: DatasetInfo, *, kwargs: dict | None = None, entry: str | None = None,
                   model_file: str | None = None, trust_source: bool = False) -> fx.GraphModule:
    """A traced model that takes ``info``'s images and predicts its classes.

    ``model`` is a saved sntfx file (e.g. from ``sntfx transform``) or a model
    spec; for zoo specs the number of classes (and input channels, where the
    family supports it) is set from the dataset unless ``kwargs`` says otherwise.
    ``model_file`` and ``trust_source`` are passed to :func:`sntfx.load` for a
    saved file.
    """
    x = torch.zeros(info.input_shape(2))
    if is_model_file(model):
        gm = load(model, model_file=model_file, trust_source=trust_source)
        what = f"'{model}'"
    else:
        spec = ModelSpec.parse(model, entry=entry, kwargs=kwargs or {})
        defaults: dict = {}
        if spec.kind == "sntfx":
            from .zoo import BUILTIN_MODELS, accepts

            defaults = {"in_channels": info.channels, "num_classes": info.num_classes}
            if spec.name in BUILTIN_MODELS and accepts(spec.name, "image_size"):
                defaults["image_size"] = list(info.size) if info.size[0] != info.size[1] else info.size[0]
        elif spec.kind == "torchvision":
            defaults = {"num_classes": info.num_classes}
        elif spec.kind == "timm":
            defaults = {"num_classes": info.num_classes, "in_chans": info.channels}
        spec.kwargs = {**defaults, **spec.kwargs}
        built = spec.build()
        gm = trace(built, x)
        sntfx_meta(gm)["source"] = spec.to_dict()
        what = str(spec)
    gm.eval()
    try:
        with torch.no_grad():
            out = gm(x)
    except Exception as exc:
        raise SntfxError(
            f"model {what} does not accept {info.name} images of shape {tuple(x.shape[1:])} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); build it for "
            f"{info.channels} input channels (e.g. --kwargs '{{\"in_channels\": {info.channels}}}' at transform time)"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != info.num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SntfxError(
            f"model {what} outputs {shape} for a batch of 2, but {info.name} has {info.num_classes} classes: "
            f"build it with num_classes={info.num_classes} (e.g. --kwargs '{{\"num_classes\": {info.num_classes}}}')"
        )
    gm.train()
    return gm
