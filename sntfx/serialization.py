"""Save and load models as a recipe plus weights; loading never runs code from the file.

File layout (written with ``torch.save``, read with ``weights_only=True``)::

    {"format": "sntfx-model", "version": 1,
     "recipe": "<JSON text>",          # source, inputs, opaque modules, pipeline, versions
     "digest": "<sha256 hex>",         # of the recipe and every tensor
     "state_dict": {name: tensor}}

The recipe says where the model comes from (:class:`~sntfx.models.ModelSpec`),
its example input spec, the modules tracing kept opaque and the pass pipeline
with its parameters. :func:`load` rebuilds the architecture from the recipe
(build, trace, replay the passes) and then loads the weights strictly. Only
plain containers and tensors are unpickled; a file that is not ours, was
truncated or edited gets a :class:`~sntfx.errors.FileFormatError`.

Trust. Rebuilding from a ``sntfx:``, ``torchvision:`` or ``timm:`` source
builds a known architecture and runs nothing from the file. A ``file`` or
``import`` source would import Python code, which runs it, so :func:`load`
refuses it (:class:`~sntfx.errors.UntrustedSourceError`, before anything is
imported) unless one of these holds:

* the caller trusts the file: ``trust_source=True`` (CLI ``--trust-source``),
  the convention of ``trust_remote_code``;
* the caller names the model file to rebuild from: ``model_file=PATH``
  (CLI ``--model-file PATH``);
* the file was saved by this user on this machine: it carries a valid
  signature under the local key (:mod:`sntfx.signing`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from . import signing
from .errors import FileFormatError, SntfxError, UntrustedSourceError
from .io import atomic_torch_save
from .models import ModelSpec
from .pass_base import PassContext, get_pass_class, pass_from_spec
from .tracing import inputs_from_spec, sntfx_meta, trace

__all__ = ["save", "load", "read_recipe", "check_trust", "FORMAT", "VERSION", "library_versions"]

log = logging.getLogger(__name__)

FORMAT = "sntfx-model"
VERSION = 1


def library_versions() -> dict[str, str]:
    from . import __version__

    versions = {"sntfx": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import torchvision

        versions["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    return versions


def _digest(recipe_text: str, state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(recipe_text.encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(model: nn.Module, path: str | Path, *, source: ModelSpec | str | None = None, info: dict | None = None) -> Path:
    """Write ``model`` (a GraphModule from sntfx) to ``path``, atomically.

    Args:
        model: a GraphModule made by :func:`sntfx.trace` / :func:`sntfx.transform`
            from a model spec, or any traced module when ``source`` is given.
        path: output file (``.pt``).
        source: where the model comes from, if the model does not record it.
        info: extra JSON-able information stored in the recipe (e.g. training).

    Example::

        gm = sntfx.transform("torchvision:resnet18", torch.randn(1, 3, 224, 224))
        sntfx.save(gm, "snt_resnet18.pt")
    """
    if not isinstance(model, fx.GraphModule):
        raise SntfxError("sntfx.save expects a GraphModule from sntfx.trace/transform/fold")
    meta = sntfx_meta(model)
    if source is not None:
        meta["source"] = (ModelSpec.parse(source) if isinstance(source, str) else source).to_dict()
    if "source" not in meta:
        raise SntfxError(
            "this model does not record where it came from, so it could not be rebuilt on load: build it from a "
            "spec (sntfx.transform('pkg.module:factory', inputs), 'model.py', 'torchvision:NAME') or pass "
            "source='pkg.module:factory' to sntfx.save"
        )
    recipe = {
        "source": meta["source"],
        "input_spec": meta.get("input_spec", []),
        "opaque_modules": meta.get("opaque_modules", []),
        "pipeline": meta.get("pipeline", []),
        "info": {**meta.get("info", {}), **(info or {})},
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        recipe_text = json.dumps(recipe, sort_keys=True)
    except TypeError as exc:
        raise SntfxError(f"recipe is not JSON-serialisable ({exc}); pass only plain values in info=") from exc
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    digest = _digest(recipe_text, state)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "recipe": recipe_text,
        "digest": digest,
        "state_dict": state,
    }
    signature = signing.sign(digest)
    if signature is not None:
        payload["signature"] = signature
    return atomic_torch_save(payload, path)


#: What to do with a file of weights alone (a state dict) handed where an sntfx model belongs.
_WEIGHTS_HINT = "load it into a model with --weights FILE, e.g. `sntfx transform MODEL --weights FILE --out model.pt`"


def _other_format(path: Path, head: bytes) -> tuple[str, str] | None:
    """(what, what to do) for a model or weights file of another format that a user may hand sntfx by mistake,
    from its first 16 bytes ``head``."""
    if len(head) >= 9 and int.from_bytes(head[:8], "little") < 1 << 27 and head[8:9] == b"{":  # header size, JSON
        return "a safetensors file (weights only)", _WEIGHTS_HINT
    if head[:1] == b"\x08" and b"\x12" in head[:4]:  # protobuf: ir_version, then producer_name (ONNX ModelProto)
        try:
            import onnx

            onnx.load_model(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001 - not ONNX after all
            return None
        return ("an ONNX model", "`sntfx bench` measures ONNX files; the commands that read models take the .pt it "
                "was exported from")
    return None


def _read(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], bool]:
    """(recipe, weights, signed by this user's key); nothing from the recipe is imported or called."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"'{path}' does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a valid file"
        with open(path, "rb") as f:
            head = f.read(16)
        other = _other_format(path, head)
        if other is not None:
            raise FileFormatError(f"'{path}' is {other[0]}, not an sntfx model file (written by sntfx.save / the "
                                  f"sntfx CLI); {other[1]}") from exc
        why = (f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
               if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" else "it is not a torch file at all")
        raise FileFormatError(
            f"'{path}' is not an sntfx model file, or it is damaged ({why}). sntfx reads only files written "
            "by sntfx.save / the sntfx CLI, and never executes code from a file."
        ) from exc
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise FileFormatError(f"'{path}' holds weights only (a state dict), not an sntfx model; {_WEIGHTS_HINT}")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FileFormatError(
            f"'{path}' is a torch file but not an sntfx model (no '{FORMAT}' header); create one with "
            "`sntfx transform` or sntfx.save"
        )
    if payload.get("version") != VERSION:
        raise FileFormatError(f"'{path}' has sntfx format version {payload.get('version')}; this sntfx reads version {VERSION}")
    recipe_text, state, digest = payload.get("recipe"), payload.get("state_dict"), payload.get("digest")
    if not isinstance(recipe_text, str) or not isinstance(state, dict) or not isinstance(digest, str):
        raise FileFormatError(f"'{path}' is missing its recipe, weights or digest")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise FileFormatError(f"'{path}' holds weights that are not named tensors")
    if _digest(recipe_text, state) != digest:
        raise FileFormatError(f"'{path}' was modified after it was written (digest mismatch); re-create it")
    try:
        recipe = json.loads(recipe_text)
    except ValueError as exc:
        raise FileFormatError(f"'{path}' has an unreadable recipe: {exc}") from exc
    if not isinstance(recipe, dict):
        raise FileFormatError(f"'{path}' has a recipe that is not a JSON object")
    for key in ("source", "input_spec", "pipeline"):
        if key not in recipe:
            raise FileFormatError(f"'{path}' has a recipe without '{key}'")
    return recipe, state, signing.verify(payload.get("signature"), digest)


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe of a saved model, validated, without rebuilding the model (nothing is imported)."""
    return _read(path)[0]


def check_trust(path: str | Path, spec: ModelSpec, *, trust_source: bool | Callable[[ModelSpec], bool] = False,
                model_file=None, signed: bool = False) -> None:
    """Refuse to rebuild ``spec`` from ``path`` if that would run code the user has not trusted."""
    if not spec.runs_code or model_file is not None or signed:
        return
    if trust_source(spec) if callable(trust_source) else trust_source:
        return
    what = f"the Python file '{spec.name}'" if spec.kind == "file" else f"the Python module '{spec.name}'"
    raise UntrustedSourceError(
        f"'{path}' rebuilds its model by importing {what} ({spec.kind} source), and importing runs that code; "
        "sntfx runs no code named by a file you have not trusted (this file was not saved by you on this machine). "
        "If you trust where it came from, pass --trust-source (sntfx.load(..., trust_source=True)); or rebuild "
        "from a model file you choose with --model-file PATH (model_file=PATH). Files from sntfx:, torchvision: "
        "and timm: sources need neither."
    )


def load(path: str | Path, *, model_file: str | Path | None = None,
         trust_source: bool | Callable[[ModelSpec], bool] = False) -> fx.GraphModule:
    """Rebuild a saved model: build from its source, trace, replay the passes, load weights.

    Args:
        path: a file written by :func:`save` or the CLI.
        model_file: for a model built from a Python file, use this file instead
            of the recorded one (moved, or deliberately changed). Naming it
            trusts it.
        trust_source: rebuild a ``file``/``import`` source even though the
            file was not saved by this user on this machine (importing runs
            code: only for files whose origin you trust). A callable is asked
            about the recipe's source (a :class:`~sntfx.models.ModelSpec`)
            and trusts it by returning True: for callers that vouch for
            particular sources, such as the one their own command named.

    Returns:
        The GraphModule, in eval mode, with its recipe in ``gm.meta["sntfx"]``.

    Raises:
        UntrustedSourceError: the recipe names Python code to import and the
            file is not trusted (see the module docstring); nothing was imported.
    """
    from .pass_manager import PassManager  # local: pass_manager imports this module's neighbours

    recipe, state, signed = _read(path)
    spec = ModelSpec.from_dict(recipe["source"])
    check_trust(path, spec, trust_source=trust_source, model_file=model_file, signed=signed)
    if model_file is not None:
        override = ModelSpec.parse(str(model_file), entry=spec.entry, kwargs=spec.kwargs)
        spec, verify = override, False
    else:
        verify = True
    model = spec.build(verify_hash=verify)
    inputs = inputs_from_spec(recipe["input_spec"])
    gm = trace(model, inputs, leaf_modules=recipe.get("opaque_modules", []), check=False)
    meta = sntfx_meta(gm)
    meta["source"] = spec.to_dict()
    meta["info"] = recipe.get("info", {})
    passes = [pass_from_spec(p["name"], {**get_pass_class(p["name"]).legacy_params, **p.get("params", {})})
              for p in recipe["pipeline"]]
    if passes:
        gm = PassManager(passes).run(gm, PassContext(example_inputs=inputs, rebuild=True)).graph_module
    missing, unexpected = _diff_keys(gm.state_dict(), state)
    if missing or unexpected:
        raise FileFormatError(
            f"'{path}': the weights do not fit the architecture rebuilt from its recipe "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); the model source may have changed"
        )
    try:
        gm.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FileFormatError(f"'{path}': weights do not fit the rebuilt model: {exc}") from exc
    gm.eval()
    return gm


def _diff_keys(expected: dict, got: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
