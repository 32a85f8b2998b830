"""Over-parameterized blocks that stand in for one conv or linear layer.

Every block remembers the layer it replaces (:class:`LayerConfig`) and can
compute, in float64, the single weight and bias of that layer that computes
exactly what the block computes in eval mode (:meth:`SNTBlock.folded_weight_bias`).

Padding. A block pads its input once, with the original layer's padding
amounts and padding mode, and every inner operation then runs unpadded. So
no intermediate tensor is ever padded, and biases or normalisation shifts
inside a branch never meet a padded zero: folding is exact at the borders
too, for every padding mode (zeros, reflect, replicate, circular) and for
``padding="same"``.

Styles:

* :class:`LinearExpansion` (``linear``): ``1x1 (C_in -> r C_in)``, ``k x k (r C_in -> r C_out)``,
  ``1x1 (r C_out -> C_out)``, grouped like the original, no nonlinearity.
  Fold: ``W[o,i,t] = sum_{b,a} W3[o,b] W2[b,a,t] W1[a,i]`` per group,
  ``bias = W3 b2 + b3``. ``online=True`` runs that composed kernel as a single
  convolution every step (same outputs and gradients, the cost of one layer).
* :class:`BranchBlock` (``branch``): parallel branches summed, each with its own
  normalisation: ``k x k``, ``1x1`` (on the input cropped to the kernel's
  centre tap), an average-pool path (``1x1`` -> norm -> uniform ``k x k`` -> norm)
  and identity when channels match and stride is 1. With running statistics
  a norm is ``y = s x + t`` (``s = g / sqrt(v + eps)``, ``t = beta - m s``), so the
  fold is ``W = s_k W_k + s_1 pad(W_1) + s_a2 s_a1 W_avg / |k| + s_id delta``,
  ``b = t_k + t_1 + s_a2 t_a1 + t_a2 + t_id``.
* ``qa-branch`` (:class:`BranchBlock` with ``qa=True``): the QARepVGG remedy for
  low-bit quantization: no normalisation on the ``1x1`` and identity branches
  (a per-channel scale on the delta kernel is what piles outliers onto the
  centre tap), no average-pool path, one normalisation after the sum.

A layer without bias must stay without bias. When its output feeds a single
BatchNorm, the branch norms keep their shift and the fold moves the resulting
bias into that BatchNorm's running mean (``needs_bias_sink``); otherwise the
branch norms are scale-only (no mean subtraction, no shift), so the fold
yields no bias at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

__all__ = [
    "LayerConfig",
    "SNTBlock",
    "LinearExpansion",
    "BranchBlock",
    "BranchNorm",
    "STYLES",
    "make_block",
]

_CONV_FN = {1: F.conv1d, 2: F.conv2d}
_CONV_CLS = {1: nn.Conv1d, 2: nn.Conv2d}


@dataclass(frozen=True)
class LayerConfig:
    """The hyper-parameters of the layer a block replaces (and folds back into)."""

    kind: str  # "conv1d" | "conv2d" | "linear"
    in_features: int
    out_features: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: Any = ()  # as the original took it: tuple of ints, "same" or "valid"
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"

    @classmethod
    def from_module(cls, m: nn.Module) -> LayerConfig:
        if isinstance(m, nn.Linear):
            return cls("linear", m.in_features, m.out_features, bias=m.bias is not None)
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            return cls(
                f"conv{len(m.kernel_size)}d",
                m.in_channels,
                m.out_channels,
                tuple(m.kernel_size),
                tuple(m.stride),
                m.padding if isinstance(m.padding, str) else tuple(m.padding),
                tuple(m.dilation),
                m.groups,
                m.bias is not None,
                m.padding_mode,
            )
        raise TypeError(f"no LayerConfig for {type(m).__name__}")

    @property
    def is_conv(self) -> bool:
        return self.kind != "linear"

    @property
    def ndim(self) -> int:
        return len(self.kernel)

    @property
    def ktaps(self) -> int:
        return math.prod(self.kernel) if self.kernel else 1

    @property
    def center(self) -> tuple[int, ...]:
        """Index of the kernel tap a 1x1 branch or the identity sits on."""
        return tuple((k - 1) // 2 for k in self.kernel)

    def pad_amounts(self) -> list[int]:
        """``F.pad`` amounts (last dimension first) equal to the layer's padding."""
        out: list[int] = []
        for i in reversed(range(self.ndim)):
            if self.padding == "valid":
                lo = hi = 0
            elif self.padding == "same":
                total = self.dilation[i] * (self.kernel[i] - 1)
                lo, hi = total // 2, total - total // 2
            else:
                lo = hi = int(self.padding[i])
            out += [lo, hi]
        return out

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        amounts = self.pad_amounts()
        if not any(amounts):
            return x
        if self.padding_mode == "zeros":
            return F.pad(x, amounts)
        return F.pad(x, amounts, mode=self.padding_mode)

    def conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's convolution on an already padded input."""
        return _CONV_FN[self.ndim](x, w, b, self.stride, 0, self.dilation, self.groups)

    def weight_shape(self) -> tuple[int, ...]:
        if not self.is_conv:
            return (self.out_features, self.in_features)
        return (self.out_features, self.in_features // self.groups, *self.kernel)

    def default_fan_in(self) -> int:
        return (self.in_features // self.groups) * self.ktaps

    def build(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        """A fresh layer of the original type holding ``weight`` and ``bias``."""
        if self.is_conv:
            layer: nn.Module = _CONV_CLS[self.ndim](
                self.in_features,
                self.out_features,
                self.kernel,
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                groups=self.groups,
                bias=self.bias,
                padding_mode=self.padding_mode,
                device=weight.device,
                dtype=weight.dtype,
            )
        else:
            layer = nn.Linear(
                self.in_features, self.out_features, bias=self.bias, device=weight.device, dtype=weight.dtype
            )
        with torch.no_grad():
            layer.weight.copy_(weight.reshape(layer.weight.shape))
            if self.bias:
                layer.bias.copy_(bias if bias is not None else torch.zeros_like(layer.bias))
        return layer


def _uniform_(t: torch.Tensor, fan_in: int, gen: torch.Generator) -> torch.Tensor:
    """PyTorch's default conv/linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=gen)


def _normal_(t: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        return t.normal_(0.0, std, generator=gen)


def _orthonormal_columns(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A ``rows x cols`` float64 matrix with orthonormal columns (rows >= cols)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=gen))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(())).unsqueeze(0)


def _span(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (columns) of the column space of ``m``."""
    u, sv, _ = torch.linalg.svd(m, full_matrices=False)
    rank = int((sv > sv.max() * 1e-12).sum()) if sv.numel() else 0
    return u[:, :rank]


def _semi_orthogonal(rows: int, cols: int, gen: torch.Generator, keep) -> torch.Tensor:
    """A ``rows x cols`` float64 matrix ``M`` with ``M^T M`` the identity on a needed space.

    ``rows >= cols``: orthonormal columns, ``M^T M = I``. ``rows < cols``:
    orthonormal rows whose span contains the columns of ``keep()`` (a
    ``cols x j`` orthonormal basis, ``j <= rows``), so ``M^T M`` is the
    identity on that span.
    """
    if rows >= cols:
        return _orthonormal_columns(rows, cols, gen)
    basis = keep()
    z = torch.randn(cols, rows - basis.shape[1], dtype=torch.float64, generator=gen)
    z = z - basis @ (basis.T @ z)
    q, _ = torch.linalg.qr(torch.cat([basis, z], dim=1))
    return q.T


class SNTBlock(nn.Module):
    """Base class of the expanded blocks. ``fold()`` gives back the original layer."""

    style: str = ""

    def __init__(self, config: LayerConfig):
        super().__init__()
        self.config = config

    @property
    def needs_bias_sink(self) -> bool:
        """True when folding yields a bias that the (bias-free) layer must pass on."""
        return False

    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias (float64) of the single equivalent layer, eval mode."""
        raise NotImplementedError

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def fold(self) -> tuple[nn.Module, torch.Tensor | None]:
        """The equivalent layer, and the bias it must hand to a sink (or None).

        The layer has the original type, hyper-parameters and dtype.
        """
        p = next(self.parameters())
        with torch.no_grad():
            w, b = self.folded_weight_bias()
        residual = None
        if not self.config.bias and b is not None:
            residual = b
            b = None
        layer = self.config.build(w.to(p.dtype), None if b is None else b.to(p.dtype))
        return layer, residual

    def macs(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates of this block's own (explicit) forward."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        c = self.config
        shape = f"{c.in_features}->{c.out_features}" + (f", k={c.kernel}" if c.is_conv else "")
        return f"style={self.style}, {c.kind} {shape}"


def layer_macs(config: LayerConfig, out_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the plain layer producing ``out_shape``."""
    return math.prod(out_shape) * (config.in_features // config.groups) * config.ktaps


def _sub_conv(config: LayerConfig, cin: int, cout: int, kernel, *, stride=None, dilation=None, bias=False) -> nn.Module:
    """An inner conv (no padding: the block pads once) or linear, left uninitialised.

    Every block initialises its parameters itself (``reset_parameters`` or
    ``preserve``), so PyTorch's own init would be wasted work.
    """
    if not config.is_conv:
        return skip_init(nn.Linear, cin, cout, bias=bias)
    ones = (1,) * config.ndim
    return skip_init(
        _CONV_CLS[config.ndim],
        cin,
        cout,
        kernel if kernel is not None else ones,
        stride=stride or ones,
        padding=0,
        dilation=dilation or ones,
        groups=config.groups,
        bias=bias,
    )


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
            conv/matmul (same function and gradients, a plain layer's cost).
    """

    style = "linear"

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

    def effective_weight_bias(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Compose the three layers into one weight (differentiable)."""
        c, g = self.config, self.config.groups
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        w1 = cast(self.expand.weight)
        w2 = cast(self.core.weight)
        w3 = cast(self.project.weight)
        a = w1.reshape(g, w1.shape[0] // g, w1.shape[1])  # (g, A, I)
        m = w2.reshape(g, w2.shape[0] // g, w2.shape[1], -1)  # (g, B, A, K)
        p = w3.reshape(g, w3.shape[0] // g, w3.shape[1])  # (g, O, B)
        w = torch.einsum("gob,gbak,gai->goik", p, m, a).reshape(c.weight_shape())
        if not c.bias:
            return w, None
        b2 = cast(self.core.bias).reshape(g, -1)
        b = torch.einsum("gob,gb->go", p, b2).reshape(-1) + cast(self.project.bias)
        return w, b

    def folded_weight_bias(self):
        return self.effective_weight_bias(torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if self.online:
            w, b = self.effective_weight_bias()
            if not c.is_conv:
                return F.linear(x, w, b)
            return c.conv(c.pad(x), w, b)
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
            return BranchNorm(c.out_features, feature_dim=fdim, center=center)

        self.main = _sub_conv(c, c.in_features, c.out_features, c.kernel or None, stride=c.stride, dilation=c.dilation)
        self.main_norm = norm()
        has_taps = c.ktaps > 1 or not c.is_conv
        self.aux = _sub_conv(c, c.in_features, c.out_features, None, stride=c.stride, bias=qa and center) if has_taps else None
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
            w0 -= self._delta_kernel(torch.ones(c.out_features, dtype=torch.float64)).to(w0)
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

    def _delta_kernel(self, scale: torch.Tensor) -> torch.Tensor:
        """``scale[o]`` on the centre tap of input channel ``o`` (within its group)."""
        c = self.config
        w = torch.zeros(c.weight_shape(), dtype=torch.float64)
        per_group = c.in_features // c.groups
        idx = torch.arange(c.out_features)
        if c.is_conv:
            w[(idx, idx % per_group, *[torch.full_like(idx, t) for t in c.center])] = scale
        else:
            w[idx, idx] = scale
        return w

    def _place_1x1(self, w1: torch.Tensor) -> torch.Tensor:
        """A 1x1 kernel (or Linear weight) placed on the centre tap of the layer's kernel."""
        c = self.config
        if not c.is_conv:
            return w1
        w = torch.zeros(c.weight_shape(), dtype=torch.float64)
        w[(slice(None), slice(None), *c.center)] = w1.reshape(w1.shape[0], w1.shape[1])
        return w

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
            w1 = self._place_1x1(self.aux.weight.double().cpu()).to(dev)
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
                w += self._delta_kernel(s.cpu()).to(dev)
                b += t
            else:
                w += self._delta_kernel(torch.ones(c.out_features, dtype=torch.float64)).to(dev)
        if self.post_norm is not None:
            s, t = self.post_norm.affine()
            w = s[bc] * w
            b = s * b + t
        if not c.bias and not self.needs_bias_sink:
            return w, None  # every shift is zero: scale-only norms
        return w, b

    def _crop(self, xp: torch.Tensor) -> torch.Tensor:
        """The padded input seen by the kernel's centre tap."""
        c = self.config
        for i in range(c.ndim):
            dim = xp.dim() - c.ndim + i
            span = xp.shape[dim] - c.dilation[i] * (c.kernel[i] - 1)
            xp = xp.narrow(dim, c.center[i] * c.dilation[i], span)
        return xp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        xp = c.pad(x) if c.is_conv else x
        y = self.main_norm(self.main(xp))
        xc = self._crop(xp) if c.is_conv else x
        if self.aux is not None:
            a = self.aux(xc)
            y = y + (self.aux_norm(a) if self.aux_norm is not None else a)
        if self.avg_proj is not None:
            t = self.avg_norm(self.avg_proj(xp))
            uniform = torch.full((c.out_features, 1, *c.kernel), 1.0 / c.ktaps, dtype=t.dtype, device=t.device)
            t = _CONV_FN[c.ndim](t, uniform, None, c.stride, 0, c.dilation, c.out_features)
            y = y + self.avg_post_norm(t)
        if self.has_identity:
            y = y + (self.identity_norm(xc) if self.identity_norm is not None else xc)
        if self.post_norm is not None:
            y = self.post_norm(y)
        return y

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


STYLES = ("linear", "branch", "qa-branch")


def make_block(
    layer: nn.Module,
    style: str,
    *,
    ratio: int = 4,
    center: bool = True,
    preserve: bool = False,
    gen: torch.Generator | None = None,
) -> SNTBlock:
    """Build the block of ``style`` replacing ``layer`` (same device and dtype).

    ``preserve=True`` makes the block compute exactly ``layer``'s function;
    otherwise it is initialised from scratch with the layer's output variance.
    """
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    config = LayerConfig.from_module(layer)
    if style == "linear":
        block: SNTBlock = LinearExpansion(config, ratio)
    elif style in ("branch", "qa-branch"):
        block = BranchBlock(config, qa=style == "qa-branch", center=center)
    else:
        raise ValueError(f"unknown SNT style '{style}'; choose one of {', '.join(STYLES)}")
    if preserve:
        block.preserve(layer, gen)
    else:
        block.reset_parameters(gen)
    return block.to(device=layer.weight.device, dtype=layer.weight.dtype)
