"""``powerprop``: Powerpropagation, an elementwise reparameterization ``W = v |v|^(alpha - 1)`` (alpha = 2).

Schwarz et al. (2021): training ``v`` instead of ``W`` scales each weight's
gradient by ``alpha |v|^(alpha - 1)``, so weights near zero barely move and
large ones grow: a "rich get richer" dynamic that leaves many weights close
to zero, which magnitude pruning then removes cheaply. The block holds ``v``
(the layer's shape) and the layer's bias; every forward composes ``W`` (one
elementwise power) and runs the original layer's operation, so it always
trains at about a plain layer's cost, and folding gives ``W`` exactly.
``preserve`` sets ``v = sign(W) |W|^(1 / alpha)``.

The composition is one autograd node (:class:`SignedPower`): forward
``v |v|^(alpha - 1)``, backward ``alpha |v|^(alpha - 1) g``, two elementwise
passes each way instead of the half-dozen that autograd records for the
expression (measured on VGG-11 at batch 128: powerprop's step went from
1.19x to about Adam's, see ``benchmarks/bench_train_step.py``).
``forward_explicit`` keeps the autograd expression as the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import LayerConfig, SNTBlock, _uniform_, layer_macs
from .registry import register_style

__all__ = ["PowerPropagation", "SignedPower", "ALPHA"]

ALPHA = 2.0


class SignedPower(torch.autograd.Function):
    """``w = v |v|^(alpha - 1)`` with the hand-written derivative ``dw/dv = alpha |v|^(alpha - 1)``.

    The backward is written in differentiable operations on the saved input,
    so Hessian-vector products through an online block stay correct.
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(v)
        ctx.alpha = alpha
        return v * _magnitude(v, alpha)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (v,) = ctx.saved_tensors
        return grad * _magnitude(v, ctx.alpha) * ctx.alpha, None


def _magnitude(v: torch.Tensor, alpha: float) -> torch.Tensor:
    """``|v|^(alpha - 1)``, without a power for alpha = 2."""
    return v.abs() if alpha == 2.0 else v.abs().pow(alpha - 1.0)


@register_style("powerprop", label=f"Powerpropagation, W = v|v|^{ALPHA - 1:g} (elementwise)", trains_online=True,
                bias_sink=False, step_cost=1.01)  # measured: registry.COST_SOURCE
class PowerPropagation(SNTBlock):
    """``W = v |v|^(alpha - 1)`` per weight (see the module docstring)."""

    style = "powerprop"
    #: forward and backward of the elementwise composition (measured 4.4-6.1 passes; bench_compose_cost.py)
    compose_passes = 5.0
    #: one elementwise composition and its backward: 114 us per call beyond the plain conv's (same machine
    #: and results as linear's)
    call_overhead = 1_700_000.0

    def __init__(self, config: LayerConfig, alpha: float = ALPHA):
        super().__init__(config)
        self.alpha = float(alpha)
        self.v = nn.Parameter(torch.empty(config.weight_shape()))
        self.bias = nn.Parameter(torch.zeros(config.out_features)) if config.bias else None

    def _set_weight(self, w: torch.Tensor) -> None:
        with torch.no_grad():
            self.v.copy_(torch.sign(w) * w.abs().pow(1.0 / self.alpha))

    def reset_parameters(self, gen: torch.Generator) -> None:
        """``W`` starts at PyTorch's default init (uniform in +-1/sqrt(fan_in)); ``v`` is its root."""
        c = self.config
        w = _uniform_(torch.empty(c.weight_shape(), dtype=torch.float64), c.default_fan_in(), gen)
        self._set_weight(w)
        if self.bias is not None:
            _uniform_(self.bias, c.default_fan_in(), gen)

    def preserve(self, layer: nn.Module, gen: torch.Generator) -> None:
        self._set_weight(layer.weight.detach().double())
        if self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(layer.bias.detach())

    def composed_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W`` (differentiable, in ``dtype`` or the parameter's dtype), through :class:`SignedPower`."""
        v = self.v if dtype is None else self.v.to(dtype)
        return SignedPower.apply(v, self.alpha)

    def forward_explicit(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer with ``W`` as an autograd expression (the reference ``SignedPower`` is tested against)."""
        return self.config.apply(x, self.v * self.v.abs().pow(self.alpha - 1.0), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_composed(x) if self.online else self.forward_explicit(x)

    def macs(self, in_shape, out_shape) -> int:
        return layer_macs(self.config, out_shape)  # one layer's work: the composition is elementwise

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha:g}"
