"""Weights in and out: start from the weights users have, deploy what they measured.

In:

* :func:`read_state_dict` reads a state dict from ``.safetensors`` or from a
  torch file (``.pt``, ``.pth``, ``.bin``) with ``torch.load(weights_only=True)``,
  so a file can hold tensors but never code. Checkpoints that keep the weights
  under a ``"state_dict"``, ``"model"`` or ``"model_state_dict"`` key are
  accepted, and so are keys that all carry one prefix (``module.`` from
  DistributedDataParallel) when the model's keys are exactly the rest.
* :func:`load_weights` loads them strictly: a mismatch is a
  :class:`~sntfx.errors.WeightsError` listing missing and unexpected keys and
  shape differences.
* Pretrained weights (``ModelSpec.build(pretrained=True)``, CLI ``--pretrained``)
  come only from the local caches, never from the network: torchvision's from
  ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``), timm's
  from the Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``,
  else ``~/.cache/huggingface/hub``) or the torch hub folder. sntfx finds the
  file and reads it itself; the libraries' download functions are never
  called. When the model is built for another number of classes or input
  channels than the weights, the classifier starts fresh and the stem's
  weights are adapted (timm's own rules; for torchvision, timm's
  ``adapt_input_conv``).

Out: :func:`original_state_dict` turns a folded model back into the state
dict of the class it was built from (same parameter names, checked by loading
it into a fresh instance and comparing outputs), and :func:`save_state_dict`
writes it atomically as ``.safetensors`` or ``.pt``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import WeightsError
from .io import atomic_torch_save, atomic_write

__all__ = [
    "read_state_dict",
    "load_weights",
    "load_state_dict_strict",
    "weights_source",
    "build_with_weights",
    "load_torchvision_pretrained",
    "timm_pretrained_state",
    "original_state_dict",
    "save_state_dict",
    "check_state_dict_path",
    "TORCH_SUFFIXES",
    "STATE_DICT_SUFFIXES",
]

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth")  # what save_state_dict writes
NESTED_KEYS = ("state_dict", "model", "model_state_dict")
_FORMATS = "a state dict saved as .safetensors (safetensors.torch.save_file) or .pt/.pth (torch.save(model.state_dict()))"


# --------------------------------------------------------------------------- reading


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The named tensors in a ``.safetensors`` or torch weights file; nothing in the file is executed."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist; give {_FORMATS}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        state = _unwrap(_read_torch(path), path)
    else:
        raise WeightsError(f"'{path}' is not a weights file sntfx reads ('{suffix or 'no'}' suffix): give {_FORMATS}")
    if not state:
        raise WeightsError(f"'{path}' holds no weights (an empty state dict)")
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure means "not a valid safetensors file"
        raise WeightsError(f"'{path}' is not a valid safetensors file, or it is damaged ({_first_line(exc)}); "
                           f"give {_FORMATS}") from exc


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a file sntfx can read safely"
        if "GLOBAL" in str(exc):  # the file names a class or function to import: the unpickler refused it
            raise WeightsError(
                f"'{path}' holds Python objects besides tensors, and unpickling them could run code, so sntfx "
                "refuses it (torch.load with weights_only=True). Where you trust the file, save the weights alone: "
                "torch.save(model.state_dict(), 'weights.pt') or safetensors.torch.save_file(model.state_dict(), "
                "'weights.safetensors')"
            ) from exc
        raise WeightsError(f"'{path}' is not a readable torch file, or it is damaged ({_first_line(exc)}); "
                           f"give {_FORMATS}") from exc


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in what torch.load returned: itself, or under a checkpoint's usual key."""
    if isinstance(obj, Mapping) and obj.get("format") == "sntfx-model":
        raise WeightsError(
            f"'{path}' is an sntfx model file, not a state dict: use it as the model itself (e.g. sntfx train "
            f"'{path}'), or write its weights for the original class with sntfx fold --state-dict"
        )
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is not None:
            obj = nested
    if not isinstance(obj, Mapping):
        raise WeightsError(f"'{path}' holds a {type(obj).__name__}, not a state dict; give {_FORMATS}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"'{path}' is a dict but not a state dict: {_few(bad)} {'is not a tensor' if len(bad) == 1 else 'are not tensors'}"
            f" (a checkpoint keeps its weights under one of the keys {', '.join(NESTED_KEYS)}); save "
            "model.state_dict() alone"
        )
    return dict(obj)


# --------------------------------------------------------------------------- loading


def _few(keys, n: int = 5) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _strip_common_prefix(state: dict[str, torch.Tensor], expected: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``state`` without a prefix every key carries (``module.``), when that makes its keys exactly ``expected``'s."""
    if set(state) == set(expected):
        return state
    first = next(iter(state))
    prefix = first[: first.index(".") + 1] if "." in first else ""
    if prefix and all(k.startswith(prefix) for k in state):
        stripped = {k[len(prefix):]: v for k, v in state.items()}
        if set(stripped) == set(expected):
            log.info("weights: removed the prefix '%s' that every key carries", prefix)
            return stripped
    return state


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str,
                           hint: str = "") -> None:
    """Load ``state`` into ``model`` exactly: every key present, none extra, every shape equal."""
    expected = model.state_dict()
    state = _strip_common_prefix(dict(state), expected)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} in the weights vs {tuple(expected[k].shape)} in the model"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing {_few(missing)}" if missing else "", f"unexpected {_few(unexpected)}" if unexpected else "",
                 f"shape {_few(shapes, 3)}" if shapes else ""]
        raise WeightsError(
            f"the weights in {source} do not fit the model ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(shapes)} of another shape): {'; '.join(p for p in parts if p)}. "
            + (hint or "Build the model as it was when the weights were saved (the same model and constructor "
                       "arguments, e.g. --kwargs num_classes), or give the weights of this architecture")
        )
    model.load_state_dict(state, strict=True)


def load_weights(model: nn.Module, weights: str | os.PathLike | Mapping[str, torch.Tensor], *,
                 hint: str = "") -> nn.Module:
    """Load a weights file (or a state dict) into ``model`` strictly; returns ``model``."""
    if isinstance(weights, Mapping):
        load_state_dict_strict(model, weights, source="the state dict", hint=hint)
    else:
        load_state_dict_strict(model, read_state_dict(weights), source=f"'{weights}'", hint=hint)
    return model


def weights_source(weights: str | os.PathLike | None = None, pretrained: bool | str = False) -> dict[str, Any]:
    """Where a model's initial weights came from, for the saved file's recipe (``info``)."""
    if weights is not None:
        digest = hashlib.sha256()
        with open(weights, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return {"file": Path(weights).name, "sha256": digest.hexdigest()}
    if pretrained:
        return {"pretrained": pretrained if isinstance(pretrained, str) else "default"}
    return {}


# --------------------------------------------------------------------------- pretrained, from the local caches only


def torch_hub_checkpoints() -> Path:
    """Where torch.hub (and so torchvision) keeps downloaded weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, from the environment at call time (as huggingface_hub resolves it)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _torchvision_weights(name: str, tag: str | None):
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError) as exc:
        raise WeightsError(f"torchvision has no pretrained weights for '{name}'; give yours with --weights FILE") from exc
    choice = tag or "DEFAULT"
    short = choice.rsplit(".", 1)[-1]
    try:
        return enum[short] if short != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise WeightsError(f"torchvision's '{name}' has no weights '{choice}'; choose one of "
                           f"{', '.join(w.name for w in enum)} (or DEFAULT)") from None


# torchvision's DenseNet checkpoints predate its module names (torchvision.models.densenet._load_state_dict).
_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def load_torchvision_pretrained(model: nn.Module, name: str, tag: str | None = None) -> list[str]:
    """Load torchvision's pretrained ``name`` weights from the torch hub cache into ``model``.

    The file is never downloaded. A classifier built for another number of
    classes keeps its fresh weights and a stem built for other input channels
    gets the pretrained stem adapted; returns the names of the fresh keys.
    """
    from .models import stem_conv

    weights = _torchvision_weights(name, tag)
    folder = torch_hub_checkpoints()
    path = folder / os.path.basename(urlparse(weights.url).path)
    if not path.is_file():
        raise WeightsError(
            f"--pretrained: torchvision's {weights} weights for '{name}' are not in the local cache ('{path}'), "
            f"and sntfx never downloads. Put the file there (from {weights.url}, or run torchvision.models."
            f"get_model('{name}', weights='DEFAULT') once on a machine with network and copy "
            f"'{path.name}'), point TORCH_HOME at the folder that holds hub/checkpoints, or give the weights with "
            "--weights FILE"
        )
    state = read_state_dict(path)
    if name.startswith("densenet"):
        state = {(f"{m[1]}{m[2]}" if (m := _DENSENET_KEY.match(k)) else k): v for k, v in state.items()}
    expected = model.state_dict()
    stem = stem_conv(model)
    stem_key = f"{stem[0]}.weight" if stem else None
    classes = len(weights.meta.get("categories") or ()) or None
    fresh = []
    for key in sorted(set(state) & set(expected)):
        have, want = state[key], expected[key]
        if have.shape == want.shape:
            continue
        if key == stem_key and have.dim() == 4 and have.shape[0] == want.shape[0] and have.shape[2:] == want.shape[2:]:
            from timm.models import adapt_input_conv

            state[key] = adapt_input_conv(want.shape[1], have)
        elif classes and have.shape[0] == classes and have.shape[1:] == want.shape[1:]:
            state[key] = want  # the classifier of another number of classes starts fresh
            fresh.append(key)
    if fresh:
        log.info("pretrained %s: %s start fresh (the weights have %d classes)", name, ", ".join(fresh), classes)
    load_state_dict_strict(model, state, source=f"torchvision's {weights} ('{path}')",
                           hint="Build the model with the constructor arguments these weights were trained with")
    return fresh


def timm_pretrained_state(name: str) -> dict[str, torch.Tensor]:
    """timm's pretrained weights for ``name`` (``arch`` or ``arch.tag``), read from the local caches."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsError(f"timm has no pretrained weights for '{name}'; give yours with --weights FILE")
    if cfg.custom_load:
        raise WeightsError(f"timm reads the pretrained weights of '{name}' with its own loader (not a state dict), "
                           "which sntfx does not run; convert them to a state dict and give it with --weights FILE")
    tried = []
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        cache = hf_hub_cache()
        for filename in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=str(cache))
            if isinstance(found, str) and Path(found).is_file():
                return read_state_dict(found)
        tried.append(f"the Hugging Face hub cache '{cache}' (models--{cfg.hf_hub_id.replace('/', '--')})")
    for source in (cfg.file, cfg.url):
        if source:
            path = Path(source) if cfg.file == source else torch_hub_checkpoints() / os.path.basename(urlparse(source).path)
            if path.is_file():
                return read_state_dict(path)
            tried.append(f"'{path}'")
    raise WeightsError(
        f"--pretrained: timm's weights for '{name}' are not in the local cache, and sntfx never downloads "
        f"(looked in {' and '.join(tried)}). Run timm.create_model('{name}', pretrained=True) once on a machine "
        "with network and copy its cache here (HF_HUB_CACHE or HF_HOME say where), or give the weights with "
        "--weights FILE"
    )


# --------------------------------------------------------------------------- writing the deployable weights


def check_state_dict_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() not in STATE_DICT_SUFFIXES:
        raise WeightsError(f"--state-dict '{path}': give a file name ending in .safetensors or .pt (.pth), the "
                           "format to write")
    return path


def original_state_dict(model: nn.Module, *, atol: float = 1e-5) -> dict[str, torch.Tensor]:
    """The weights of a folded sntfx model under its original class's names, proven to load into it.

    ``model`` is a GraphModule from a model spec (``sntfx.fold``, ``sntfx.load``).
    A fresh instance of the original class is built from the recorded spec,
    the weights are loaded into it strictly, and its outputs on the recorded
    example inputs must equal ``model``'s. Parameters the traced forward never
    uses (an auxiliary head that only runs in training) keep the fresh
    instance's values, so the state dict still loads strictly.

    Raises:
        WeightsError: the model still holds SNT blocks, or a pass changed its
            layers (BatchNorm folding, quantization), so the weights no
            longer fit the original class.
    """
    from .blocks import is_expanded
    from .models import ModelSpec
    from .tracing import inputs_from_spec, sntfx_meta

    meta = sntfx_meta(model)
    if "source" not in meta:
        raise WeightsError("this model does not record the class it was built from; build it from a spec "
                           "(sntfx.trace/transform('torchvision:resnet18', ...)) to write its original weights")
    if is_expanded(model):
        raise WeightsError("the model still holds SNT blocks: fold it first (sntfx fold / sntfx.fold); a state dict "
                           "for the original class holds folded weights")
    spec = ModelSpec.from_dict(meta["source"])
    original = spec.build(verify_hash=False)  # the code sntfx.load already rebuilt this model from
    passes = [p["name"] for p in meta.get("pipeline", [])]
    changed = [p for p in passes if p not in ("snt", "fold")]
    why = ""
    if changed:
        what = "merged the BatchNorm layers into the layers before them" if changed == ["fold_bn"] else \
            "changed the model's layers"
        why = (f" The pass{'es' if len(changed) > 1 else ''} {', '.join(changed)}"
               f"{' (--batchnorm)' if 'fold_bn' in changed else ''} {what}, so its weights no longer fit the original "
               "class: fold without "
               + ("--batchnorm" if changed == ["fold_bn"] else "them") + " to write weights for it, or keep the "
               "sntfx model file (--out).")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    expected = original.state_dict()
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if unexpected or shapes:
        raise WeightsError(
            f"the folded model's weights do not fit the original {type(original).__name__} "
            f"({'unexpected ' + _few(unexpected) if unexpected else ''}{'; ' if unexpected and shapes else ''}"
            f"{'other shapes: ' + _few(shapes) if shapes else ''}).{why}"
        )
    unused = sorted(set(expected) - set(state))
    full = {**{k: expected[k].detach().cpu() for k in unused}, **state}
    original.load_state_dict(full, strict=True)
    inputs = inputs_from_spec(meta.get("input_spec", []))
    err = _max_relative_difference(model, original, inputs)
    if err > atol:
        raise WeightsError(
            f"the original {type(original).__name__} with the folded weights does not compute what the folded model "
            f"does (relative difference {err:.2e}"
            + (f"; the folded model lacks {_few(unused)}" if unused else "") + f").{why}"
        )
    if unused:
        log.warning("weights: %s are not used by the traced forward; the state dict keeps a fresh instance's "
                    "values for them", _few(unused))
    return full


def _max_relative_difference(a: nn.Module, b: nn.Module, inputs: tuple) -> float:
    from torch.utils._pytree import tree_leaves

    modes = a.training, b.training
    a.eval(), b.eval()
    try:
        with torch.no_grad():
            out_a = [t for t in tree_leaves(a(*inputs)) if isinstance(t, torch.Tensor)]
            out_b = [t for t in tree_leaves(b(*inputs)) if isinstance(t, torch.Tensor)]
    finally:
        a.train(modes[0]), b.train(modes[1])
    if len(out_a) != len(out_b) or any(x.shape != y.shape for x, y in zip(out_a, out_b)):
        return float("inf")
    err = 0.0
    for x, y in zip(out_a, out_b):
        if x.numel() and x.is_floating_point():
            err = max(err, ((x - y).abs().max() / x.abs().max().clamp_min(1e-12)).item())
        elif not torch.equal(x, y):
            return float("inf")
    return err


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a state dict atomically: ``.safetensors`` (safetensors) or ``.pt``/``.pth`` (``torch.save``)."""
    path = check_state_dict_path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}  # safetensors refuses shared storage
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    return atomic_torch_save(tensors, path)


def build_with_weights(spec, *, weights: Any = None, pretrained: bool | str = False, hint: str = "") -> nn.Module:
    """Build a :class:`~sntfx.models.ModelSpec` and load its initial weights.

    ``weights`` is a weights file or a state dict, loaded strictly; for a
    torchvision spec it may also be what torchvision's own ``weights=`` takes
    (a weights enum member or its name, e.g. ``"DEFAULT"``), which means its
    pretrained weights from the local cache, like ``pretrained``.
    """
    if weights is not None and pretrained:
        raise WeightsError("give initial weights once: a weights file (--weights FILE) or the pretrained ones "
                           "(--pretrained), not both")
    named_file = isinstance(weights, (str, os.PathLike)) and (
        Path(weights).suffix.lower() in (".safetensors", *TORCH_SUFFIXES) or Path(weights).exists())
    if spec.kind == "torchvision" and weights is not None and not named_file and not isinstance(weights, Mapping):
        weights, pretrained = None, getattr(weights, "name", weights)  # a torchvision weights enum or its name
        if not isinstance(pretrained, str):
            raise WeightsError(f"weights={pretrained!r} is neither a weights file nor torchvision weights "
                               "(e.g. 'DEFAULT' or 'IMAGENET1K_V1')")
    model = spec.build(pretrained=pretrained)
    if weights is not None:
        load_weights(model, weights, hint=hint)
    return model
