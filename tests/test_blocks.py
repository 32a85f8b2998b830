"""SNT blocks: exact fold, online forward, preserve mode, initialisation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from sntfx.blocks import BranchBlock, LayerConfig, LinearExpansion, get_style, make_block, style_names
from sntfx.graph_utils import randomize_, saved_for_backward
from sntfx.tracing import compare_outputs

TOL = 1e-5
STYLES = list(style_names())  # every registered style: a new style is tested here without editing this file
ONLINE_STYLES = [s for s in STYLES if get_style(s).trains_online]

LAYERS = {
    "3x3": lambda: nn.Conv2d(8, 8, 3, padding=1),
    "3x3 s2 no-bias": lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
    "5x5 depthwise": lambda: nn.Conv2d(8, 8, 5, padding=2, groups=8),
    "3x5 dilated grouped": lambda: nn.Conv2d(6, 12, (3, 5), padding=(2, 1), dilation=(2, 1), groups=3),
    "reflect": lambda: nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
    "replicate even k s2": lambda: nn.Conv2d(4, 8, 2, stride=2, padding=1, padding_mode="replicate"),
    "same even k": lambda: nn.Conv2d(8, 8, 4, padding="same"),
    "valid": lambda: nn.Conv2d(8, 8, 3, padding="valid"),
    "1x1": lambda: nn.Conv2d(8, 8, 1),
    "conv1d circular": lambda: nn.Conv1d(4, 4, 3, padding=1, padding_mode="circular"),
    "conv1d s2 dilated": lambda: nn.Conv1d(4, 6, 3, stride=2, dilation=3, padding=2, bias=False),
    "conv3d s(1,2,1)": lambda: nn.Conv3d(4, 6, (3, 3, 2), stride=(1, 2, 1), padding=(1, 1, 0)),
    "conv3d grouped replicate": lambda: nn.Conv3d(4, 4, 3, padding=1, groups=2, padding_mode="replicate", bias=False),
    "linear": lambda: nn.Linear(10, 10),
    "linear wide-in": lambda: nn.Linear(24, 5),
    "linear wide-out": lambda: nn.Linear(5, 24),
    "linear no-bias": lambda: nn.Linear(10, 7, bias=False),
}


def _input_for(layer: nn.Module, gen: torch.Generator, spatial=(9, 10)) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(3, 4, layer.in_features, generator=gen)  # leading dims, like tokens
    if isinstance(layer, nn.Conv1d):
        return torch.randn(2, layer.in_channels, 13, generator=gen)
    if isinstance(layer, nn.Conv3d):
        return torch.randn(2, layer.in_channels, 5, *spatial, generator=gen)
    return torch.randn(2, layer.in_channels, *spatial, generator=gen)


def _folded_output(block, x):
    layer, residual = block.fold()
    y = layer(x)
    if residual is not None:
        if isinstance(layer, nn.Linear):
            y = y + residual.to(y)  # features are the last dimension
        else:
            y = y + residual.to(y).reshape(1, -1, *([1] * (y.dim() - 2)))
    return layer, y


# (style, center): `center` (shifted vs scale-only norms) applies to styles that use a bias sink.
VARIANTS = [(s, c) for s in STYLES for c in ((True, False) if get_style(s).bias_sink else (True,))]


@pytest.mark.parametrize("style,center", VARIANTS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_fold_is_exact(style, name, center):
    layer = LAYERS[name]()
    gen = torch.Generator().manual_seed(0)
    block = make_block(layer, style, ratio=3, center=center, gen=gen)
    randomize_(block, seed=1)
    block.eval()
    x = _input_for(layer, gen)
    with torch.no_grad():
        want = block(x)
        folded, got = _folded_output(block, x)
    assert compare_outputs(want, got) <= TOL
    assert type(folded) is type(layer)
    assert LayerConfig.from_module(folded) == LayerConfig.from_module(layer)
    assert sum(p.numel() for p in folded.parameters()) == sum(p.numel() for p in layer.parameters())


def test_bias_free_layer_with_scale_only_norms_folds_without_bias():
    layer = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    block = make_block(layer, "branch", center=False)
    randomize_(block, 3)
    folded, residual = block.fold()
    assert residual is None and folded.bias is None
    assert not block.needs_bias_sink


def test_bias_free_layer_with_centered_norms_hands_over_its_bias():
    layer = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    block = make_block(layer, "branch", center=True)
    randomize_(block, 3)
    folded, residual = block.fold()
    assert folded.bias is None and residual is not None and residual.abs().max() > 0


def test_branch_block_structure():
    b = make_block(nn.Conv2d(8, 8, 3, padding=1), "branch")
    assert isinstance(b, BranchBlock) and b._branch_count() == 4  # kxk, 1x1, avg, identity
    b = make_block(nn.Conv2d(8, 16, 3, stride=2, padding=1), "branch")
    assert b._branch_count() == 3 and not b.has_identity  # channels/stride differ
    qa = make_block(nn.Conv2d(8, 8, 3, padding=1), "qa-branch")
    assert qa.aux_norm is None and qa.identity_norm is None and qa.avg_proj is None and qa.post_norm is not None
    assert make_block(nn.Conv2d(8, 8, 1), "branch").aux is None  # a 1x1 has no separate 1x1 branch


@pytest.mark.parametrize("style", ONLINE_STYLES)
@pytest.mark.parametrize("name", ["3x3", "3x3 s2 no-bias", "5x5 depthwise", "3x5 dilated grouped", "reflect",
                                  "replicate even k s2", "same even k", "conv1d circular", "conv1d s2 dilated",
                                  "conv3d s(1,2,1)", "conv3d grouped replicate", "linear", "linear no-bias"])
def test_online_forward_matches_explicit_outputs_and_gradients(style, name):
    layer = LAYERS[name]()
    gen = torch.Generator().manual_seed(0)
    explicit = make_block(layer, style, ratio=4, gen=gen).double()
    explicit.online = False  # the reference: every block forwards explicitly when not online
    online = make_block(layer, style, ratio=4, gen=torch.Generator().manual_seed(0)).double()
    x = _input_for(layer, gen).double()
    y1, y2 = explicit(x), online.forward_composed(x)
    assert compare_outputs(y1, y2) <= 1e-10
    g = torch.randn(y1.shape, generator=gen, dtype=torch.float64)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    for (n1, p1), (_, p2) in zip(explicit.named_parameters(), online.named_parameters()):
        assert compare_outputs(p1.grad, p2.grad) <= 1e-10, n1


@pytest.mark.parametrize("style", ONLINE_STYLES)
@pytest.mark.parametrize("name", list(LAYERS))
def test_online_output_has_the_plain_layers_memory_layout(style, name):
    """The composed kernel has standard strides, so the online block returns what the plain layer returns.

    A permuted kernel (linear's einsum gave channels-last strides, even on a
    1x1 kernel that reports is_contiguous()) makes the convolution return
    channels-last activations, and every later layer runs in that format.
    """
    layer = LAYERS[name]()
    gen = torch.Generator().manual_seed(0)
    block = make_block(layer, style, ratio=4, gen=gen)
    block.online = True
    x = _input_for(layer, gen)
    y_plain, y_online = layer(x), block.forward_composed(x)
    assert y_online.stride() == y_plain.stride()


def test_online_forward_float32_within_1e5():
    layer = nn.Conv2d(16, 16, 3, padding=1)
    gen = torch.Generator().manual_seed(0)
    a = make_block(layer, "linear", ratio=4, gen=gen)
    b = make_block(layer, "linear", ratio=4, gen=torch.Generator().manual_seed(0))
    b.online = True
    x = torch.randn(4, 16, 12, 12, generator=gen)
    assert b.online_pays(x)  # a feature map: the composed kernel is the cheaper way
    ya, yb = a(x), b(x)
    assert compare_outputs(ya, yb) <= 1e-5
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert compare_outputs(pa.grad, pb.grad) <= 1e-5, n


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize(
    "name", ["3x3", "3x3 s2 no-bias", "5x5 depthwise", "3x5 dilated grouped", "reflect", "conv3d grouped replicate",
             "linear", "linear wide-in", "linear wide-out"]
)
def test_preserve_computes_the_original_layer(style, name):
    layer = LAYERS[name]()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    block = make_block(layer, style, ratio=2, preserve=True).eval()
    x = _input_for(layer, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert compare_outputs(layer(x), block(x)) <= TOL


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", ["3x3", "3x3 s2 no-bias", "5x5 depthwise", "linear"])
def test_init_keeps_the_effective_kernel_scale(style, name):
    """The eval-mode effective kernel has about the energy of PyTorch's default init."""
    layer = LAYERS[name]()
    config = LayerConfig.from_module(layer)
    expected = layer.weight.numel() / (3 * config.default_fan_in())  # E[sum w^2] of U(+-1/sqrt(fan_in))
    ratios = []
    for seed in range(4):
        block = make_block(layer, style, ratio=4, gen=torch.Generator().manual_seed(seed)).eval()
        w, _ = block.folded_weight_bias()
        ratios.append(w.square().sum().item() / expected)
    mean = sum(ratios) / len(ratios)
    assert 0.5 <= mean <= 2.0, ratios


def test_linear_expansion_output_variance_matches_original():
    layer = nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(8, 32, 16, 16)
    var_orig = []
    var_block = []
    for seed in range(4):
        torch.manual_seed(seed)
        var_orig.append(nn.Conv2d(32, 32, 3, padding=1, bias=False)(x).var().item())
        block = make_block(layer, "linear", ratio=4, gen=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            block.project.bias.zero_()
            var_block.append(block(x).var().item())
    assert 0.7 <= (sum(var_block) / sum(var_orig)) <= 1.4


def test_bad_ratio_and_style():
    with pytest.raises(ValueError, match="ratio"):
        LinearExpansion(LayerConfig.from_module(nn.Linear(2, 2)), ratio=0)
    with pytest.raises(ValueError, match="unknown SNT style"):
        make_block(nn.Linear(2, 2), "wide")


@st.composite
def conv_configs(draw):
    groups = draw(st.sampled_from([1, 2, 4]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    if draw(st.booleans()):
        cout = cin  # let identity branches appear
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    same = draw(st.booleans()) and stride == (1, 1)
    if same:
        padding = "same"
    else:
        padding = (draw(st.integers(0, kh)), draw(st.integers(0, kw)))
    bias = draw(st.booleans())
    style = draw(st.sampled_from(STYLES))
    center = draw(st.booleans())
    return dict(cin=cin, cout=cout, k=(kh, kw), stride=stride, dilation=dilation, mode=mode, padding=padding,
                bias=bias, groups=groups, style=style, center=center)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs(), st.integers(0, 2**31 - 1))
def test_fold_is_exact_for_any_conv2d(cfg, seed):
    layer = nn.Conv2d(cfg["cin"], cfg["cout"], cfg["k"], stride=cfg["stride"], padding=cfg["padding"],
                      dilation=cfg["dilation"], groups=cfg["groups"], bias=cfg["bias"], padding_mode=cfg["mode"])
    gen = torch.Generator().manual_seed(seed)
    h = max(cfg["dilation"][0] * (cfg["k"][0] - 1) + 1, 5) + 3
    w = max(cfg["dilation"][1] * (cfg["k"][1] - 1) + 1, 5) + 2
    x = torch.randn(2, cfg["cin"], h, w, generator=gen)
    try:
        layer(x)
    except RuntimeError:
        assume(False)  # e.g. reflect padding wider than the input: the layer itself rejects it
    block = make_block(layer, cfg["style"], ratio=2, center=cfg["center"], gen=gen)
    randomize_(block, seed=seed % 1000)
    block.eval()
    with torch.no_grad():
        want = block(x)
        folded, got = _folded_output(block, x)
    assert want.shape == layer(x).shape
    assert compare_outputs(want, got) <= TOL
    assert LayerConfig.from_module(folded) == LayerConfig.from_module(layer)
    assert math.isfinite(want.abs().max().item())


def test_registry_declarations_match_the_blocks():
    """What a style declares is what its blocks do: the conformance check every new style passes."""
    layer = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    for name in STYLES:
        info = get_style(name)
        block = make_block(layer, name, ratio=2)
        assert block.style == name and block.trains_online == info.trains_online
        assert info.label and info.step_cost > 0
        if info.trains_online:  # an online style composes its kernel: the one it folds to, the one it runs
            x = torch.randn(2, 8, 6, 6)
            with torch.no_grad():
                assert compare_outputs(block.eval()(x), block.forward_composed(x)) <= 1e-5
                w = block.composed_weight()
                assert w.shape == layer.weight.shape and w.dtype == layer.weight.dtype and w.is_contiguous()
                assert compare_outputs(block.composed_weight(torch.float64), block.folded_weight_bias()[0]) <= 1e-12
        else:
            with pytest.raises(NotImplementedError, match="does not train online"):
                block.composed_weight()
        if "ratio" in info.options:
            assert make_block(layer, name, ratio=3).ratio == 3
        # a bias-free layer whose output has no sink gets a block that folds to no bias at all
        assert make_block(layer, name, center=False).eval().fold()[1] is None


def test_a_style_registered_elsewhere_is_usable_and_a_name_cannot_be_taken_twice():
    from sntfx.blocks import registry

    @registry.register_style("test-linear-x1", label="test: linear, ratio 1", trains_online=True, step_cost=1.0)
    def build(config):
        return LinearExpansion(config, 1)

    try:
        assert "test-linear-x1" in style_names()
        block = make_block(nn.Conv2d(4, 4, 3, padding=1), "test-linear-x1", ratio=7)  # ratio: not this style's
        assert block.ratio == 1 and block.style == "test-linear-x1" and block.trains_online
        with pytest.raises(ValueError, match="already registered"):
            registry.register_style("test-linear-x1", label="again")(lambda config: None)
    finally:
        registry._STYLES.pop("test-linear-x1")


def test_online_takes_whichever_form_costs_fewer_macs():
    conv = make_block(nn.Conv2d(16, 16, 3, padding=1), "linear", ratio=4)
    conv.online = True
    assert conv.online_pays(torch.zeros(8, 16, 14, 14))
    fc = make_block(nn.Linear(1568, 128), "linear", ratio=4)  # a classifier: composing costs ~136M MACs
    fc.online = True
    assert not fc.online_pays(torch.zeros(2, 1568))  # the chain on 2 rows costs far less
    assert fc.online_pays(torch.zeros(4096, 1568))
    x = torch.randn(2, 1568)
    with torch.no_grad():
        assert compare_outputs(fc(x), fc.forward_composed(x)) <= 1e-5
    # both composition orders give the same kernel; the cheaper one is used
    first, second = fc._compose_orders
    assert fc._project_first() == (first <= second)
    wide_out = make_block(nn.Linear(32, 256), "linear", ratio=2)
    assert wide_out._project_first() is False and fc._project_first() is True
    for block in (fc, wide_out):
        with torch.no_grad():
            w, _ = block.composed_weight_bias(torch.float64)
            ref = torch.einsum("ob,ba,ai->oi", block.project.weight.double(), block.core.weight.double(),
                               block.expand.weight.double())
        assert compare_outputs(ref, w) <= 1e-12


def _branch_reference(block, x):
    """The multi-branch forward written the plain way: pad once, crop the centre tap, every branch separately."""
    from sntfx.blocks.base import centre_crop
    import torch.nn.functional as F

    c = block.config
    xp = c.pad(x) if c.is_conv else x
    y = block.main_norm(block.main(xp))
    xc = centre_crop(c, xp) if c.is_conv else x
    if block.aux is not None:
        a = block.aux(xc)
        y = y + (block.aux_norm(a) if block.aux_norm is not None else a)
    if block.avg_proj is not None:
        t = block.avg_norm(block.avg_proj(xp))
        uniform = torch.full((c.out_features, 1, *c.kernel), 1.0 / c.ktaps, dtype=t.dtype)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[c.ndim]
        y = y + block.avg_post_norm(conv(t, uniform, None, c.stride, 0, c.dilation, c.out_features))
    if block.has_identity:
        y = y + (block.identity_norm(xc) if block.identity_norm is not None else xc)
    return block.post_norm(y) if block.post_norm is not None else y


@pytest.mark.parametrize("style", ["branch", "qa-branch"])
@pytest.mark.parametrize("name", [n for n in LAYERS if n != "1x1"] + ["1x1"])
def test_branch_forward_matches_the_plain_multi_branch_computation_in_training(style, name):
    """The explicit forward skips the padded copy (zero padding is left to the convolution, the 1x1 branch reads a
    view of the input) and runs qa-branch's 1x1 and identity as one kernel: training-mode outputs, parameter and
    input gradients and the norms' running statistics equal the plain computation's (float64, 1e-10)."""
    import copy

    layer = LAYERS[name]()
    gen = torch.Generator().manual_seed(0)
    block = make_block(layer, style, gen=gen).double().train()
    randomize_(block, seed=2)
    block.train()
    reference = copy.deepcopy(block)
    x1 = _input_for(layer, gen).double().requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = block(x1), _branch_reference(reference, x2)
    assert compare_outputs(y1, y2) <= 1e-10
    g = torch.randn(y1.shape, generator=gen, dtype=torch.float64)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert compare_outputs(x1.grad, x2.grad) <= 1e-10
    for (n, p1), p2 in zip(block.named_parameters(), reference.parameters()):
        assert (p1.grad is None) == (p2.grad is None), n
        if p1.grad is not None:  # atol: a shift before qa-branch's post-norm has a zero gradient, up to rounding
            assert torch.allclose(p1.grad, p2.grad, rtol=1e-9, atol=1e-12), n
    for (n, b1), b2 in zip(block.named_buffers(), reference.buffers()):
        assert compare_outputs(b1, b2) <= 1e-10, n


def _saved_by_composition(block) -> int:
    """Elements autograd keeps while composing ``block``'s kernel (parameters aside), plus the composed kernel
    itself, which the convolution keeps where the plain layer's keeps its weight."""
    with saved_for_backward(block.parameters()) as saved:
        w = block.composed_weight()
    return sum(saved.values()) // w.element_size() + w.numel()


@pytest.mark.parametrize("style", ONLINE_STYLES)
@pytest.mark.parametrize("name", ["3x3", "3x3 s2 no-bias", "5x5 depthwise", "3x5 dilated grouped", "1x1",
                                  "conv1d s2 dilated", "linear wide-in", "linear wide-out"])
def test_memory_cost_counts_what_training_holds(style, name):
    """A block's declared training memory is what autograd keeps for its composition (measured with saved-tensor
    hooks) plus its extra parameters held four times (value, gradient, Adam's two moments)."""
    from sntfx.blocks.base import OPTIMIZER_STATES

    layer = LAYERS[name]()
    for c_in, c_out in ((1, 1), (8, 4), (4, 8)):  # the same layer kind at several widths: both composition orders
        if isinstance(layer, nn.Linear):
            wide = nn.Linear(layer.in_features * c_in, layer.out_features * c_out)
        elif layer.groups > 1:
            wide = layer
        else:
            wide = type(layer)(layer.in_channels * c_in, layer.out_channels * c_out, layer.kernel_size,
                               stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                               bias=layer.bias is not None)
        block = make_block(wide, style, ratio=4)
        measured, declared = _saved_by_composition(block), block.saved_numel()
        # up to a few per-channel vectors (lin-branch's scales), which saved_numel leaves out
        assert abs(measured - declared) <= 0.05 * measured + 4 * block.config.out_features, (wide, measured, declared)
        extra = sum(p.numel() for p in block.parameters()) - wide.weight.numel() - (wide.bias is not None) * (
            block.config.out_features)
        assert block.memory_cost() == 4 * ((2 + OPTIMIZER_STATES) * max(extra, 0) + declared)
    explicit = make_block(nn.Conv2d(8, 8, 3), "branch")
    assert explicit.memory_cost() == 4 * (2 + OPTIMIZER_STATES) * explicit.extra_parameters()  # composes nothing
