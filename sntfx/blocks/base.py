"""What every SNT block shares: the layer it replaces, the fold contract, init helpers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

__all__ = ["LayerConfig", "SNTBlock", "is_expanded", "layer_macs", "layer_kind", "LAYER_CLASSES", "LAYER_TYPES",
           "ELEMENT_MACS", "OPTIMIZER_PASSES", "OPTIMIZER_STATES"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_CLS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}

#: The training-cost model of the ``snt`` pass's budget, calibrated with ``benchmarks/bench_compose_cost.py``
#: (``benchmarks/results/train-step/cpu-compose-cost.json``). Its unit is one forward multiply-add of a plain
#: conv/linear layer together with the backward work it brings (a training step does about three
#: multiply-adds per forward one, compute bound): 30.5 ps on the 2-core x86 CPU. Composing a kernel by
#: matrix products is compute bound too and counts its own multiply-adds. Elementwise work is memory bound:
#: one pass over one tensor element (two reads, one write, from memory rather than cache) took 0.52 ns
#: there, 16.9 units.
ELEMENT_MACS = 17
#: The newest of the ``snt`` pass's budget cost models (its default, ``COST_MODEL``; see ``compose_cost``).
LATEST_COST_MODEL = 4
#: Passes over each parameter element per step for the trainer's fused Adam update (measured 1.4-1.8)
#: and for accumulating its gradient (one).
OPTIMIZER_PASSES = 2.5
#: Tensors the optimizer keeps per parameter (Adam's two moments): in training, a parameter element is held
#: as its value, its gradient and these.
OPTIMIZER_STATES = 2

#: The layer kinds SNT expands, prunes and quantizes, by name (the policy's ``types``, ``LayerConfig.kind``).
LAYER_CLASSES: dict[str, type[nn.Module]] = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d,
                                             "linear": nn.Linear}
LAYER_TYPES = tuple(LAYER_CLASSES)


def layer_kind(m: nn.Module) -> str | None:
    """``"conv1d"``, ``"conv2d"``, ``"conv3d"`` or ``"linear"`` for those layers (and subclasses), else None."""
    return next((kind for kind, cls in LAYER_CLASSES.items() if isinstance(m, cls)), None)


@dataclass(frozen=True)
class LayerConfig:
    """The hyper-parameters of the layer a block replaces (and folds back into)."""

    kind: str  # "conv1d" | "conv2d" | "conv3d" | "linear"
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
        kind = layer_kind(m)
        if kind == "linear":
            return cls("linear", m.in_features, m.out_features, bias=m.bias is not None)
        if kind is not None:
            return cls(
                kind,
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

    def apply(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """What the original layer computes on ``x`` with weight ``w`` and bias ``b`` (a composed kernel).

        Zero padding is left to the convolution itself, as ``nn.Conv2d`` does
        (padding a copy of the activation first costs a copy and its backward
        every step); other padding modes pad first.
        """
        if not self.is_conv:
            return F.linear(x, w, b)
        if self.padding_mode == "zeros":
            return _CONV_FN[self.ndim](x, w, b, self.stride, self.padding, self.dilation, self.groups)
        return self.conv(self.pad(x), w, b)

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


# -- kernels shared by the multi-branch styles ---------------------------------------


def identity_matrix(config: LayerConfig, scale: torch.Tensor) -> torch.Tensor:
    """The identity as a ``C_out x C_in/groups`` matrix, scaled per output channel (differentiable in ``scale``).

    Output channel ``o`` reads input channel ``o`` within its group. Needs ``in == out``: each group's
    block is then ``diag(scale)`` (one ``diag_embed``, whose backward keeps nothing).
    """
    return torch.diag_embed(scale.view(config.groups, -1)).reshape(config.out_features, -1)


def delta_kernel(config: LayerConfig, scale: torch.Tensor) -> torch.Tensor:
    """The identity as a kernel of ``config``'s shape, scaled per output channel (differentiable in ``scale``).

    :func:`identity_matrix` on the kernel's centre tap; a Linear gets ``diag(scale)``. Needs ``in == out``.
    """
    return place_centre(config, identity_matrix(config, scale))


def place_centre(config: LayerConfig, w1: torch.Tensor) -> torch.Tensor:
    """A 1x1 kernel (or a Linear weight) placed on the centre tap of ``config``'s kernel (differentiable)."""
    if not config.is_conv:
        return w1
    pads: list[int] = []
    for k, c in zip(reversed(config.kernel), reversed(config.center)):
        pads += [c, k - 1 - c]
    return F.pad(w1.reshape(w1.shape[0], w1.shape[1], *([1] * config.ndim)), pads)


def centre_crop(config: LayerConfig, xp: torch.Tensor) -> torch.Tensor:
    """The part of the padded input ``xp`` that the kernel's centre tap sees (the input of a 1x1 branch)."""
    for i in range(config.ndim):
        dim = xp.dim() - config.ndim + i
        span = xp.shape[dim] - config.dilation[i] * (config.kernel[i] - 1)
        xp = xp.narrow(dim, config.center[i] * config.dilation[i], span)
    return xp


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
    online: bool = False  # compose the kernel and run one layer per call (styles that train online)

    def __init__(self, config: LayerConfig):
        super().__init__()
        self.config = config

    def forward_composed(self, x: torch.Tensor) -> torch.Tensor:
        """Forward through the composed kernel: one layer (same outputs and gradients as the explicit form)."""
        w, b = self.composed_weight_bias()
        return self.config.apply(x, w, b)

    def composed_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The single layer's kernel, composed from this block's parameters (differentiable).

        Styles that train online implement it: it is what ``forward_composed``
        convolves with, in ``dtype`` or the parameters' dtype.
        """
        raise NotImplementedError(f"style '{self.style}' does not train online")

    def composed_weight_bias(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The single layer's kernel and bias, composed (differentiable).

        The default pairs :meth:`composed_weight` with the block's own
        ``bias`` parameter (None when it has none); a style whose bias is
        composed too (``linear``) overrides this.
        """
        bias = getattr(self, "bias", None)
        if bias is not None and dtype is not None:
            bias = bias.to(dtype)
        return self.composed_weight(dtype), bias

    @property
    def trains_online(self) -> bool:
        """Whether this block's style can run the composed kernel in training (see the style registry)."""
        from .registry import get_style

        return get_style(self.style).trains_online

    @property
    def needs_bias_sink(self) -> bool:
        """True when folding yields a bias that the (bias-free) layer must pass on."""
        return False

    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias (float64) of the single equivalent layer, eval mode.

        The default, for styles that train online, is the composed kernel and
        bias in float64; a style that trains in explicit form computes it here.
        """
        if not self.trains_online:
            raise NotImplementedError(f"style '{self.style}' trains in explicit form, so it must implement "
                                      "folded_weight_bias (or train online and implement composed_weight)")
        w, b = self.composed_weight_bias(torch.float64)
        return w.detach(), None if b is None else b.detach()

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

    #: Memory-bound passes over ``compose_elements`` that composing the kernel once makes, forward and backward
    #: (styles that train online set it; calibrated with ``benchmarks/bench_compose_cost.py``).
    compose_passes: float = 0.0
    #: Whether an online block composes at every call (False: it runs its explicit form where that is
    #: cheaper, as ``linear`` does on few positions).
    always_composes: bool = True
    #: Fixed cost of one call of an online block beyond the plain layer's, forward and backward, in the
    #: units of ``ELEMENT_MACS``: dispatching the composition's operations and their backward, whatever
    #: the kernel's size (the budget's cost models 3 and 4; calibrated with ``benchmarks/bench_compose_cost.py``).
    call_overhead: float = 0.0

    def compose_macs(self) -> int:
        """Multiply-accumulates of composing the kernel once by matrix products (0 for elementwise styles)."""
        return 0

    def compose_elements(self) -> int:
        """Elements of the tensors that composing the kernel once passes over, forward and backward, which
        ``compose_passes`` counts passes over (the budget's cost model 4): by default the kernel's own. A style
        whose composition makes tensors larger than the kernel (factors, intermediate products, the layout
        copies a matrix product needs) counts them."""
        return math.prod(self.config.weight_shape())

    def compose_cost(self, cost_model: int = LATEST_COST_MODEL) -> float:
        """Work of composing the kernel once, forward and backward, in forward-MAC units (see ``ELEMENT_MACS``).

        It does not depend on the batch or the feature map, which is why it can
        dominate a layer that runs on few positions (a wide layer on a small
        map); the expand pass's ``budget`` uses it. A style that does not train
        online composes nothing. ``cost_model`` below 4 (the snt pass's
        ``cost_model``, kept for old recipes) counts the passes over the
        kernel's own elements whatever the style.
        """
        if not self.trains_online:
            return 0.0
        elements = self.compose_elements() if cost_model >= 4 else math.prod(self.config.weight_shape())
        return self.compose_macs() + ELEMENT_MACS * self.compose_passes * elements

    def extra_parameters(self) -> int:
        """Parameter elements this block has beyond the layer's weight and bias."""
        c = self.config
        extra = sum(p.numel() for p in self.parameters()) - math.prod(c.weight_shape()) - c.out_features * c.bias
        return max(extra, 0)

    def parameter_cost(self) -> float:
        """Per-step work of the parameters this block has beyond the layer's (gradients, optimizer), in the same units."""
        return ELEMENT_MACS * OPTIMIZER_PASSES * self.extra_parameters()

    def saved_numel(self) -> int:
        """Elements that composing the kernel keeps for the backward pass, beyond the parameters themselves.

        At least the composed kernel: the convolution keeps it where the plain
        layer's keeps its weight, which is a parameter. Styles whose
        composition keeps intermediate products add them.
        """
        return math.prod(self.config.weight_shape())

    def memory_cost(self) -> int:
        """Bytes a training step holds for this block beyond what the plain layer holds.

        The extra parameters, with their gradients and optimizer state
        (:data:`OPTIMIZER_STATES`), and, for a style that trains online, what
        the composition keeps for the backward pass (:meth:`saved_numel`). The
        expand pass's ``memory_budget`` uses it; activations are the layer's
        either way.
        """
        elem = self._param_dtype().itemsize
        saved = self.saved_numel() if self.trains_online else 0
        return elem * ((2 + OPTIMIZER_STATES) * self.extra_parameters() + saved)

    def extra_repr(self) -> str:
        c = self.config
        shape = f"{c.in_features}->{c.out_features}" + (f", k={c.kernel}" if c.is_conv else "")
        return f"style={self.style}, {c.kind} {shape}"


def is_expanded(model: nn.Module) -> bool:
    """Whether ``model`` holds SNT blocks (it was transformed and not yet folded)."""
    return any(isinstance(m, SNTBlock) for m in model.modules())


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
