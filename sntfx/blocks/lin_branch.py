"""``lin-branch``: linearized multi-branch block (OREPA-style), trained online at one conv per step.

The ``branch`` style's branches (``k x k``, ``1x1`` on the centre tap, a
``1x1`` -> uniform ``k x k`` average path, identity), but each branch ends in
a learnable per-output-channel scale instead of a batch norm::

    W = a_k * W_k + a_1 * pad(W_1) + a_avg * spread(W_avg) / |k| + a_id * delta

Every branch is linear in the input with weights that do not depend on the
batch, so the sum is one kernel: the block composes ``W`` every step and runs
a single convolution (``online``, the default in training), with the same
outputs and gradients as the explicit branches (``forward_explicit``; blocks
start explicit, and training switches every online style on). The
composition costs ``O(C_out C_in k^2)`` per step, independent of the batch
and the feature-map size. Folding gives ``W`` and the layer's own bias, so no
bias sink is needed. ``preserve`` puts the layer's kernel in the ``k x k``
branch and zeros elsewhere (the other branches start at zero weight or zero
scale and grow from their gradients).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import _CONV_FN, LayerConfig, SNTBlock, _sub_conv, _uniform_, centre_crop, identity_matrix
from .registry import register_style

__all__ = ["LinearizedBranchBlock"]


@register_style("lin-branch", label="linearized branches (kxk, 1x1, avg, identity; per-channel scales)",
                trains_online=True, bias_sink=False, step_cost=1.06)  # measured: registry.COST_SOURCE
class LinearizedBranchBlock(SNTBlock):
    """Parallel linear branches with per-channel scales, composed into one kernel (see the module docstring)."""

    style = "lin-branch"
    #: addcmul, the centre-tap add, and their backward: measured 10.9 / 17.7 / 38.1 passes at 256 / 512 / 64
    #: channels (small kernels pay per-operation overhead); the median (bench_compose_cost.py)
    compose_passes = 18.0
    #: the branches' scaled sums and their backward: 826 us per call beyond the plain conv's (same machine
    #: and results as linear's). Both constants were measured before the composition dropped its index_put
    #: and in-place slice add (about a quarter less time per call since, A/B on 16 and 64 channels); they
    #: are kept, so the budget stays on the safe side and leaves the same layers plain as before.
    call_overhead = 12_200_000.0

    def __init__(self, config: LayerConfig):
        super().__init__(config)
        c = config
        self.main = _sub_conv(c, c.in_features, c.out_features, c.kernel or None, stride=c.stride,
                              dilation=c.dilation)
        multi_tap = c.is_conv and c.ktaps > 1
        self.aux = _sub_conv(c, c.in_features, c.out_features, None, stride=c.stride) if multi_tap else None
        self.avg_proj = _sub_conv(c, c.in_features, c.out_features, None) if multi_tap else None
        self.has_identity = c.in_features == c.out_features and all(s == 1 for s in c.stride)
        names = ["main"] + ["aux", "avg"] * multi_tap + ["identity"] * self.has_identity
        self.scales = nn.ParameterDict({n: nn.Parameter(torch.ones(c.out_features)) for n in names})
        self.bias = nn.Parameter(torch.zeros(c.out_features)) if c.bias else None
        if multi_tap:  # the one-hot indicator of the centre tap, 1 x 1 x k: a constant of the composition
            tap = torch.zeros((1, 1, *c.kernel))
            tap[(0, 0, *c.center)] = 1.0
            self.register_buffer("centre_tap", tap, persistent=False)  # follows .to(); not in the state dict

    # -- initialisation --------------------------------------------------------------
    def reset_parameters(self, gen: torch.Generator) -> None:
        """Default init for every branch; scales set so the summed kernel has about a default layer's energy."""
        c = self.config
        for conv in (self.main, self.aux, self.avg_proj):
            if conv is not None:
                _uniform_(conv.weight, conv.weight[0].numel(), gen)
        with torch.no_grad():
            branches = 1 + (self.aux is not None) + (self.avg_proj is not None)
            for name, scale in self.scales.items():
                scale.fill_(0.0 if name == "identity" else 1.0 / math.sqrt(branches))
            if self.bias is not None:
                _uniform_(self.bias, (c.in_features // c.groups) * c.ktaps, gen)

    def preserve(self, layer: nn.Module, gen: torch.Generator) -> None:
        """Compute exactly ``layer``: its kernel in the ``k x k`` branch; the others start at zero."""
        with torch.no_grad():
            self.main.weight.copy_(layer.weight.detach())
            for conv in (self.aux, self.avg_proj):
                if conv is not None:
                    _uniform_(conv.weight, conv.weight[0].numel(), gen)
            for name, scale in self.scales.items():
                scale.fill_(1.0 if name == "main" else 0.0)
            if self.bias is not None:
                self.bias.copy_(layer.bias.detach())

    # -- the composed kernel ---------------------------------------------------------
    def composed_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W`` (differentiable, in ``dtype`` or the parameters' dtype).

        A handful of operations whatever the branches, each one pass over the
        kernel or over a ``C_out x C_in`` plane (the composition runs every
        training step, and on small layers its cost is the operations' count,
        not their size): the average path is the same ``C_out x C_in`` matrix
        on every tap, so one broadcast ``addcmul`` adds it to the scaled
        ``k x k`` kernel; the ``1x1`` branch plus the identity (each group's
        block diagonal of scales) make the centre-tap plane, which a second
        broadcast ``addcmul`` adds through a constant one-hot tap indicator.
        Nothing larger than that plane is kept for the backward pass.
        """
        c = self.config
        dtype = dtype or self.main.weight.dtype
        bc = (slice(None),) + (None,) * (len(c.weight_shape()) - 1)
        s = {n: p.to(dtype) for n, p in self.scales.items()}
        w = self.main.weight.to(dtype) * s["main"][bc]
        if self.aux is None:  # one tap (a 1x1 conv, a Linear): the identity goes straight onto the kernel
            return w + identity_matrix(c, s["identity"]).view(w.shape) if self.has_identity else w
        # avg path, (O, I/g, 1, ..): one value per (o, i), spread evenly over the taps
        w = torch.addcmul(w, self.avg_proj.weight.to(dtype), s["avg"][bc], value=1.0 / c.ktaps)
        centre = self.aux.weight.to(dtype) * s["aux"][bc]  # (O, I/g, 1, ..): the 1x1 branch
        if self.has_identity:
            centre = centre + identity_matrix(c, s["identity"]).view(centre.shape)
        return torch.addcmul(w, centre, self.centre_tap.to(dtype))

    def forward_explicit(self, x: torch.Tensor) -> torch.Tensor:
        """The branches one by one (the reference the composed form is tested against)."""
        c = self.config
        view = (1, -1) + (1,) * c.ndim if c.is_conv else (-1,)
        xp = c.pad(x) if c.is_conv else x
        y = self.main(xp) * self.scales["main"].reshape(view)
        xc = centre_crop(c, xp) if c.is_conv else x
        if self.aux is not None:
            y = y + self.aux(xc) * self.scales["aux"].reshape(view)
            t = self.avg_proj(xp)
            uniform = torch.full((c.out_features, 1, *c.kernel), 1.0 / c.ktaps, dtype=t.dtype, device=t.device)
            t = _CONV_FN[c.ndim](t, uniform, None, c.stride, 0, c.dilation, c.out_features)
            y = y + t * self.scales["avg"].reshape(view)
        if self.has_identity:
            y = y + xc * self.scales["identity"].reshape(view)
        return y if self.bias is None else y + self.bias.reshape(view)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_composed(x) if self.online else self.forward_explicit(x)

    def macs(self, in_shape, out_shape) -> int:
        c = self.config
        out = math.prod(out_shape)
        cin_g = c.in_features // c.groups
        total = out * cin_g * c.ktaps
        if self.aux is not None:
            rows_in = math.prod(in_shape) // c.in_features
            total += out * cin_g + rows_in * c.out_features * cin_g + out * c.ktaps
        return total

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, branches={len(self.scales)}, online={self.online}"
