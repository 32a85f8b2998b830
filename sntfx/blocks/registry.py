"""The registry of expansion styles: each style is one module that registers itself here.

A style declares what the rest of sntfx would otherwise have to guess::

    @register_style("linear", label="linear expansion x RATIO", options=("ratio",),
                    trains_online=True, bias_sink=False, step_cost=1.1)
    class LinearExpansion(SNTBlock): ...

* ``options``: the per-layer options the style takes (today only ``ratio``);
  :func:`make_block` passes exactly those, and the CLI, the policy and the
  study refuse an option a style does not take.
* ``trains_online``: the block can compose its kernel every step and run one
  layer with the same function and gradients (``block.online = True``).
* ``bias_sink``: for a bias-free layer, the block's norms produce a shift that
  must be moved into a following BatchNorm; the expand pass looks for such a
  sink and passes ``center=`` (whether one was found) to the factory.
* ``step_cost``: the cost of a training step relative to Adam on the plain
  model, as measured by ``benchmarks/bench_train_step.py`` (the built-ins:
  :data:`COST_SOURCE`); ``sntfx transform`` and its ``--help`` show it. The
  study measures each method's step on the studied model before training
  (``Study.measure_step_costs``) and falls back on this figure only where it
  has no measurement.

The decorated object is the factory: ``factory(config, **options)`` (plus
``center=`` for bias-sink styles) returns the block. Adding a style = one
module under ``sntfx/blocks/`` imported by the package, or any module of yours
imported before use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .base import LayerConfig, SNTBlock

__all__ = ["StyleInfo", "register_style", "get_style", "style_names", "make_block", "OPTIONS", "COST_SOURCE"]

OPTIONS = ("ratio",)  # the per-layer options a style may declare

#: Where the built-in styles' ``step_cost`` figures come from.
COST_SOURCE = "ResNet-20, batch 128, 2-core CPU, median of 30 interleaved rounds: benchmarks/bench_train_step.py"


@dataclass(frozen=True)
class StyleInfo:
    """What a registered style declares about itself."""

    name: str
    factory: Callable[..., SNTBlock]
    label: str
    options: tuple[str, ...] = ()
    trains_online: bool = False
    bias_sink: bool = False
    step_cost: float = 1.0

    def build(self, config: LayerConfig, *, center: bool = True, **options: Any) -> SNTBlock:
        """The block for ``config``; ``options`` outside :attr:`options` are dropped (not this style's)."""
        kwargs = {k: v for k, v in options.items() if k in self.options and v is not None}
        if self.bias_sink:
            kwargs["center"] = center
        block = self.factory(config, **kwargs)
        if not isinstance(block, SNTBlock):
            raise TypeError(f"style '{self.name}' built a {type(block).__name__}, not an SNTBlock")
        block.style = self.name  # a factory may reuse another style's block class
        return block


_STYLES: dict[str, StyleInfo] = {}


def register_style(name: str, *, label: str, options: tuple[str, ...] = (), trains_online: bool = False,
                   bias_sink: bool = False, step_cost: float = 1.0):
    """Decorator: register ``factory`` (a block class or a function) as expansion style ``name``."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"style '{name}': unknown option(s) {unknown}; styles may declare {OPTIONS}")
    if not step_cost > 0:
        raise ValueError(f"style '{name}': step_cost must be positive")

    def decorate(factory):
        if name in _STYLES and _STYLES[name].factory is not factory:
            raise ValueError(f"expansion style '{name}' is already registered")
        _STYLES[name] = StyleInfo(name, factory, label, tuple(options), trains_online, bias_sink, float(step_cost))
        return factory

    return decorate


def style_names() -> tuple[str, ...]:
    """The registered style names, in registration order."""
    return tuple(_STYLES)


def get_style(name: str) -> StyleInfo:
    """The registered style ``name``; ValueError naming the choices otherwise."""
    try:
        return _STYLES[name]
    except KeyError:
        raise ValueError(f"unknown SNT style '{name}'; choose one of {', '.join(_STYLES)}") from None


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
    ``ratio`` reaches styles that declare it; ``center`` reaches bias-sink styles.
    """
    info = get_style(style)
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    block = info.build(LayerConfig.from_module(layer), center=center, ratio=ratio)
    if preserve:
        block.preserve(layer, gen)
    else:
        block.reset_parameters(gen)
    return block.to(device=layer.weight.device, dtype=layer.weight.dtype)
