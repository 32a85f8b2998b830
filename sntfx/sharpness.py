"""Sharpness of the training loss: Hessian spectrum, SAM sharpness, loss landscapes.

All measurements use eval mode (BatchNorm with running statistics, no
dropout), a fixed set of training batches, and the mean cross-entropy over
them, so that two models are compared on the same function of their weights.
Compare methods on their folded models: they then share one architecture.

* :func:`top_eigenvalue` -- largest Hessian eigenvalue by power iteration with
  Hessian-vector products (double backward).
* :func:`hessian_trace` -- Hutchinson's estimator ``E[v^T H v]`` with
  Rademacher ``v``.
* :func:`sam_sharpness` -- ``L(w + rho g/||g||) - L(w)``, the loss increase under
  the first-order worst-case perturbation of norm ``rho``.
* :func:`landscape` -- the loss along one or two filter-normalised random
  directions (Li et al., 2018); :func:`plot_landscape` draws it as PNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .graph_utils import mode

__all__ = [
    "top_eigenvalue",
    "hessian_trace",
    "sam_sharpness",
    "landscape",
    "plot_landscape",
    "batch_loss_fn",
    "measure",
]

LossFn = Callable[[], torch.Tensor]


def batch_loss_fn(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> LossFn:
    """Mean cross-entropy of ``model`` over fixed batches, as a closure."""

    def loss() -> torch.Tensor:
        total = 0.0
        n = sum(len(y) for _, y in batches)
        device = next((p.device for p in model.parameters()), None)  # the batches follow the model
        for x, y in batches:
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            total = total + F.cross_entropy(model(x), y, reduction="sum")
        return total / n

    return loss


def _params(params: Sequence[torch.Tensor] | nn.Module) -> list[torch.Tensor]:
    if isinstance(params, nn.Module):
        return [p for p in params.parameters() if p.requires_grad]
    return list(params)


def _hvp(loss_fn: LossFn, params: list[torch.Tensor], v: list[torch.Tensor]) -> list[torch.Tensor]:
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * vi).sum() for g, vi in zip(grads, v))
    return [h.detach() for h in torch.autograd.grad(dot, params)]


def _normalize(v: list[torch.Tensor]) -> list[torch.Tensor]:
    norm = math.sqrt(sum(float((x * x).sum()) for x in v))
    return [x / (norm + 1e-30) for x in v]


def top_eigenvalue(loss_fn: LossFn, params, *, iters: int = 50, tol: float = 1e-4, seed: int = 0) -> float:
    """Largest (by magnitude) eigenvalue of the Hessian of ``loss_fn`` w.r.t. ``params``."""
    params = _params(params)
    gen = torch.Generator().manual_seed(seed)
    v = _normalize([torch.randn(p.shape, generator=gen).to(p) for p in params])
    eig = 0.0
    for _ in range(iters):
        hv = _hvp(loss_fn, params, v)
        new = sum(float((h * x).sum()) for h, x in zip(hv, v))
        v = _normalize(hv)
        if abs(new - eig) <= tol * max(abs(new), 1e-12):
            eig = new
            break
        eig = new
    return eig


def hessian_trace(loss_fn: LossFn, params, *, samples: int = 20, seed: int = 0) -> float:
    """Hutchinson estimate of the Hessian trace."""
    params = _params(params)
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(samples):
        v = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in params]
        hv = _hvp(loss_fn, params, v)
        total += sum(float((h * x).sum()) for h, x in zip(hv, v))
    return total / samples


def sam_sharpness(loss_fn: LossFn, params, *, rho: float = 0.05) -> float:
    """Loss increase at ``w + rho g / ||g||`` over ``L(w)``."""
    params = _params(params)
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params)
    loss = loss.detach()
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    with torch.no_grad():
        steps = [g * (rho / (norm + 1e-12)) for g in grads]
        for p, s in zip(params, steps):
            p.add_(s)
        try:
            perturbed = float(loss_fn())
        finally:
            for p, s in zip(params, steps):
                p.sub_(s)
    return perturbed - float(loss)


def _filter_normalised_direction(model: nn.Module, gen: torch.Generator) -> list[torch.Tensor]:
    """A random direction scaled filter by filter to the weights' norms; zero on biases and norms."""
    direction = []
    for p in model.parameters():
        d = torch.randn(p.shape, generator=gen).to(p)
        if p.dim() <= 1:
            d.zero_()
        else:
            w = p.detach().reshape(p.shape[0], -1)
            dd = d.reshape(p.shape[0], -1)
            dd.mul_(w.norm(dim=1, keepdim=True) / (dd.norm(dim=1, keepdim=True) + 1e-10))
        direction.append(d)
    return direction


@torch.no_grad()
def landscape(model: nn.Module, loss_fn: LossFn, *, dims: int = 1, steps: int = 21, span: float = 1.0,
              seed: int = 0) -> dict:
    """Loss on a line (``dims=1``) or plane (``dims=2``) through the weights.

    Returns ``{"alphas": [...], "losses": [...]}`` (1-D) or
    ``{"alphas": [...], "betas": [...], "losses": [[...]]}`` (2-D).
    """
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    origin = [p.detach().clone() for p in params]
    d1 = _filter_normalised_direction(model, gen)
    d2 = _filter_normalised_direction(model, gen) if dims == 2 else None
    coords = torch.linspace(-span, span, steps).tolist()
    try:
        if dims == 1:
            losses = []
            for a in coords:
                for p, o, d in zip(params, origin, d1):
                    p.copy_(o + a * d)
                losses.append(float(loss_fn()))
            return {"alphas": coords, "losses": losses}
        grid = []
        for b in coords:
            row = []
            for a in coords:
                for p, o, u, v in zip(params, origin, d1, d2):
                    p.copy_(o + a * u + b * v)
                row.append(float(loss_fn()))
            grid.append(row)
        return {"alphas": coords, "betas": coords, "losses": grid}
    finally:
        for p, o in zip(params, origin):
            p.copy_(o)


def plot_landscape(curves: dict[str, dict], path, *, title: str = "") -> None:
    """Draw 1-D landscapes (several models on one axis) or one 2-D contour map as PNG."""
    from .plotting import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    two_d = [name for name, c in curves.items() if "betas" in c]
    if two_d:
        c = curves[two_d[0]]
        cs = ax.contour(c["alphas"], c["betas"], c["losses"], levels=20)
        ax.clabel(cs, inline=True, fontsize=7)
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
        ax.set_title(title or f"loss landscape: {two_d[0]}")
    else:
        for name, c in curves.items():
            ax.plot(c["alphas"], c["losses"], label=name)
        ax.set_xlabel("step along a filter-normalised random direction")
        ax.set_ylabel("training loss")
        ax.set_title(title or "1-D loss landscape")
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def measure(model: nn.Module, batches, *, rho: float = 0.05, iters: int = 50, trace_samples: int = 20,
            seed: int = 0) -> dict[str, float]:
    """Top eigenvalue, Hessian trace, SAM sharpness and the loss, in eval mode."""
    with mode(model, training=False):
        loss_fn = batch_loss_fn(model, batches)
        with torch.no_grad():
            loss = float(loss_fn())
        return {
            "loss": loss,
            "top_eigenvalue": top_eigenvalue(loss_fn, model, iters=iters, seed=seed),
            "hessian_trace": hessian_trace(loss_fn, model, samples=trace_samples, seed=seed),
            "sam_sharpness": sam_sharpness(loss_fn, model, rho=rho),
        }
