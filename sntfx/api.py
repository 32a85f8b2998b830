"""The high-level Python API: trace, transform, fold, build."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch.fx as fx
from torch import nn

from .errors import SntfxError
from .models import ModelSpec
from .pass_base import PassContext
from .pass_manager import PassManager, PipelineReport
from .pipelines import DEFAULT_BATCH, DEFAULT_BUDGET, DEFAULT_MEMORY_BUDGET
from .policy import Policy
from .tracing import as_input_tuple, sntfx_meta
from .tracing import trace as _trace

__all__ = ["trace", "transform", "fold", "build_model"]


def build_model(spec: str | ModelSpec, *, weights: Any = None, pretrained: bool | str = False,
                **kwargs: Any) -> nn.Module:
    """Build a model from a spec string (``torchvision:resnet18``, ``model.py``, ...).

    Args:
        spec: the model spec; ``kwargs`` are its constructor arguments.
        weights: initial weights: a ``.safetensors``/``.pt`` state dict file (or a dict),
            loaded strictly; for torchvision also its ``weights=`` values (``"DEFAULT"``,
            a weights enum), read from the local cache like ``pretrained``.
        pretrained: torchvision's or timm's pretrained weights, from the local cache
            only (:mod:`sntfx.weights`); a missing file is an error, never a download.

    Example::

        model = sntfx.build_model("timm:resnet18", weights="my.safetensors", num_classes=10)
    """
    from .weights import build_with_weights

    spec = ModelSpec.parse(spec, kwargs=kwargs) if isinstance(spec, str) else spec
    return build_with_weights(spec, weights=weights, pretrained=pretrained)


def trace(
    model: nn.Module | str | ModelSpec,
    example_inputs: Any = None,
    *,
    leaf_modules: tuple[str, ...] | list[str] = (),
    check: bool = True,
    weights: Any = None,
    pretrained: bool | str = False,
) -> fx.GraphModule:
    """Trace a model (or a model spec) into a GraphModule with shapes recorded.

    A spec (``"torchvision:resnet18"``, ``"model.py"``, ...) is built first and
    recorded, so the result can be saved with :func:`sntfx.save`; without
    ``example_inputs`` the spec's default input is used. A spec starts from
    ``weights`` or the ``pretrained`` weights when given (see :func:`build_model`).

    The GraphModule holds ``model``'s own submodules, as ``torch.fx`` does
    (:func:`transform` copies a module first).

    Example::

        gm = sntfx.trace("sntfx:resnet20", torch.randn(1, 3, 32, 32))
    """
    spec = None
    if isinstance(model, (str, ModelSpec)):
        from .weights import build_with_weights

        spec = ModelSpec.parse(model) if isinstance(model, str) else model
        if example_inputs is None:
            example_inputs = spec.example_inputs()
        model = build_with_weights(spec, weights=weights, pretrained=pretrained)
    elif weights is not None or pretrained:
        raise SntfxError("weights= and pretrained= apply when the model is a spec (e.g. 'timm:resnet18'); load "
                         "weights into your own module with module.load_state_dict() or sntfx.load_weights()")
    gm = _trace(model, as_input_tuple(example_inputs), leaf_modules=leaf_modules, check=check)
    if spec is not None:
        sntfx_meta(gm)["source"] = spec.to_dict()
    return gm


def transform(
    model: nn.Module | str | ModelSpec,
    example_inputs: Any = None,
    *,
    style: str | None = None,
    ratio: int | None = None,
    policy: Policy | dict | str | Path | None = None,
    preserve: bool = False,
    online: bool = False,
    seed: int = 0,
    check: bool = False,
    report: bool = False,
    inplace: bool = False,
    weights: Any = None,
    pretrained: bool | str = False,
    budget: float | None = DEFAULT_BUDGET,
    batch_size: int = DEFAULT_BATCH,
    memory_budget: float | None = DEFAULT_MEMORY_BUDGET,
    cost_model: int | None = None,
) -> fx.GraphModule | tuple[fx.GraphModule, PipelineReport]:
    """Trace and expand every eligible layer into an SNT block (the ``snt`` pass).

    Args:
        model: an ``nn.Module``, a GraphModule, or a model spec string.
        example_inputs: a tensor or tuple of tensors (a spec has a default).
        style / ratio: expansion style and ratio (override the policy's).
        policy: which layers to expand and how (:class:`~sntfx.policy.Policy`).
        preserve: start the blocks at exactly the original function.
        online: ``linear`` blocks run as one composed conv per call.
        seed: initialisation seed.
        check: with ``preserve=True``, verify the outputs are unchanged.
        report: also return the :class:`~sntfx.pass_manager.PipelineReport`.
        inplace: expand ``model`` itself instead of a copy (a GraphModule from :func:`trace`), or trace
            ``model`` without copying it first (an ``nn.Module``: the SNT model then shares the layers it
            leaves plain, its norms and buffers with ``model``, so training one changes the other). By
            default ``model`` is left as it was, whatever happens to the result.
        weights / pretrained: a spec's initial weights (see :func:`build_model`).
        budget / batch_size: the most that online training (composing kernels, updating the extra
            parameters) may add to a step, as a fraction of the plain layers' multiply-adds at
            ``batch_size``; layers over it stay plain
            (None: expand every eligible layer). See the ``snt`` pass.
        memory_budget: with ``budget``, the most the blocks may add to a training step's memory, as a
            fraction of the plain model's at ``batch_size`` (None: no memory limit).
        cost_model: how ``budget`` reckons a block's extra work (1, 2, 3 or 4; None: the snt pass's default,
            ``sntfx.passes.snt_expand.COST_MODEL``). Recipes record it, so a saved model reloads the same way.

    Example::

        snt = sntfx.transform(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224), style="linear", ratio=4)
    """
    from .pipelines import canonical_passes

    given = isinstance(model, fx.GraphModule) and "sntfx" in model.meta
    if given and (weights is not None or pretrained):
        raise SntfxError("weights= and pretrained= apply when the model is a spec; this GraphModule has its weights")
    if not given and isinstance(model, nn.Module) and not inplace:
        # tracing keeps the model's submodules (as torch.fx does): without a copy, training the SNT model
        # would change the plain layers, norms and buffers of the caller's model
        try:
            model = copy.deepcopy(model)
        except Exception as exc:  # noqa: BLE001 - any module that cannot be copied
            raise SntfxError(f"cannot copy {type(model).__name__} before transforming it ({exc}); pass inplace=True "
                             "to transform it without a copy (the SNT model then shares the layers it leaves "
                             "plain, and the norms, with it)") from exc
    gm = model if given else trace(model, example_inputs, weights=weights, pretrained=pretrained)
    inputs = as_input_tuple(example_inputs) or _recorded_inputs(gm)
    passes = canonical_passes("before-training", snt=dict(style=style, ratio=ratio, policy=policy, preserve=preserve,
                                                          online=online, seed=seed, budget=budget,
                                                          batch_size=batch_size, memory_budget=memory_budget)
                                | ({} if cost_model is None else {"cost_model": cost_model}))
    result = PassManager(passes, check=check).run(gm, PassContext(example_inputs=inputs, seed=seed),
                                                    inplace=inplace or not given)
    return (result.graph_module, result) if report else result.graph_module


def fold(
    model: fx.GraphModule,
    example_inputs: Any = None,
    *,
    batchnorm: bool = False,
    check: bool = False,
    report: bool = False,
    inplace: bool = False,
) -> fx.GraphModule | tuple[fx.GraphModule, PipelineReport]:
    """Fold every SNT block back into its original layer (the ``fold`` pass).

    Args:
        model: a GraphModule holding SNT blocks (e.g. from :func:`transform`).
        example_inputs: inputs on which each block's fold error is measured
            (default: random inputs of the recorded shapes).
        batchnorm: also fold the model's own BatchNorms into the layers before them
            (the canonical ``deployment`` pipeline instead of ``after-training``).
        check: verify the whole model's outputs are unchanged (raises if not).
        report: also return the :class:`~sntfx.pass_manager.PipelineReport`.
        inplace: fold ``model`` itself instead of a copy (saves memory).
    """
    from .pipelines import canonical_passes

    if not isinstance(model, fx.GraphModule):
        raise TypeError("sntfx.fold expects a GraphModule from sntfx.transform or sntfx.load")
    inputs = as_input_tuple(example_inputs) or _recorded_inputs(model)
    passes = canonical_passes("deployment" if batchnorm else "after-training")
    result = PassManager(passes, check=check).run(model, PassContext(example_inputs=inputs), inplace=inplace)
    return (result.graph_module, result) if report else result.graph_module


def _recorded_inputs(gm: fx.GraphModule) -> tuple:
    from .tracing import inputs_from_spec

    spec = sntfx_meta(gm).get("input_spec")
    return inputs_from_spec(spec) if spec else ()
