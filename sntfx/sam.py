"""Sharpness-aware minimization (SAM), done the way it should be.

SAM (Foret et al., 2021) takes two forward/backward passes per step: the
gradient ``g`` at ``w`` gives the worst-case perturbation ``e = rho g / ||g||``
(adaptive SAM: ``e = rho T^2 g / ||T g||`` with ``T = |w|``); the gradient at
``w + e`` then updates ``w`` with the base optimizer.

:class:`SAM` is a ``torch.optim.Optimizer`` wrapping a base optimizer: it
shares the base's ``param_groups`` and ``state``, so learning-rate schedulers
(``torch.optim.lr_scheduler``) drive the base's learning rate, ``state_dict()``
and ``load_state_dict()`` save and restore the base's state (with ``rho`` and
``adaptive``, which are per parameter group), and any loop that calls
``optimizer.step(closure)`` (plain PyTorch, Lightning's automatic optimization)
runs a full SAM step. The closure does what closures of ``torch.optim`` do:
zero the gradients, forward, backward, return the loss. SAM calls it twice,
at ``w`` and at ``w + e``, and returns the loss at ``w``::

    model = ...
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
              rho=0.05, model=model)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(sam, T_max=epochs)
    for epoch in range(epochs):
        for x, y in loader:
            def closure():
                sam.zero_grad()
                loss = criterion(model(x), y)
                loss.backward()
                return loss
            loss = sam.step(closure)
        scheduler.step()

Three things common implementations get wrong, and this one does not, given
the model (``model=`` or ``sam.model = ...``; under DDP the DDP wrapper):

* BatchNorm running statistics are updated once per step, by the first pass:
  every buffer is restored after the perturbed pass.
* Under DistributedDataParallel the first backward runs under ``no_sync()``:
  each rank perturbs with its own gradient and only the second gradient is
  all-reduced (one all-reduce per step, as in plain training).
* Under bf16 autocast (inside the closure) both passes run in the same
  precision; the perturbation and the update use the fp32 parameters and
  gradients.

Without a model, SAM cannot see the buffers nor the DDP wrapper: both passes
update the running statistics and both gradients are all-reduced (a warning
is logged once). The older call ``sam.step(model, loss_fn)``, where ``loss_fn``
returns the loss without calling ``backward``, still works and uses that model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["SAM", "preserve_buffers"]

log = logging.getLogger(__name__)

_NO_CLOSURE = ("SAM.step needs a closure: SAM evaluates the loss twice per step (at w and at w + e). Call "
               "opt.step(closure) where closure() zeroes the gradients, runs the forward pass, calls "
               "loss.backward() and returns the loss. (To drive the two passes by hand: backward at w, "
               "opt.perturb(), zero_grad, backward at w + e, opt.restore(), opt.base.step().)")


class SAM(torch.optim.Optimizer):
    """Wraps a base optimizer; :meth:`step` takes a closure, as ``torch.optim`` optimizers do.

    ``params`` are the parameters SAM perturbs (those without ``requires_grad``
    are skipped); they must be parameters of ``base``, which updates them.
    ``rho`` and ``adaptive`` are the defaults of every parameter group; a
    group may set its own (``add_param_group({"params": ..., "rho": 0.1})``).
    ``model``, when given, is the module whose buffers are restored after the
    perturbed pass and whose ``no_sync()`` (DDP) wraps the first backward.

    Example::

        sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, model=model)
        loss = sam.step(closure)  # closure(): sam.zero_grad(); loss = criterion(model(x), y); loss.backward()
                                  # and returns loss
    """

    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], base: torch.optim.Optimizer, *,
                 rho: float = 0.05, adaptive: bool = False, model: nn.Module | None = None):
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"SAM wraps a torch.optim.Optimizer, got {type(base).__name__}")
        if isinstance(base, SAM):
            raise TypeError("SAM cannot wrap another SAM")
        _check_rho(rho)
        given = []
        for item in params:
            given.extend(_as_list(item["params"] if isinstance(item, dict) else [item]))
        perturbed = {id(p) for p in given if p.requires_grad}
        base_params = [p for group in base.param_groups for p in group["params"]]
        missing = perturbed - {id(p) for p in base_params}
        if missing:
            raise ValueError(f"{len(missing)} of the parameters given to SAM are not in its base optimizer, which "
                             "would never update them; build the base optimizer on the same parameters")
        self.base = base
        self.model = model
        self._shared = False
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._warned_no_model = False
        # Base parameters SAM was not given: updated by the base, never perturbed (as before SAM was an Optimizer).
        self._not_perturbed = [p for p in base_params if id(p) not in perturbed]
        # The base's own group dicts: add_param_group (below) only fills in rho and adaptive where missing.
        super().__init__(base.param_groups, {**base.defaults, "rho": rho, "adaptive": adaptive})
        self.param_groups = base.param_groups  # the same list: schedulers and add_param_group reach the base
        self.state = base.state
        self._shared = True

    # -- the Optimizer protocol ------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (and so to SAM); its parameters are perturbed."""
        _check_rho(param_group.get("rho", self.defaults["rho"]))
        if not self._shared:  # during __init__: one of the base's groups
            super().add_param_group(param_group)
            return
        self.base.add_param_group(param_group)
        group = self.base.param_groups[-1]
        for name in ("rho", "adaptive"):
            group.setdefault(name, self.defaults[name])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the base optimizer (its own casting rules apply); also reads a base optimizer's state_dict."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self.base.load_state_dict(state_dict)
        self.param_groups = self.base.param_groups  # the base replaced its groups and state: share them again
        self.state = self.base.state
        for group in self.param_groups:
            for name in ("rho", "adaptive"):
                group.setdefault(name, self.defaults[name])  # a checkpoint of the base optimizer alone
            _check_rho(group["rho"])
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "base": self.base, "model": self.model, "_shared": self._shared,
                "_saved": [], "_warned_no_model": self._warned_no_model, "_not_perturbed": self._not_perturbed}

    def __repr__(self) -> str:
        return super().__repr__().replace("SAM (", f"SAM[{type(self.base).__name__}] (", 1)

    # -- compatibility with the pre-Optimizer attributes ---------------------------
    @property
    def rho(self) -> float:
        return self.param_groups[0]["rho"]

    @rho.setter
    def rho(self, value: float) -> None:
        _check_rho(value)
        self.defaults["rho"] = value
        for group in self.param_groups:
            group["rho"] = value

    @property
    def adaptive(self) -> bool:
        return self.param_groups[0]["adaptive"]

    @adaptive.setter
    def adaptive(self, value: bool) -> None:
        self.defaults["adaptive"] = value
        for group in self.param_groups:
            group["adaptive"] = value

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters SAM perturbs."""
        skip = {id(p) for p in self._not_perturbed}
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad and id(p) not in skip]

    # -- the two halves of a step ------------------------------------------------
    @torch.no_grad()
    def perturb(self) -> None:
        """Move to ``w + e`` using the current gradients (``w`` is kept for :meth:`restore`)."""
        skip = {id(p) for p in self._not_perturbed}
        found = [(p, p.grad, group) for group in self.param_groups for p in group["params"]
                 if p.requires_grad and p.grad is not None and id(p) not in skip]
        if not found:
            self._saved = []
            return
        scaled = [(p.abs() * g if group["adaptive"] else g).float() for p, g, group in found]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        self._saved = [(p, p.detach().clone()) for p, _, _ in found]
        scales: dict[int, torch.Tensor] = {}
        for p, g, group in found:
            scale = scales.get(id(group))
            if scale is None:
                scale = scales[id(group)] = group["rho"] / (norm + 1e-12)
            e = (p.square() * g if group["adaptive"] else g) * scale
            p.add_(e.to(p.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        """Back to exactly ``w``."""
        for p, w in self._saved:
            p.copy_(w)
        self._saved = []

    def step(self, closure: Callable[[], Any] | None = None, loss_fn: Callable[[], torch.Tensor] | None = None):
        """One SAM step; returns the closure's loss at ``w`` (the unperturbed weights).

        ``closure()`` zeroes the gradients, runs the forward and backward
        passes and returns the loss; SAM zeroes the gradients before each call
        too. The older form ``step(model, loss_fn)`` (``loss_fn`` returns the
        loss, SAM calls ``backward``) returns the loss detached.
        """
        if isinstance(closure, nn.Module):  # step(model, loss_fn)
            if loss_fn is None:
                raise ValueError("SAM.step(model, loss_fn) needs loss_fn; the usual form is SAM.step(closure)")

            def backward_closure():
                loss = loss_fn()
                loss.backward()
                return loss

            return self._sam_step(backward_closure, closure).detach()
        if loss_fn is not None:
            raise TypeError("SAM.step takes one closure (or the older form step(model, loss_fn))")
        if closure is None:
            raise ValueError(_NO_CLOSURE)
        if self.model is None and not self._warned_no_model:
            self._warned_no_model = True
            log.warning("SAM has no model: BatchNorm running statistics are updated by both passes and DDP "
                        "all-reduces both gradients; pass SAM(..., model=model) or set sam.model (the DDP wrapper "
                        "under DDP)")
        return self._sam_step(closure, self.model)

    def _sam_step(self, closure: Callable[[], Any], model: nn.Module | None):
        no_sync = getattr(model, "no_sync", None) or contextlib.nullcontext
        self.zero_grad()
        with torch.enable_grad(), no_sync():
            loss = closure()
        self.perturb()
        try:
            self.zero_grad()
            with torch.enable_grad(), preserve_buffers(model) if model is not None else contextlib.nullcontext():
                closure()
        finally:
            self.restore()
        self.base.step()
        return loss


def _check_rho(rho: float) -> None:
    if rho < 0:
        raise ValueError(f"SAM rho must be >= 0, got {rho}")


def _as_list(params) -> list:
    """The tensors of ``params``: a tensor, or an iterable of tensors or of ``(name, tensor)`` pairs."""
    items = [params] if isinstance(params, torch.Tensor) else list(params)
    return [p[1] if isinstance(p, tuple) else p for p in items]


@contextlib.contextmanager
def preserve_buffers(model: nn.Module):
    """Restore every buffer (BatchNorm running statistics, counters) on exit."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
