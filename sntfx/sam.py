"""Sharpness-aware minimization (SAM), done the way it should be.

SAM (Foret et al., 2021) takes two forward/backward passes per step: the
gradient ``g`` at ``w`` gives the worst-case perturbation ``e = rho g / ||g||``
(adaptive SAM: ``e = rho T^2 g / ||T g||`` with ``T = |w|``); the gradient at
``w + e`` then updates ``w`` with the base optimizer.

Three things common implementations get wrong, and this one does not:

* BatchNorm running statistics are updated once per step, by the first pass:
  every buffer is restored after the perturbed pass.
* Under DistributedDataParallel the first backward runs under ``no_sync()``:
  each rank perturbs with its own gradient and only the second gradient is
  all-reduced (one all-reduce per step, as in plain training).
* Under bf16 autocast both passes run in the same precision; the perturbation
  and the update use the fp32 parameters and gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["SAM", "preserve_buffers"]


class SAM:
    """Wraps a base optimizer; call :meth:`step` with a closure computing the loss.

    Example::

        sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
        loss = sam.step(model, lambda: criterion(model(x), y))
    """

    def __init__(self, params: Iterable[nn.Parameter], base: torch.optim.Optimizer, *, rho: float = 0.05,
                 adaptive: bool = False):
        if rho < 0:
            raise ValueError(f"SAM rho must be >= 0, got {rho}")
        self.params = [p for p in params if p.requires_grad]
        self.base, self.rho, self.adaptive = base, rho, adaptive
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def param_groups(self):
        return self.base.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)

    @torch.no_grad()
    def perturb(self) -> None:
        """Move to ``w + e`` using the current gradients (``w`` is kept for :meth:`restore`)."""
        pairs = [(p, p.grad) for p in self.params if p.grad is not None]
        if not pairs:
            self._saved = []
            return
        scaled = [(p.abs() * g if self.adaptive else g).float() for p, g in pairs]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        scale = self.rho / (norm + 1e-12)
        self._saved = [(p, p.detach().clone()) for p, _ in pairs]
        for p, g in pairs:
            e = (p.square() * g if self.adaptive else g) * scale
            p.add_(e.to(p.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        """Back to exactly ``w``."""
        for p, w in self._saved:
            p.copy_(w)
        self._saved = []

    def step(self, model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One SAM step. ``loss_fn`` runs the forward pass and returns the loss.

        Returns the loss at ``w`` (the unperturbed weights).
        """
        no_sync = getattr(model, "no_sync", contextlib.nullcontext)
        self.zero_grad()
        with no_sync():
            loss = loss_fn()
            loss.backward()
        self.perturb()
        self.zero_grad()
        with preserve_buffers(model):
            loss_fn().backward()
        self.restore()
        self.base.step()
        return loss.detach()


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
