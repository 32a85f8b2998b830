"""Over-parameterized blocks that stand in for one conv or linear layer, one module per style.

Every block remembers the layer it replaces (:class:`LayerConfig`) and can
compute, in float64, the single weight and bias of that layer that computes
exactly what the block computes in eval mode (:meth:`SNTBlock.folded_weight_bias`).

Padding. A block pads its input once, with the original layer's padding
amounts and padding mode, and every inner operation then runs unpadded. So
no intermediate tensor is ever padded, and biases or normalisation shifts
inside a branch never meet a padded zero: folding is exact at the borders
too, for every padding mode (zeros, reflect, replicate, circular) and for
``padding="same"``.

Styles (each registers itself in :mod:`sntfx.blocks.registry`; ``style_names()``
lists them, ``get_style(name)`` tells what each declares). Every module of
this package is imported with it, so a new style is one new module here. The
built-ins:

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

from .base import LAYER_CLASSES, LAYER_TYPES, LayerConfig, SNTBlock, is_expanded, layer_kind, layer_macs
from .registry import OPTIONS, StyleInfo, get_style, make_block, register_style, style_names

# The built-in styles register themselves on import: these first, in this order (the order of the choices
# everywhere), then every other module of this package, so a new style is one file here and nothing else.
from .linear import LinearExpansion  # noqa: E402  (registers "linear")
from .branch import BranchBlock, BranchNorm  # noqa: E402  (registers "branch", "qa-branch")


def _import_style_modules() -> None:
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_") and info.name not in ("base", "registry"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_style_modules()

STYLES = style_names()  # the built-in styles; code that must see styles registered later calls style_names()

__all__ = [
    "LayerConfig",
    "LAYER_CLASSES",
    "LAYER_TYPES",
    "layer_kind",
    "is_expanded",
    "SNTBlock",
    "LinearExpansion",
    "BranchBlock",
    "BranchNorm",
    "STYLES",
    "StyleInfo",
    "OPTIONS",
    "make_block",
    "register_style",
    "get_style",
    "style_names",
    "layer_macs",
]
