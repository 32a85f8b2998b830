"""``branch`` and ``qa-branch``: parallel branches summed, each normalised (RepVGG / QARepVGG).

``branch``: ``k x k``, ``1x1`` (on the input cropped to the kernel's centre
tap), an average-pool path (``1x1`` -> norm -> uniform ``k x k`` -> norm) and
identity when channels match and stride is 1, each with its own
normalisation. With running statistics a norm is ``y = s x + t``
(``s = g / sqrt(v + eps)``, ``t = beta - m s``), so the fold is
``W = s_k W_k + s_1 pad(W_1) + s_a2 s_a1 W_avg / |k| + s_id delta``,
``b = t_k + t_1 + s_a2 t_a1 + t_a2 + t_id``.

``qa-branch`` (``qa=True``): the QARepVGG remedy for low-bit quantization:
no normalisation on the ``1x1`` and identity branches (a per-channel scale on
the delta kernel is what piles outliers onto the centre tap), no average-pool
path, one normalisation after the sum. The ``k x k`` branch keeps its own
norm, whose batch statistics need the branch's own output: neither style can
compose its kernel exactly while training, so both train in explicit form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import (_CONV_FN, LayerConfig, SNTBlock, _sub_conv, _uniform_, centre_crop, delta_kernel, identity_matrix,
                   place_centre)
from .registry import register_style

__all__ = ["BranchBlock", "BranchNorm"]

class BranchNorm(nn.Module):
    """Batch normalisation of one branch, over a feature dimension (1 or -1).

    ``center=True`` is ordinary BatchNorm. ``center=False`` normalises by the
    root mean square and has no shift, so in eval mode it is a pure per-feature
    scale (used where the replaced layer has no bias to absorb a shift).
    """

    def __init__(self, num_features: int, *, feature_dim: int = 1, center: bool = True, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.feature_dim, self.center = num_features, feature_dim, center
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features)) if center else None
        self.register_buffer("running_mean", torch.zeros(num_features) if center else None)
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.center:
            if self.feature_dim == 1:
                return F.batch_norm(
                    x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
                )
            flat = x.reshape(-1, self.num_features)
            y = F.batch_norm(
                flat, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
            )
            return y.reshape(x.shape)
        fdim = self.feature_dim % x.dim()
        view = [1] * x.dim()
        view[fdim] = self.num_features
        if self.training:
            dims = [d for d in range(x.dim()) if d != fdim]
            ms = x.pow(2).mean(dim=dims)
            with torch.no_grad():
                self.running_var.mul_(1 - self.momentum).add_(ms.detach().to(self.running_var.dtype), alpha=self.momentum)
        else:
            ms = self.running_var
        return x * (self.weight / torch.sqrt(ms + self.eps)).reshape(view)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode ``y = s x + t`` as float64 ``(s, t)``."""
        s = self.weight.double() / torch.sqrt(self.running_var.double() + self.eps)
        if not self.center:
            return s, torch.zeros_like(s)
        return s, self.bias.double() - self.running_mean.double() * s

    def make_identity_(self, bias: torch.Tensor | None = None) -> None:
        """Eval-mode identity (plus ``bias``): exact, ``running_var = 1 - eps``."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.running_var.fill_(1.0 - self.eps)
            if self.center:
                self.running_mean.zero_()
                self.bias.zero_()
                if bias is not None:
                    self.bias.copy_(bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, feature_dim={self.feature_dim}, center={self.center}, eps={self.eps}"


class BranchBlock(SNTBlock):
    """Parallel branches summed, each normalised (structural re-parameterization).

    Args:
        config: the layer replaced.
        qa: the quantization-friendly QARepVGG variant (see module docstring).
        center: branch norms subtract the mean and shift (True) or only scale.
            Use False for a bias-free layer whose output has no BatchNorm to
            absorb the folded bias (ignored for a layer with bias).
    """

    def __init__(self, config: LayerConfig, *, qa: bool = False, center: bool = True):
        super().__init__(config)
        self.style = "qa-branch" if qa else "branch"
        # A layer with a bias absorbs the branch shifts, so only a bias-free
        # layer may need scale-only norms.
        self.qa, self.center = qa, center or config.bias
        c = config
        fdim = 1 if c.is_conv else -1

        def norm() -> BranchNorm:
            return BranchNorm(c.out_features, feature_dim=fdim, center=self.center)

        self.main = _sub_conv(c, c.in_features, c.out_features, c.kernel or None, stride=c.stride, dilation=c.dilation)
        self.main_norm = norm()
        has_taps = c.ktaps > 1 or not c.is_conv
        self.aux = _sub_conv(c, c.in_features, c.out_features, None, stride=c.stride, bias=qa and self.center) \
            if has_taps else None
        self.aux_norm = norm() if has_taps and not qa else None
        with_avg = c.is_conv and c.ktaps > 1 and not qa
        self.avg_proj = _sub_conv(c, c.in_features, c.out_features, None) if with_avg else None
        self.avg_norm = norm() if with_avg else None
        self.avg_post_norm = norm() if with_avg else None
        self.has_identity = c.in_features == c.out_features and all(s == 1 for s in c.stride)
        self.identity_norm = norm() if self.has_identity and not qa else None
        self.post_norm = norm() if qa else None

    @property
    def needs_bias_sink(self) -> bool:
        return self.center and not self.config.bias

    def _branch_count(self) -> int:
        return 1 + (self.aux is not None) + (self.avg_proj is not None) + self.has_identity

    def reset_parameters(self, gen: torch.Generator) -> None:
        """Default init for the convs; norm scales set so the eval-mode effective
        kernel has about the energy of the layer's default init."""
        for conv in (self.main, self.aux, self.avg_proj):
            if conv is not None:
                fan_in = conv.weight[0].numel()
                _uniform_(conv.weight, fan_in, gen)
                if conv.bias is not None:
                    _uniform_(conv.bias, fan_in, gen)
        n = self._branch_count()
        with torch.no_grad():
            if self.qa:
                conv_branches = 1 + (self.aux is not None)
                self.post_norm.weight.fill_(math.sqrt((1 / 3) / (conv_branches / 3 + self.has_identity)))
            else:
                for nrm in (self.main_norm, self.aux_norm, self.avg_post_norm, self.identity_norm):
                    if nrm is not None:
                        nrm.weight.fill_(1.0 / math.sqrt(n))

    def preserve(self, layer: nn.Module, gen: torch.Generator) -> None:
        """Set the parameters so that the block computes exactly ``layer`` (eval mode)."""
        c = self.config
        w0 = layer.weight.detach().clone()
        if self.qa and self.has_identity:
            w0 -= delta_kernel(c, torch.ones(c.out_features, dtype=torch.float64)).to(w0)
        with torch.no_grad():
            self.main.weight.copy_(w0)
            for conv in (self.aux, self.avg_proj):
                if conv is not None:
                    conv.weight.zero_()
                    if conv.bias is not None:
                        conv.bias.zero_()
            bias = layer.bias.detach() if c.bias else None
            target = self.post_norm if self.qa else self.main_norm
            self.main_norm.make_identity_()
            target.make_identity_(bias)
            if self.identity_norm is not None:
                self.identity_norm.weight.zero_()

    def folded_weight_bias(self):
        c = self.config
        dev = self.main.weight.device
        w = torch.zeros(c.weight_shape(), dtype=torch.float64, device=dev)
        b = torch.zeros(c.out_features, dtype=torch.float64, device=dev)
        bc = (slice(None),) + (None,) * (w.dim() - 1)  # broadcast a per-channel vector
        s, t = self.main_norm.affine()
        w += s[bc] * self.main.weight.double()
        b += t
        if self.aux is not None:
            w1 = place_centre(c, self.aux.weight.double().cpu()).to(dev)
            if self.aux_norm is not None:
                s, t = self.aux_norm.affine()
                w += s[bc] * w1
                b += t
            else:
                w += w1
                if self.aux.bias is not None:
                    b += self.aux.bias.double()
        if self.avg_proj is not None:
            s1, t1 = self.avg_norm.affine()
            s2, t2 = self.avg_post_norm.affine()
            wa = self.avg_proj.weight.double() / c.ktaps  # (O, I, 1..) spread over every tap
            w += (s2 * s1)[bc] * wa.expand(c.weight_shape())
            b += s2 * t1 + t2
        if self.has_identity:
            if self.identity_norm is not None:
                s, t = self.identity_norm.affine()
                w += delta_kernel(c, s.cpu()).to(dev)
                b += t
            else:
                w += delta_kernel(c, torch.ones(c.out_features, dtype=torch.float64)).to(dev)
        if self.post_norm is not None:
            s, t = self.post_norm.affine()
            w = s[bc] * w
            b = s * b + t
        if not c.bias and not self.needs_bias_sink:
            return w, None  # every shift is zero: scale-only norms
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        xc = self._centre_input(x) if c.is_conv else x
        if xc is None:  # the centre tap reads padding: pad once and crop (other padding modes, odd paddings)
            xp = c.pad(x)
            y = self.main_norm(self.main(xp))
            xc = centre_crop(c, xp)
        else:  # zero padding left to the convolution, as nn.Conv2d does: no padded copy of the input
            xp = None
            y = self.main_norm(c.apply(x, self.main.weight))
        if self.aux is not None and self.aux_norm is None and self.has_identity:
            # qa-branch: 1x1 and identity are one 1x1 kernel, W_1 + I (same function and gradients, one pass)
            eye = identity_matrix(c, torch.ones(c.out_features, dtype=x.dtype, device=x.device))
            w1 = self.aux.weight + eye.reshape(self.aux.weight.shape)
            y = y + (self.aux._conv_forward(xc, w1, self.aux.bias) if c.is_conv else F.linear(xc, w1, self.aux.bias))
        else:
            if self.aux is not None:
                a = self.aux(xc)
                y = y + (self.aux_norm(a) if self.aux_norm is not None else a)
            if self.has_identity:
                y = y + (self.identity_norm(xc) if self.identity_norm is not None else xc)
        if self.avg_proj is not None:
            t = self.avg_norm(self.avg_proj(c.pad(x) if xp is None else xp))
            uniform = torch.full((c.out_features, 1, *c.kernel), 1.0 / c.ktaps, dtype=t.dtype, device=t.device)
            t = _CONV_FN[c.ndim](t, uniform, None, c.stride, 0, c.dilation, c.out_features)
            y = y + self.avg_post_norm(t)
        if self.post_norm is not None:
            y = self.post_norm(y)
        return y

    def _centre_input(self, x: torch.Tensor) -> torch.Tensor | None:
        """What the kernel's centre tap sees of the zero-padded ``x``, as a view of ``x``; None if that needs padding."""
        c = self.config
        if c.padding_mode != "zeros":
            return None
        amounts = c.pad_amounts()  # last dimension first
        for i in range(c.ndim):
            dim = x.dim() - c.ndim + i
            lo, hi = amounts[2 * (c.ndim - 1 - i)], amounts[2 * (c.ndim - 1 - i) + 1]
            start = c.center[i] * c.dilation[i] - lo
            span = x.shape[dim] + lo + hi - c.dilation[i] * (c.kernel[i] - 1)
            if start < 0 or start + span > x.shape[dim]:
                return None
            x = x.narrow(dim, start, span)
        return x

    def macs(self, in_shape, out_shape) -> int:
        c = self.config
        out = math.prod(out_shape)
        cin_g = c.in_features // c.groups
        total = out * cin_g * c.ktaps
        if self.aux is not None:
            total += out * cin_g
        if self.avg_proj is not None:
            rows_in = math.prod(in_shape) // c.in_features
            total += rows_in * c.out_features * cin_g + out * c.ktaps
        return total

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, branches={self._branch_count()}, center={self.center}"


register_style("branch", label="RepVGG branches (kxk, 1x1, avg, identity; a norm each)", trains_online=False,
               bias_sink=True, step_cost=2.95)(lambda config, *, center=True, **_: BranchBlock(config, center=center))
register_style("qa-branch", label="QARepVGG branches (kxk+norm, 1x1, identity; one norm after the sum)",
               trains_online=False, bias_sink=True, step_cost=1.74)(
    lambda config, *, center=True, **_: BranchBlock(config, qa=True, center=center))
