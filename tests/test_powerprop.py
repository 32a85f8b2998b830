"""The ``powerprop`` style: W = v|v|, exact preserve, gradients scaled by 2|v|, and its rich-get-richer effect."""

from __future__ import annotations

import torch
from torch import nn

from sntfx.blocks import get_style, make_block
from sntfx.blocks.powerprop import PowerPropagation
from sntfx.tracing import compare_outputs


def test_preserve_and_fold_are_exact():
    layer = nn.Conv2d(6, 8, 3, padding=1, groups=2)
    block = make_block(layer, "powerprop", preserve=True)
    assert isinstance(block, PowerPropagation) and get_style("powerprop").trains_online
    x = torch.randn(2, 6, 7, 7)
    assert compare_outputs(layer(x), block(x)) <= 1e-6
    folded, residual = block.fold()
    assert residual is None and compare_outputs(folded.weight.double(), layer.weight.double()) <= 1e-6


def test_gradient_is_the_plain_gradient_scaled_by_two_abs_v():
    """dL/dv = dL/dW * 2|v| (alpha = 2): small weights barely move, large ones grow."""
    layer = nn.Linear(5, 4)
    block = make_block(layer, "powerprop", preserve=True).double()
    plain = nn.Linear(5, 4).double()
    with torch.no_grad():  # the block's own W (preserve rounds v to float32, so W is the layer's up to rounding)
        plain.weight.copy_(block.composed_weight().detach())
        plain.bias.copy_(block.bias.detach())
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plain(x).square().sum().backward()
    block(x).square().sum().backward()
    assert torch.allclose(block.v.grad, plain.weight.grad * 2 * block.v.detach().abs())


def test_training_leaves_more_weights_near_zero_than_plain_training():
    """An underdetermined regression (many exact fits) trained plainly and through W = v|v| from the same start:
    powerprop's fit has far more weights below a tenth of the largest (measured: 55% vs 19%), the distribution
    magnitude pruning likes."""
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(32, 64, generator=gen) * (torch.rand(32, 64, generator=gen) < 0.2)
    x = torch.randn(24, 64, generator=gen)  # fewer samples than inputs: many exact fits, the implicit bias picks
    y = x @ teacher.T
    results = {}
    for style in (None, "powerprop"):
        layer = nn.Linear(64, 32, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(32, 64, generator=torch.Generator().manual_seed(1)) * 0.1)
        model = layer if style is None else make_block(layer, style, preserve=True)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            (model(x) - y).square().mean().backward()
            opt.step()
        w = layer.weight.detach() if style is None else model.fold()[0].weight.detach()
        results[style] = float((w.abs() < 0.1 * w.abs().max()).float().mean())
    assert results["powerprop"] > results[None] + 0.1, results


def test_the_fused_composition_has_the_autograd_expressions_gradients_and_hessian():
    """``SignedPower`` (what online training runs) against ``v|v|^(alpha-1)`` recorded by autograd, for alpha 2 and 1.5:
    outputs, gradients, and a Hessian-vector product (the sharpness measurements differentiate twice)."""
    from sntfx.blocks.powerprop import SignedPower

    gen = torch.Generator().manual_seed(0)
    for alpha in (2.0, 1.5):
        v = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        g = torch.randn(7, 5, generator=gen, dtype=torch.float64)
        probe = torch.randn(7, 5, generator=gen, dtype=torch.float64)
        results = []
        for fn in (lambda t: SignedPower.apply(t, alpha), lambda t: t * t.abs().pow(alpha - 1.0)):
            w = fn(v)
            (grad,) = torch.autograd.grad((w * g).sum() + w.pow(3).sum(), v, create_graph=True)
            (hvp,) = torch.autograd.grad((grad * probe).sum(), v)
            results.append((w.detach(), grad.detach(), hvp))
        for a, b in zip(*results):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_online_and_explicit_blocks_agree_in_float32():
    layer = nn.Conv2d(8, 16, 3, padding=1)
    block = make_block(layer, "powerprop", gen=torch.Generator().manual_seed(0))
    x = torch.randn(4, 8, 9, 9)
    grads = []
    for online in (False, True):
        block.online = online
        block.zero_grad()
        block(x).square().sum().backward()
        grads.append([p.grad.clone() for p in block.parameters()])
    for a, b in zip(*grads):
        assert compare_outputs(a, b) <= 1e-5
