"""``linear``: sequential linear expansion (expand -> core -> project), trained online.

For a ``k x k`` conv: ``1x1 (C_in -> r C_in)``, ``k x k (r C_in -> r C_out)``,
``1x1 (r C_out -> C_out)``, grouped like the original, no nonlinearity.
Fold: ``W[o,i,t] = sum_{b,a} W3[o,b] W2[b,a,t] W1[a,i]`` per group,
``bias = W3 b2 + b3``. ``online=True`` runs that composed kernel as a single
convolution every step (same outputs and gradients), where that is cheaper than
the chain: always for convolutions on feature maps, not for a wide classifier
on a small batch (the composition's cost does not shrink with the batch). The
kernel is composed in whichever order, ``(W3 W2) W1`` or ``W3 (W2 W1)``,
costs fewer multiply-adds.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .base import LayerConfig, SNTBlock, _normal_, _semi_orthogonal, _span, _sub_conv, _uniform_
from .registry import register_style

__all__ = ["LinearExpansion"]


@register_style("linear", label="linear expansion x RATIO (1x1 -> kxk -> 1x1)", options=("ratio",),
                trains_online=True, bias_sink=False, step_cost=1.07)  # measured: registry.COST_SOURCE
class LinearExpansion(SNTBlock):
    """Sequential linear expansion: expand -> core -> project, no nonlinearity.

    For a ``k x k`` conv with ratio ``r``: ``expand`` 1x1 ``C_in -> r C_in``,
    ``core`` ``k x k`` ``r C_in -> r C_out`` (the layer's stride and dilation),
    ``project`` 1x1 ``r C_out -> C_out``; all with the layer's groups. For a
    Linear ``d_in -> d_out`` both hidden widths are ``r min(d_in, d_out)``
    (the product cannot have a higher rank than that, and a VGG classifier's
    ``25088 -> 4096`` stays trainable).

    Args:
        config: the layer replaced.
        ratio: expansion ratio r (>= 1).
        online: forward by composing the effective kernel and running one
            conv/matmul (same function and gradients), on every input for
            which that costs fewer MACs than the chain (:meth:`online_pays`).
    """

    style = "linear"
    #: besides the matrix products' multiply-adds (compose_macs): passes over compose_elements (factors,
    #: intermediate product, layout copy, kernel). Measured on a quiet 2-core x86 CPU (bench_compose_cost.py,
    #: cpu-compose-cost-3.json): 2.4 passes at 32 channels, 3.2 at 64 (3.25 in an earlier run), 0.7-1.0 at
    #: 128-256, none at 512 (where the products run faster than a conv). 4 (cost model 3's value, which
    #: counted passes over the kernel alone) over-counts the isolated composition a little at 32-64 channels,
    #: where budgets bind; inside a training step it costs more than alone (ResNet-56's compositions: 84 ms
    #: measured in the step, 76 ms by this count).
    compose_passes = 4.0
    #: two einsums, their reshapes and their backward: 842 us per call beyond the plain conv's on a 2-core
    #: x86 CPU whose conv unit is 68 ps (bench_compose_cost.py; cpu-compose-cost-call-overhead.json)
    call_overhead = 12_400_000.0
    always_composes = False  # online_pays: the chain where composing costs more

    def __init__(self, config: LayerConfig, ratio: int = 4, *, online: bool = False):
        super().__init__(config)
        if int(ratio) != ratio or ratio < 1:
            raise ValueError(f"ratio must be an integer >= 1, got {ratio}")
        self.ratio = int(ratio)
        self.online = online
        r, cin, cout = self.ratio, config.in_features, config.out_features
        if config.is_conv:
            self.hidden = (r * cin, r * cout)
        else:
            self.hidden = (r * min(cin, cout),) * 2
        a, b = self.hidden
        self.expand = _sub_conv(config, cin, a, None)
        self.core = _sub_conv(
            config, a, b, config.kernel or None, stride=config.stride, dilation=config.dilation, bias=config.bias
        )
        self.project = _sub_conv(config, b, cout, None, bias=config.bias)

    def reset_parameters(self, gen: torch.Generator) -> None:
        """Effective kernel variance equal to the layer's default init, 1/(3 fan_in).

        With ``expand ~ N(0, g/C_in)`` and ``project ~ N(0, g/B)``, the composed
        kernel's entries have variance ``(A/C_in) var(core)``; ``core`` gets the
        variance that makes this the default ``1/(3 fan_in)``.
        """
        c, g = self.config, self.config.groups
        a, b = self.hidden
        target_var = 1.0 / (3.0 * c.default_fan_in())
        _normal_(self.expand.weight, math.sqrt(g / c.in_features), gen)
        _normal_(self.core.weight, math.sqrt(target_var * c.in_features / a), gen)
        _normal_(self.project.weight, math.sqrt(g / b), gen)
        if c.bias:
            with torch.no_grad():
                self.core.bias.zero_()
            _uniform_(self.project.bias, c.default_fan_in(), gen)

    def preserve(self, layer: nn.Module, gen: torch.Generator) -> None:
        """Set the parameters so that the block computes exactly ``layer``.

        ``expand`` and ``project`` are semi-orthogonal (``W1^T W1`` and
        ``W3 W3^T`` act as the identity on the row and column spaces of the
        layer's weight ``W0``) and ``core = W3^T W0 W1^T`` tap by tap, so
        ``W3 core W1 = W0``.
        """
        c, g = self.config, self.config.groups
        a, b = self.hidden
        cin_g, cout_g, a_g, b_g = c.in_features // g, c.out_features // g, a // g, b // g
        w0 = layer.weight.detach().double().cpu().reshape(g, cout_g, cin_g, -1)  # (g, O, I, K)
        w1 = torch.empty(g, a_g, cin_g, dtype=torch.float64)
        w2 = torch.empty(g, b_g, a_g, w0.shape[-1], dtype=torch.float64)
        w3 = torch.empty(g, cout_g, b_g, dtype=torch.float64)
        for gi in range(g):
            rows = w0[gi].permute(0, 2, 1).reshape(-1, cin_g)  # every tap's rows
            cols = w0[gi].permute(0, 2, 1).reshape(cout_g, -1)
            w1[gi] = _semi_orthogonal(a_g, cin_g, gen, keep=lambda: _span(rows.T))
            w3[gi] = _semi_orthogonal(b_g, cout_g, gen, keep=lambda: _span(cols)).T
            w2[gi] = torch.einsum("bo,oik,ai->bak", w3[gi].T, w0[gi], w1[gi])
        with torch.no_grad():
            self.expand.weight.copy_(w1.reshape(self.expand.weight.shape))
            self.core.weight.copy_(w2.reshape(self.core.weight.shape))
            self.project.weight.copy_(w3.reshape(self.project.weight.shape))
            if c.bias:
                self.core.bias.zero_()
                self.project.bias.copy_(layer.bias.detach())

    def composed_weight_bias(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Compose the three layers into one kernel and bias, ``bias = W3 b2 + b3`` (differentiable); what
        ``online`` runs where it pays, and in float64 the fold."""
        c, g = self.config, self.config.groups
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        w1 = cast(self.expand.weight)
        w2 = cast(self.core.weight)
        w3 = cast(self.project.weight)
        a = w1.reshape(g, w1.shape[0] // g, w1.shape[1])  # (g, A, I)
        m = w2.reshape(g, w2.shape[0] // g, w2.shape[1], -1)  # (g, B, A, K)
        p = w3.reshape(g, w3.shape[0] // g, w3.shape[1])  # (g, O, B)
        if self._project_first():  # (W3 W2) W1: cheaper when the layer has fewer outputs than inputs
            w = torch.einsum("goak,gai->goik", torch.einsum("gob,gbak->goak", p, m), a)
        else:  # W3 (W2 W1)
            w = torch.einsum("gob,gbik->goik", p, torch.einsum("gbak,gai->gbik", m, a))
        # einsum may hand back a permuted layout: channels-last strides on a conv kernel (for a 1x1
        # kernel even when is_contiguous() holds). A convolution then returns channels-last
        # activations and the rest of the network runs in that format, so the expanded model would
        # differ from the plain one in speed for a reason that is not SNT's. Flattening and viewing
        # gives the standard strides (a copy only where the layout is permuted).
        w = w.reshape(-1).view(c.weight_shape())
        if not c.bias:
            return w, None
        b2 = cast(self.core.bias).reshape(g, -1)
        b = torch.einsum("gob,gb->go", p, b2).reshape(-1) + cast(self.project.bias)
        return w, b

    def composed_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The composed kernel alone (differentiable); see :meth:`composed_weight_bias`."""
        return self.composed_weight_bias(dtype)[0]

    @functools.cached_property
    def _compose_orders(self) -> tuple[int, int]:
        """MACs of composing the kernel as (W3 W2) W1 and as W3 (W2 W1)."""
        c, g = self.config, self.config.groups
        a, b = self.hidden
        o, i, k, a, b = c.out_features // g, c.in_features // g, c.ktaps, a // g, b // g
        return g * (o * b * a * k + o * a * k * i), g * (b * a * k * i + o * b * k * i)

    def compose_macs(self) -> int:
        """The cheaper composition order's multiply-adds (the bias's are negligible)."""
        return min(self._compose_orders)

    def compose_elements(self) -> int:
        """The three factors (read, and their gradients written), the intermediate product, the composed kernel
        and the core's layout copy (:meth:`saved_numel`): at ratio r the core alone has r^2 times the kernel's
        elements, which is what makes a composition of 32-64 channels cost about twice its multiply-adds."""
        return sum(p.numel() for p in self.parameters()) + self.saved_numel()

    def saved_numel(self) -> int:
        """The composed kernel, the intermediate product, and (composing ``W3 (W2 W1)`` a kernel with
        several taps) the core in the layout the product needs: einsum copies it, and autograd keeps the copy."""
        c, g = self.config, self.config.groups
        a, b = self.hidden
        o, i, k = c.out_features // g, c.in_features // g, c.ktaps
        kernel = math.prod(c.weight_shape())
        if self._project_first():
            return kernel + g * o * (a // g) * k
        return kernel + g * (b // g) * i * k + (self.core.weight.numel() if k > 1 else 0)

    def _project_first(self) -> bool:
        first, second = self._compose_orders
        return first <= second

    def online_pays(self, x: torch.Tensor) -> bool:
        """Whether composing the kernel and running one layer costs fewer MACs than the chain, for input ``x``.

        Composing costs the same for any batch; the chain's cost grows with the
        number of positions it runs on. A classifier (one position per image)
        on a small batch is cheaper as a chain; a convolution on a feature map
        is cheaper composed. Both compute the same function and gradients.
        """
        c = self.config
        rows_in = x.numel() // c.in_features
        rows_out = max(1, rows_in // math.prod(c.stride)) if c.is_conv else rows_in
        plain = rows_out * c.out_features * (c.in_features // c.groups) * c.ktaps
        a, b = self.hidden
        chain = rows_in * a * (c.in_features // c.groups) + rows_out * (b * (a // c.groups) * c.ktaps
                                                                       + c.out_features * (b // c.groups))
        return min(self._compose_orders) + plain < chain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if self.online and self.online_pays(x):
            return self.forward_composed(x)
        if c.is_conv:
            x = c.pad(x)
        return self.project(self.core(self.expand(x)))

    def macs(self, in_shape, out_shape) -> int:
        c, g = self.config, self.config.groups
        a, b = self.hidden
        rows_in = math.prod(in_shape) // c.in_features
        rows_out = math.prod(out_shape) // c.out_features
        return rows_in * a * (c.in_features // g) + rows_out * b * (a // g) * c.ktaps + rows_out * c.out_features * (b // g)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ratio={self.ratio}, online={self.online}"
