"""The snt / fold / fold_bn passes on small graphs: match, no match, skips, counts, numerics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sntfx
from sntfx import PassContext, PassManager, Policy, Rule
from sntfx.blocks import LAYER_CLASSES, BranchBlock, LayerConfig, LinearExpansion, SNTBlock, style_names
from sntfx.graph_utils import randomize_, saved_for_backward
from sntfx.passes import FoldBatchNorm, SNTExpand, SNTFold
from sntfx.passes.snt_expand import OVER_BUDGET, OVER_MEMORY
from sntfx.tracing import compare_outputs

from models_for_tests import Conv1dNet, Conv3dNet, ConvNet, Functional, Tied, Tokens

TOL = 1e-5


def _params(m):
    return sum(p.numel() for p in m.parameters())


def _roundtrip(model, x, style, **kw):
    gm = sntfx.trace(model.eval(), x)
    n_orig = _params(gm)
    snt, rep = sntfx.transform(gm, x, style=style, report=True, **kw)
    randomize_(snt, seed=5)
    snt.eval()
    with torch.no_grad():
        want = snt(x)
    folded, frep = sntfx.fold(snt, x, report=True)
    with torch.no_grad():
        got = folded(x)
    return gm, snt, folded, rep.passes[0], frep.passes[0], compare_outputs(want, got), n_orig


@pytest.mark.parametrize("style", style_names())
@pytest.mark.parametrize("model_cls,shape", [(ConvNet, (2, 3, 8, 8)), (Conv1dNet, (3, 2, 16)),
                                             (Conv3dNet, (2, 2, 4, 8, 6))])
def test_expand_then_fold_is_exact_and_restores_the_architecture(style, model_cls, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    # every layer (the training-cost budget would leave some of these tiny layers plain)
    gm, snt, folded, srep, frep, err, n_orig = _roundtrip(model_cls(), x, style, ratio=3, budget=None)
    assert err <= TOL
    assert srep.modified and frep.modified
    n_layers = sum(isinstance(m, tuple(LAYER_CLASSES.values())) for m in gm.modules())
    assert srep.stats[f"expanded: {style}"] == n_layers
    assert sum(isinstance(m, SNTBlock) for m in snt.modules()) == n_layers
    assert not any(isinstance(m, SNTBlock) for m in folded.modules())
    assert _params(folded) == n_orig
    assert frep.info["max_block_error"] <= TOL
    # Same module types at the same paths as the original traced model.
    orig_types = {n: type(m) for n, m in gm.named_modules() if n}
    assert {n: type(m) for n, m in folded.named_modules() if n} == orig_types
    assert len(folded.graph.nodes) == len(gm.graph.nodes)


def test_branch_bias_goes_into_the_following_batchnorm_only_where_it_can():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = sntfx.trace(ConvNet().eval(), x)
    snt = sntfx.transform(gm, x, style="branch")
    # conv1 -> bn1 and conv2 -> bn2 have sinks; the depthwise conv has its own bias.
    assert snt.get_submodule("conv1").center and snt.get_submodule("conv2").center
    _, _, folded, _, frep, err, _ = _roundtrip(ConvNet(), x, "branch")
    assert err <= TOL  # the moved bias keeps the function exact
    assert frep.stats["bias moved into BatchNorm"] == 2
    assert folded.get_submodule("conv1").bias is None


def test_linear_on_tokens_is_not_a_bias_sink():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 6)
    gm = sntfx.trace(Tokens().eval(), x)
    snt = sntfx.transform(gm, x, style="branch")
    assert snt.get_submodule("proj").center is False  # BatchNorm1d normalises tokens, not features
    _, _, folded, _, _, err, n = _roundtrip(Tokens(), x, "qa-branch")
    assert err <= TOL and _params(folded) == n


def test_reused_layer_becomes_one_shared_block_and_tied_weights_are_skipped():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    gm, snt, folded, srep, _, err, n = _roundtrip(Tied(), x, "linear", ratio=2, budget=None)
    assert srep.stats["expanded: linear"] == 1
    assert srep.stats["shared block (several call sites)"] == 1
    assert srep.stats["skip: shared weight"] == 2  # a and b share a weight
    assert isinstance(snt.get_submodule("conv"), LinearExpansion)
    assert sum(1 for n in snt.graph.nodes if n.op == "call_module" and n.target == "conv") == 2
    assert err <= TOL and _params(folded) == n
    assert folded.get_submodule("a").weight is folded.get_submodule("b").weight


def test_functional_convolution_is_skipped_and_reported():
    x = torch.randn(1, 3, 5, 5)
    gm = sntfx.trace(Functional().eval(), x)
    _, rep = sntfx.transform(gm, x, style="linear", report=True, budget=None)
    assert rep.passes[0].stats["skip: functional conv"] == 1
    assert rep.passes[0].stats["expanded: linear"] == 1


def test_no_match_leaves_the_model_alone():
    class NoLayers(nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    x = torch.randn(2, 3)
    gm = sntfx.trace(NoLayers(), x)
    snt, rep = sntfx.transform(gm, x, report=True)
    assert not rep.passes[0].modified and rep.passes[0].stats == {}
    folded, frep = sntfx.fold(snt, x, report=True)
    assert not frep.passes[0].modified


def test_conv_subclasses_plain_ones_expand_custom_ones_are_traced_through():
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = MyConv(3, 3, 3, padding=1)
            self.b = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.b(self.a(x))

    class PlainConv(nn.Conv2d):
        pass

    x = torch.randn(1, 3, 5, 5)
    net = Net()
    net.b = PlainConv(3, 3, 1)
    snt, rep = sntfx.transform(sntfx.trace(net, x), x, style="linear", report=True, budget=None)
    # MyConv's own forward is traced through, leaving a functional conv behind.
    assert rep.passes[0].stats == {"skip: functional conv": 1, "expanded: linear": 1}
    assert isinstance(snt.get_submodule("b"), LinearExpansion)
    folded = sntfx.fold(snt, x)
    assert type(folded.get_submodule("b")) is nn.Conv2d  # folds into the standard layer type


def test_policy_selects_layers_and_sets_style_per_layer():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    policy = Policy(
        style="linear",
        ratio=2,
        skip_first=True,
        rules=(Rule("dw", style="qa-branch"), Rule("fc", skip=True)),
    )
    gm = sntfx.trace(ConvNet().eval(), x)
    snt, rep = sntfx.transform(gm, x, policy=policy, report=True)
    stats = rep.passes[0].stats
    assert stats == {"skip: first layer": 1, "skip: rule fc": 1, "expanded: qa-branch": 1, "expanded: linear": 1}
    assert isinstance(snt.get_submodule("dw"), BranchBlock) and snt.get_submodule("dw").qa
    assert isinstance(snt.get_submodule("conv1"), nn.Conv2d)
    only_conv = sntfx.transform(gm, x, policy=Policy(style="linear", types=("linear",), skip_last=False))
    assert isinstance(only_conv.get_submodule("fc"), LinearExpansion)
    assert isinstance(only_conv.get_submodule("conv2"), nn.Conv2d)


def test_policy_from_files(tmp_path):
    (tmp_path / "p.toml").write_text('style = "branch"\nexclude = ["fc"]\n[[rules]]\npattern = "conv*"\nstyle = "linear"\nratio = 3\n')
    (tmp_path / "p.json").write_text('{"style": "qa-branch", "min_params": 100}')
    toml = Policy.from_file(tmp_path / "p.toml")
    assert toml.rules[0].ratio == 3 and toml.exclude == ("fc",)
    assert Policy.from_dict(toml.to_dict()) == toml
    js = Policy.from_file(tmp_path / "p.json")
    d = js.decide("dw", "conv2d", 80, first=False, last=False)
    assert not d.expand and d.reason == "below min_params"
    capped = Policy(max_params=1000)
    assert capped.decide("fc", "linear", 5000, first=False, last=False).reason == "above max_params"
    assert capped.decide("fc", "linear", 500, first=False, last=False).expand
    with pytest.raises(sntfx.PolicyError, match="max_params"):
        Policy(min_params=10, max_params=5)
    (tmp_path / "bad.json").write_text('{"stlye": "linear"}')
    with pytest.raises(sntfx.PolicyError, match="unknown policy key"):
        Policy.from_file(tmp_path / "bad.json")


def test_transform_and_fold_do_not_touch_their_input():
    x = torch.randn(2, 3, 8, 8)
    gm = sntfx.trace(ConvNet().eval(), x)
    snt = sntfx.transform(gm, x)
    assert not any(isinstance(m, SNTBlock) for m in gm.modules())
    folded = sntfx.fold(snt, x)
    assert any(isinstance(m, SNTBlock) for m in snt.modules())
    assert not any(isinstance(m, SNTBlock) for m in folded.modules())


def test_training_the_snt_model_leaves_the_users_module_as_it_was():
    """transform copies an nn.Module before tracing it: a training step of the SNT model (its optimizer step on
    the layers the budget left plain, its norms' running statistics) changes nothing of the caller's module.
    With inplace=True the two share what was not expanded, as the docstring says."""
    import threading

    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    model = ConvNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def train_step(snt):
        snt.train()
        opt = torch.optim.Adam(snt.parameters(), lr=0.1)
        snt(x).square().mean().backward()
        opt.step()

    snt = sntfx.transform(model, x, style="linear", policy=Policy(exclude=("fc",)))
    assert isinstance(snt.get_submodule("fc"), nn.Linear)  # left plain: trained as is
    train_step(snt)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    shared = sntfx.transform(model, x, style="linear", inplace=True,
                             policy=Policy(exclude=("fc",)))
    train_step(shared)
    assert not torch.equal(model.fc.weight, before["fc.weight"])  # the plain layer is the caller's own
    model.lock = threading.Lock()  # a module that cannot be deep-copied
    with pytest.raises(sntfx.SntfxError, match="inplace=True"):
        sntfx.transform(model, x)


@pytest.mark.parametrize("model_cls,shape", [(Conv1dNet, (4, 2, 16)), (Conv3dNet, (2, 2, 4, 8, 6))])
def test_fold_with_batchnorm_removes_every_batchnorm_exactly(model_cls, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    gm = sntfx.trace(model_cls().eval(), x)
    randomize_(gm, 1)
    snt = sntfx.transform(gm, x, style="branch")
    randomize_(snt, 2)
    snt.eval()
    with torch.no_grad():
        want = snt(x)
    folded = sntfx.fold(snt, x, batchnorm=True, check=True)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with torch.no_grad():
        assert compare_outputs(want, folded(x)) <= TOL


def test_fold_measures_on_random_inputs_without_example_inputs():
    x = torch.randn(2, 3, 8, 8)
    snt = sntfx.transform(sntfx.trace(ConvNet().eval(), x), x, style="branch")
    report = PassManager([SNTFold()]).run(snt, PassContext())
    assert report.passes[0].info["max_block_error"] <= TOL
    assert set(report.passes[0].info["block_errors"]) == {"conv1", "dw", "conv2", "fc"}


def test_online_option_reaches_the_blocks():
    x = torch.randn(2, 3, 8, 8)
    snt = sntfx.transform(sntfx.trace(ConvNet().eval(), x), x, style="linear", online=True)
    assert all(m.online for m in snt.modules() if isinstance(m, LinearExpansion))


def test_seed_makes_expansion_deterministic():
    x = torch.randn(2, 3, 8, 8)
    gm = sntfx.trace(ConvNet().eval(), x)
    a = sntfx.transform(gm, x, seed=3)
    b = sntfx.transform(gm, x, seed=3)
    c = sntfx.transform(gm, x, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_fold_bn_skips_what_it_cannot_fold():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.bn_free = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y, self.bn_free(torch.relu(y))

    x = torch.randn(2, 3, 6, 6)
    gm = sntfx.trace(Net().eval(), x)
    report = PassManager([FoldBatchNorm()]).run(gm, PassContext(example_inputs=(x,)))
    stats = report.passes[0].stats
    assert not report.passes[0].modified
    assert stats == {"skip: layer output used elsewhere": 1, "skip: input is not a layer": 1}


def test_expand_pass_params_rebuild_the_same_pass():
    p = SNTExpand(style="branch", ratio=3, policy=Policy(exclude=("fc",)), preserve=True)
    q = SNTExpand(**p.params())
    assert q.params() == p.params() and q.spec() == "snt(style=branch,ratio=3,preserve=true)"


class _WideOnSmallMap(nn.Module):
    """A conv ``8 -> mid`` on a 32x32 map, then ``mid -> wide`` on a 2x2 map (VGG-11's last stage in miniature)."""

    def __init__(self, mid: int = 8, wide: int = 256):
        super().__init__()
        self.narrow = nn.Conv2d(8, mid, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.wide = nn.Conv2d(mid, wide, 3, padding=1)

    def forward(self, x):
        return self.wide(self.pool(self.narrow(x)))


def test_budget_leaves_layers_plain_whose_composition_outweighs_their_work(tmp_path):
    """linear x4 on the wide 2x2 conv costs 21 M multiply-adds per step to compose (its cheaper order), 2.3x what
    the layer itself does at batch 128: it stays plain under a 10% budget, while the narrow conv on 32x32 expands;
    with budget=None both expand, and at a large batch the wide layer's own work outgrows its composition."""
    x = torch.randn(2, 8, 32, 32)
    model = _WideOnSmallMap()
    gm, rep = sntfx.transform(model, x, style="linear", budget=0.1, batch_size=128, report=True)
    assert isinstance(gm.narrow, LinearExpansion) and isinstance(gm.wide, nn.Conv2d)
    assert rep.passes[0].stats[OVER_BUDGET] == 1
    plain = 128 * (8 * 8 * 9 * 32 * 32 + 8 * 256 * 9 * 4)  # both layers' multiply-adds at batch 128
    assert gm.narrow.compose_cost() + gm.narrow.parameter_cost() <= 0.1 * plain
    assert LinearExpansion(LayerConfig.from_module(model.wide), 4).compose_macs() > 0.1 * plain
    everything = sntfx.transform(model, x, style="linear", budget=None)
    assert isinstance(everything.wide, LinearExpansion)
    # at a large enough batch the wide layer's own work grows and it expands
    assert isinstance(sntfx.transform(model, x, style="linear", budget=0.1, batch_size=8192).wide, LinearExpansion)



def test_a_saved_model_replays_the_budgets_choice(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    gm = sntfx.transform("sntfx:vgg11", x, style="linear")  # the default budget keeps the 512-channel convs plain
    kinds = {n: type(m).__name__ for n, m in gm.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, SNTBlock))}
    assert "Conv2d" in kinds.values() and "LinearExpansion" in kinds.values()
    sntfx.save(gm, tmp_path / "m.pt")
    loaded = sntfx.load(tmp_path / "m.pt")
    assert kinds == {n: type(m).__name__ for n, m in loaded.named_modules() if n in kinds}


def test_budget_counts_elementwise_work_as_memory_bound_passes():
    """An elementwise composition costs ELEMENT_MACS units per pass and element (cost model 2), not one
    multiply-add per element (cost model 1, kept for old recipes). At a 1% budget (30 M of the model's 3.0 G
    multiply-adds at batch 128), powerprop on the wide conv (1.18 M weights x 5 passes x 17 = 100 M units)
    stays plain, where the first model (1.18 M) kept it; the narrow conv's 1.6 M units are under
    MIN_COUNTED, so it expands even at budget 0."""
    from sntfx.blocks.base import ELEMENT_MACS, OPTIMIZER_PASSES
    from sntfx.blocks.lin_branch import LinearizedBranchBlock
    from sntfx.blocks.powerprop import PowerPropagation
    from sntfx.passes.snt_expand import MIN_COUNTED

    x = torch.randn(2, 8, 32, 32)
    model = _WideOnSmallMap(mid=256, wide=512)  # the wide conv: 256 -> 512, 1.18 M weights
    gm = sntfx.transform(model, x, style="powerprop", budget=0.01, batch_size=128)
    assert isinstance(gm.narrow, PowerPropagation) and isinstance(gm.wide, nn.Conv2d)
    wide = PowerPropagation(LayerConfig.from_module(model.wide))
    assert wide.compose_cost() == ELEMENT_MACS * PowerPropagation.compose_passes * 512 * 256 * 9
    assert wide.parameter_cost() == 0  # v replaces the weight: no extra parameters
    assert PowerPropagation(LayerConfig.from_module(model.narrow)).compose_cost() < MIN_COUNTED
    old = PassManager([SNTExpand(style="powerprop", budget=0.01, cost_model=1)]).run(
        sntfx.trace(model, x), PassContext(example_inputs=(x,))).graph_module
    assert isinstance(old.wide, PowerPropagation)
    # sntfx.transform takes the cost model too, and the recipe records it
    api_old = sntfx.transform(model, x, style="powerprop", budget=0.01, batch_size=128, cost_model=1)
    assert isinstance(api_old.wide, PowerPropagation)
    assert next(p for p in api_old.meta["sntfx"]["pipeline"] if p["name"] == "snt")["params"]["cost_model"] == 1
    with pytest.raises(ValueError, match="cost_model"):
        sntfx.transform(model, x, style="powerprop", cost_model=5)
    nothing = sntfx.transform(model, x, style="powerprop", budget=0.0)
    assert isinstance(nothing.narrow, PowerPropagation) and isinstance(nothing.wide, nn.Conv2d)
    # lin-branch's extra branches are parameters the optimizer updates every step
    lb = LinearizedBranchBlock(LayerConfig.from_module(model.wide))
    extra = sum(p.numel() for p in lb.parameters()) - model.wide.weight.numel() - 512
    assert extra > 0 and lb.parameter_cost() == ELEMENT_MACS * OPTIMIZER_PASSES * extra


def test_the_recipe_records_the_budgets_choice_and_old_recipes_replay_the_first_cost_model(tmp_path, monkeypatch):
    """A saved model rebuilds the layers its budget left plain even when the cost model has changed since;
    a recipe from before the calibrated model (no cost_model, no plain_layers) replays cost model 1."""
    import sntfx.blocks.base as base

    from sntfx.passes.snt_expand import COST_MODEL

    x = torch.randn(2, 1, 28, 28)

    def expand():  # cost model 2 (model 3's floor would let this small model expand everything at 1%)
        return PassManager([SNTExpand(style="powerprop", budget=0.01, cost_model=2)]).run(
            sntfx.trace("sntfx:smallvgg", x), PassContext(example_inputs=(x,))).graph_module

    gm = expand()  # its 1568 -> 128 classifier stays plain
    step = next(p for p in gm.meta["sntfx"]["pipeline"] if p["name"] == "snt")
    assert step["params"]["plain_layers"] == ["classifier.0"] and step["params"]["cost_model"] == 2
    default = sntfx.transform("sntfx:smallvgg", x, style="powerprop")
    recorded = next(p for p in default.meta["sntfx"]["pipeline"] if p["name"] == "snt")["params"]
    assert recorded["cost_model"] == COST_MODEL == 4
    sntfx.save(gm, tmp_path / "m.pt")
    monkeypatch.setattr(base, "ELEMENT_MACS", 0)  # a recalibration that would now expand it
    assert isinstance(expand().get_submodule("classifier.0"), SNTBlock)
    loaded = sntfx.load(tmp_path / "m.pt")
    assert isinstance(loaded.get_submodule("classifier.0"), nn.Linear)
    assert isinstance(loaded.get_submodule("features.0"), SNTBlock)
    torch.testing.assert_close(loaded(x), gm.eval()(x))
    legacy = {k: v for k, v in step["params"].items() if k not in ("cost_model", "plain_layers")}
    replayed = SNTExpand(**{**SNTExpand.legacy_params, **legacy})
    assert replayed.cost_model == 1 and replayed.plain_layers is None
    with pytest.raises(ValueError, match="cost_model"):
        SNTExpand(cost_model=5)
    with pytest.raises(ValueError, match="plain_layers"):
        SNTExpand(plain_layers="wide")


class _DeepNarrow(nn.Module):
    """``depth`` 16-channel 3x3 convs with ReLUs: many blocks whose kernels cost little to compose but whose calls
    each cost the same fixed overhead (a deep narrow ResNet in miniature)."""

    def __init__(self, depth: int = 80, channels: int = 16):
        super().__init__()
        self.body = nn.Sequential(*[m for _ in range(depth)
                                    for m in (nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())])

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("style", ["linear", "lin-branch", "powerprop"])
def test_cost_model_3_counts_each_blocks_fixed_call_cost(style, monkeypatch):
    """Cost model 2 exempted every block below MIN_COUNTED, so many small blocks could together exceed the budget
    without any of them being counted. Model 3 adds each block's calibrated call_overhead and counts every block.
    At a budget between what 80 small blocks cost without and with their call overhead, model 2 keeps all 80,
    model 3 keeps what fits the budget, and model 3 without the call overhead would keep all 80 again."""
    from sntfx.passes.snt_expand import MIN_COUNTED, MIN_SPENT

    x = torch.randn(2, 16, 8, 8)
    model = _DeepNarrow()
    plain = 80 * 128 * 16 * 16 * 9 * 8 * 8  # the convs' multiply-adds at batch 128
    every = [m for m in sntfx.transform(model, x, style=style, budget=None).modules() if isinstance(m, SNTBlock)]
    assert len(every) == 80 and every[0].call_overhead > 0
    sized = sum(b.compose_cost(3) + b.parameter_cost() for b in every)
    counted = sized + sum(b.call_overhead for b in every)
    budget = (sized + counted) / 2 / plain
    assert budget * plain > MIN_SPENT and all(b.compose_cost(3) + b.parameter_cost() < MIN_COUNTED for b in every)

    def expand(cost_model):
        return PassManager([SNTExpand(style=style, budget=budget, cost_model=cost_model, memory_budget=None)]).run(
            sntfx.trace(model, x), PassContext(example_inputs=(x,)))

    assert sum(isinstance(m, SNTBlock) for m in expand(2).graph_module.modules()) == 80
    result = expand(3)
    kept = [m for m in result.graph_module.modules() if isinstance(m, SNTBlock)]
    assert 0 < len(kept) < 80 and result.passes[0].stats[OVER_BUDGET] == 80 - len(kept)
    assert sum(b.compose_cost(3) + b.call_overhead + b.parameter_cost() for b in kept) <= budget * plain
    monkeypatch.setattr(type(kept[0]), "call_overhead", 0.0)
    assert sum(isinstance(m, SNTBlock) for m in expand(3).graph_module.modules()) == 80


def test_cost_model_4_counts_linears_passes_over_its_factors_and_products():
    """Composing linear x4 on a 64-channel 3x3 kernel (36,864 elements) passes over its factors (589,824 + 2 x
    16,384), the intermediate product (147,456) and the kernel: 806,912 elements, where cost model 3 counted the
    kernel's. Styles that compose elementwise cost the same under both. On 12 such layers, at a budget between
    what models 3 and 4 say they cost, model 3 expands all 12 and model 4 only what its own count fits."""
    from sntfx.blocks.base import ELEMENT_MACS
    from sntfx.blocks.lin_branch import LinearizedBranchBlock
    from sntfx.blocks.powerprop import PowerPropagation

    config = LayerConfig.from_module(nn.Conv2d(64, 64, 3, padding=1, bias=False))
    block = LinearExpansion(config, 4)
    assert block.compose_elements() == 589_824 + 2 * 16_384 + 147_456 + 36_864
    assert block.compose_cost(4) - block.compose_cost(3) == pytest.approx(
        ELEMENT_MACS * LinearExpansion.compose_passes * (806_912 - 36_864))
    for style in (PowerPropagation, LinearizedBranchBlock):
        assert style(config).compose_cost(4) == style(config).compose_cost(3) > 0
    x = torch.randn(2, 64, 8, 8)
    model = _DeepNarrow(depth=12, channels=64)
    plain = 12 * 128 * 64 * 64 * 9 * 8 * 8

    def per_block(b, cost_model):
        return b.compose_cost(cost_model) + b.call_overhead + b.parameter_cost()

    every = [m for m in sntfx.transform(model, x, style="linear", budget=None).modules() if isinstance(m, SNTBlock)]
    budget = (sum(per_block(b, 3) for b in every) + sum(per_block(b, 4) for b in every)) / 2 / plain

    def expand(cost_model):
        gm = PassManager([SNTExpand(style="linear", budget=budget, cost_model=cost_model, memory_budget=None)]).run(
            sntfx.trace(model, x), PassContext(example_inputs=(x,))).graph_module
        return [m for m in gm.modules() if isinstance(m, SNTBlock)]

    assert len(expand(3)) == 12
    kept = expand(4)
    assert 0 < len(kept) < 12 and sum(per_block(b, 4) for b in kept) <= budget * plain
    assert len(kept) == int(budget * plain // per_block(kept[0], 4))  # identical blocks: as many as fit


def test_budget_is_validated_and_ignores_styles_without_composition():
    with pytest.raises(ValueError, match="budget"):
        SNTExpand(style="linear", budget=-0.5)
    with pytest.raises(ValueError, match="batch_size"):
        SNTExpand(style="linear", batch_size=0)
    x = torch.randn(2, 8, 32, 32)
    gm = sntfx.transform(_WideOnSmallMap(), x, style="branch", budget=0.0)  # explicit styles compose nothing
    assert isinstance(gm.wide, BranchBlock) and isinstance(gm.narrow, BranchBlock)


def test_activation_estimate_scales_from_the_example_batch_to_the_training_batch():
    """What the memory budget takes as the plain model's activations: measured at batch 2 in eval mode, it is
    within 10% of what autograd keeps in a training-mode step at batch 16."""
    from sntfx.passes.snt_expand import _activation_bytes

    gm = sntfx.trace(sntfx.build_model("sntfx:resnet20"), torch.zeros(2, 3, 32, 32))
    with saved_for_backward((*gm.parameters(), *gm.buffers())) as saved:
        gm.train()(torch.randn(16, 3, 32, 32))
    gm.bn1.eval()  # a frozen BatchNorm in a model in training mode
    estimate = _activation_bytes(gm, (torch.randn(2, 3, 32, 32),), 16)
    assert gm.training and not gm.bn1.training  # the estimate puts every module's mode back
    assert all(m.training for n, m in gm.named_modules() if n != "bn1")
    assert abs(estimate - sum(saved.values())) <= 0.1 * sum(saved.values())
    assert _activation_bytes(gm, (torch.randn(2, 5, 32, 32),), 16) is None  # cannot run: no estimate


def test_memory_budget_leaves_the_largest_holders_plain():
    """linear x4 holds about 16x a 3x3 layer's weights four times over (values, gradients, Adam's moments): on
    ResNet-20 at batch 128 that is 37% more than the plain model's training memory. A 25% memory budget keeps
    the blocks holding the most per unit of their work plain until the rest fit; budget=None or
    memory_budget=None sets no memory limit; lin-branch, whose blocks hold little, is unaffected."""
    from sntfx.blocks.base import OPTIMIZER_STATES
    from sntfx.passes.snt_expand import _activation_bytes

    x = torch.zeros(2, 3, 32, 32)
    plain = sntfx.trace(sntfx.build_model("sntfx:resnet20"), x)
    model = (2 + OPTIMIZER_STATES) * sum(p.numel() * 4 for p in plain.parameters()) + _activation_bytes(plain, (x,), 128)
    # a time budget that limits nothing here, so that what is left plain is the memory budget's doing
    gm, rep = sntfx.transform(plain, x, style="linear", budget=1.0, memory_budget=0.25, report=True)
    blocks = [m for m in gm.modules() if isinstance(m, LinearExpansion)]
    dropped = rep.passes[0].stats[OVER_MEMORY]
    assert dropped >= 1 and rep.passes[0].stats.get(OVER_BUDGET, 0) == 0
    assert sum(b.memory_cost() for b in blocks) <= 0.25 * model
    everything = sntfx.transform(plain, x, style="linear", budget=1.0, memory_budget=None)
    held = sum(b.memory_cost() for b in everything.modules() if isinstance(b, LinearExpansion))
    assert held > 0.3 * model  # without the limit it would hold more than the goal allows
    # the plain ones hold the most per multiply-add: the classifier (one row per image) and the last stage's
    # 64-channel convs (on 8x8 maps)
    kept = {n for n, m in gm.named_modules() if isinstance(m, LinearExpansion)}
    left = [n for n, m in everything.named_modules() if isinstance(m, LinearExpansion) and n not in kept]
    assert len(left) == dropped and all(n.startswith("layer3") or n == "fc" for n in left)
    nothing_limited = sntfx.transform(plain, x, style="linear", budget=None, memory_budget=0.0)
    assert sum(isinstance(m, LinearExpansion) for m in nothing_limited.modules()) == len(
        [m for m in everything.modules() if isinstance(m, LinearExpansion)])
    _, lb = sntfx.transform(plain, x, style="lin-branch", memory_budget=0.25, report=True)
    assert OVER_MEMORY not in lb.passes[0].stats
    # a small model's blocks fit in the floor (MIN_HELD) whatever the fraction: memory does not limit its training
    from sntfx.passes.snt_expand import MIN_HELD

    small = ConvNet()
    _, rep = sntfx.transform(small, torch.zeros(2, 3, 8, 8), style="linear", memory_budget=0.0, report=True)
    assert OVER_MEMORY not in rep.passes[0].stats and rep.passes[0].stats["expanded: linear"] >= 2
    assert 0 < sum(b.memory_cost() for b in sntfx.transform(small, torch.zeros(2, 3, 8, 8), style="linear")
                   .modules() if isinstance(b, SNTBlock)) <= MIN_HELD
    with pytest.raises(ValueError, match="memory_budget"):
        SNTExpand(style="linear", memory_budget=-1)


def test_a_saved_model_replays_the_memory_budgets_choice(tmp_path, monkeypatch):
    """The recipe records the layers the memory budget left plain; loading rebuilds them plain even when the
    memory model would now decide otherwise, and recipes from before the memory budget replay without it."""
    import sntfx.blocks.base as base

    x = torch.zeros(2, 3, 32, 32)
    gm = sntfx.transform("sntfx:resnet20", x, style="linear", budget=1.0, memory_budget=0.25)
    step = next(p for p in gm.meta["sntfx"]["pipeline"] if p["name"] == "snt")
    assert step["params"]["memory_budget"] == 0.25 and len(step["params"]["plain_layers"]) >= 1
    sntfx.save(gm, tmp_path / "m.pt")
    count = sum(isinstance(m, LinearExpansion) for m in gm.modules())
    monkeypatch.setattr(base, "OPTIMIZER_STATES", -2)  # a memory model under which more would fit
    again = sntfx.transform("sntfx:resnet20", x, style="linear", budget=1.0, memory_budget=0.25)
    assert sum(isinstance(m, LinearExpansion) for m in again.modules()) > count
    loaded = sntfx.load(tmp_path / "m.pt")
    assert {n for n, m in loaded.named_modules() if isinstance(m, LinearExpansion)} == {
        n for n, m in gm.named_modules() if isinstance(m, LinearExpansion)}
    # a recipe from before the memory budget (no memory_budget, no plain_layers) replays without it: all 22 expand
    legacy = {k: v for k, v in step["params"].items() if k not in ("memory_budget", "plain_layers")}
    replayed = PassManager([SNTExpand(**{**SNTExpand.legacy_params, **legacy})]).run(
        sntfx.trace("sntfx:resnet20", x), PassContext(example_inputs=(x,))).graph_module
    assert sum(isinstance(m, LinearExpansion) for m in replayed.modules()) == 22
