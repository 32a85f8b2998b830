"""Activation-aware (Wanda) pruning, N:M with it, and BatchNorm re-estimation after pruning."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import sntfx
from sntfx import PassContext, PassManager
from sntfx.compress import accuracy, apply_pass
from sntfx.compress_utils import input_feature_norms, prunable_layers, reestimate_batchnorm
from sntfx.errors import PassPreconditionError
from sntfx.pass_base import parse_pipeline
from sntfx.passes import MagnitudePrune, NMPrune, StructuredPrune
from sntfx.passes.prune_nm import nm_groups
from sntfx.passes.prune_wanda import WandaPrune


class Mixed(nn.Module):
    """Conv2d (strided, padded, grouped), Conv1d (reflect), Linear on tokens: every kind of input column."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, (3, 2), padding=(1, 0), dilation=(2, 1), groups=2)
        self.c3 = nn.Conv1d(8, 8, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        h = self.c2(h)
        h = self.c3(h.mean(dim=3))
        return self.fc(h.transpose(1, 2)).mean(dim=1)


class Volume(nn.Module):
    """Conv3d (strided, padded, grouped; reflect-padded, dilated), pooled into a Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(3, 4, (2, 3, 3), stride=(1, 2, 2), padding=(1, 1, 0))
        self.c2 = nn.Conv3d(4, 4, 3, padding=(1, 2, 1), dilation=(1, 2, 1), groups=2, padding_mode="reflect")
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.c1(x))).mean((2, 3, 4)))


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 4, 12, 11, generator=g) * torch.linspace(0.1, 3, 4).reshape(1, 4, 1, 1) for _ in range(n)]


def _reference_norm(layer: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor:
    """||X_j|| by brute force: every (output position, tap) product the layer forms, as an explicit sum."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        cat = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]).double()
        return cat.square().sum(0).sqrt().expand_as(w)
    out = torch.zeros(w.shape, dtype=torch.float64)
    for x in inputs:
        # d y[n, o, p] / d W[o, i, t] = x_padded[n, group(o) * C_g + i, p*s + t*d]: the gradient of sum(y^2)-free
        # form is easier: square the input, convolve with one-hot kernels, and read each tap's sum.
        probe = type(layer)(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                            padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=False,
                            padding_mode=layer.padding_mode).double()
        for idx in torch.cartesian_prod(*[torch.arange(s) for s in w.shape]).tolist():
            with torch.no_grad():
                probe.weight.zero_()
                probe.weight[tuple(idx)] = 1.0
                out[tuple(idx)] += probe(x.double().square())[:, idx[0]].sum()
    return out.sqrt()


def _volumes(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 4, 9, 8, generator=g) for _ in range(n)]


@pytest.mark.parametrize("model_cls,batches", [(Mixed, _batches), (Volume, _volumes)])
def test_input_norms_are_the_norms_of_the_columns_each_weight_multiplies(model_cls, batches):
    torch.manual_seed(0)
    model = model_cls()
    gm = sntfx.trace(model, batches()[0])
    layers = prunable_layers(gm)
    captured: dict[str, list] = {name: [] for name, _ in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, a, name=name: captured[name].append(a[0].detach()))
             for name, m in layers]
    gm.eval()
    with torch.no_grad():
        for x in batches():
            gm(x)
    for h in hooks:
        h.remove()
    norms = input_feature_norms(gm, layers, batches())
    assert set(norms) == {name for name, _ in layers}
    for name, layer in layers:
        want = _reference_norm(layer, captured[name])
        assert norms[name].shape == layer.weight.shape
        assert torch.allclose(norms[name].double(), want, rtol=1e-5), name


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("scope", ["row", "layer"])
def test_wanda_zeroes_exactly_the_lowest_scores(sparsity, scope):
    torch.manual_seed(1)
    gm = sntfx.trace(Mixed(), _batches()[0])
    layers = prunable_layers(gm)
    norms = input_feature_norms(gm, layers, _batches())
    scores = {n: (m.weight.detach().abs() * norms[n]) for n, m in layers}
    pruned = PassManager([WandaPrune(sparsity, scope=scope)]).run(gm, PassContext(calibration=_batches())).graph_module
    for name, layer in prunable_layers(pruned):
        w, s = layer.weight.detach(), scores[name]
        rows = [(w, s)] if scope == "layer" else list(zip(w, s))
        for wr, sr in rows:
            zero = wr == 0
            assert int(zero.sum()) == round(sparsity * wr.numel())
            assert sr[~zero].min() >= sr[zero].max()


def test_wanda_keeps_weights_on_loud_inputs_that_magnitude_would_drop():
    """Inputs 100x louder on feature 0: Wanda keeps its small weights, magnitude pruning drops them."""
    fc = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[0.1, 1.0, 0.9, 0.8]] * 3))
    batches = [torch.randn(16, 4) * torch.tensor([100.0, 1.0, 1.0, 1.0])]
    gm = sntfx.trace(nn.Sequential(fc), batches[0])
    wanda = PassManager([WandaPrune(0.5)]).run(gm, PassContext(calibration=batches), inplace=False).graph_module
    magnitude = PassManager([MagnitudePrune(0.5, scope="layer")]).run(gm, PassContext()).graph_module
    assert (wanda.get_submodule("0").weight[:, 0] != 0).all()
    assert (magnitude.get_submodule("0").weight[:, 0] == 0).all()


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_wanda_nm_keeps_the_best_n_of_every_m(pattern):
    n, m = map(int, pattern.split(":"))
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.Flatten(),
                          nn.Linear(16 * 6 * 6, 8))
    batches = [torch.randn(4, 8, 6, 6) * torch.linspace(0.2, 4, 8).reshape(1, 8, 1, 1) for _ in range(2)]
    gm = sntfx.trace(model, batches[0])
    layers = prunable_layers(gm)
    norms = input_feature_norms(gm, layers, batches)
    scores = {k: (mod.weight.detach().abs() * norms[k]) for k, mod in layers}
    report = PassManager([WandaPrune(pattern=pattern)]).run(gm, PassContext(calibration=batches))
    for name, layer in prunable_layers(report.graph_module):
        groups_w, groups_s = nm_groups(layer.weight, m), nm_groups(scores[name], m)
        kept = groups_w != 0
        assert (kept.sum(1) == n).all(), name
        assert (groups_s.masked_fill(~kept, float("inf")).min(1).values
                >= groups_s.masked_fill(kept, float("-inf")).max(1).values).all()


def test_wanda_refuses_before_anything_runs_without_calibration_and_bad_arguments():
    gm = sntfx.trace(Mixed(), _batches()[0])
    with pytest.raises(PassPreconditionError, match="prune_wanda.*calibration"):
        PassManager([MagnitudePrune(0.5), WandaPrune(0.5)]).run(gm, PassContext())
    with pytest.raises(ValueError, match="not both"):
        WandaPrune(0.5, pattern="2:4")
    with pytest.raises(ValueError, match="scope"):
        WandaPrune(0.5, scope="global")
    (p,) = parse_pipeline("prune_wanda(pattern=2:4,recalibrate_bn=true)")
    assert (p.n, p.m, p.recalibrate_bn) == (2, 4, True)


def test_batchnorm_reestimation_changes_only_running_statistics_to_the_batch_averages():
    torch.manual_seed(3)
    gm = sntfx.trace(Mixed(), _batches()[0])
    with torch.no_grad():
        gm.bn.running_mean.fill_(5.0)
        gm.bn.running_var.fill_(9.0)
    gm.eval()
    params = {k: v.clone() for k, v in gm.named_parameters()}
    batches = _batches(4, seed=7)
    seen = []
    hook = gm.bn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    assert reestimate_batchnorm(gm, batches) == 1
    hook.remove()
    assert not gm.training and not gm.bn.training  # modes restored
    assert all(torch.equal(v, params[k]) for k, v in gm.named_parameters())
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen])
    variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in seen])
    assert torch.allclose(gm.bn.running_mean, means.mean(0), atol=1e-6)
    assert torch.allclose(gm.bn.running_var, variances.mean(0), rtol=1e-5)
    assert gm.bn.momentum == 0.1 and int(gm.bn.num_batches_tracked) == len(batches)


@pytest.mark.parametrize("make", [lambda: MagnitudePrune(0.8, recalibrate_bn=True),
                                  lambda: NMPrune(2, 4, recalibrate_bn=True),
                                  lambda: WandaPrune(0.8, recalibrate_bn=True),
                                  lambda: StructuredPrune(0.5, recalibrate_bn=True)],
                         ids=["prune", "prune_nm", "prune_wanda", "prune_channels"])
def test_every_pruning_pass_can_reestimate_batchnorm(make):
    torch.manual_seed(4)
    x = torch.randn(2, 3, 16, 16)
    gm = sntfx.trace("sntfx:resnet20", x)
    stale = {k: v.clone() for k, v in gm.state_dict().items() if k.endswith("running_mean")}
    batches = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    report = PassManager([make()]).run(gm, PassContext(example_inputs=(x,), calibration=batches))
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    assert norms > 10 and report.passes[0].stats["batchnorms re-estimated"] == norms
    fresh = report.graph_module.state_dict()
    assert all(not torch.equal(fresh[k], v) for k, v in stale.items())
    with pytest.raises(PassPreconditionError, match="calibration"):
        PassManager([make()]).run(gm, PassContext(example_inputs=(x,)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from sntfx.data import load_data
    from sntfx.train import TrainConfig, Trainer
    from sntfx.workflow import model_for_data

    torch.manual_seed(0)
    data = load_data("digits")
    gm = model_for_data("sntfx:smallvgg", data.info)
    Trainer(TrainConfig(epochs=6, batch_size=64, lr=3e-3)).fit(gm, data, tmp_path_factory.mktemp("w") / "m.pt")
    return gm.eval(), data


def test_reestimation_recovers_accuracy_after_heavy_pruning_on_real_data(trained):
    """Pruning shifts each BatchNorm's input statistics; re-estimating them recovers accuracy (digits, smallvgg)."""
    gm, data = trained
    dense = accuracy(gm, data)
    raw = accuracy(apply_pass(gm, MagnitudePrune(0.8)).graph_module, data)
    recal = accuracy(apply_pass(gm, MagnitudePrune(0.8, recalibrate_bn=True), data).graph_module, data)
    assert dense > 0.9 and raw < dense - 0.05
    assert recal > raw + 0.05


def test_cli_prunes_with_wanda_and_nm(tmp_path, trained):
    from sntfx.cli import cli

    gm, data = trained
    sntfx.save(gm, tmp_path / "m.pt")
    out = tmp_path / "w.pt"
    res = CliRunner().invoke(cli, ["prune", str(tmp_path / "m.pt"), "--method", "wanda", "--sparsity", "0.5",
                                   "--recalibrate-bn", "--data", "digits", "-o", str(out)])
    assert res.exit_code == 0, res.output
    pruned = sntfx.load(out)
    for _, layer in prunable_layers(pruned):
        rows = layer.weight.reshape(layer.weight.shape[0], -1)
        assert ((rows == 0).sum(1) == round(0.5 * rows.shape[1])).all()
    res = CliRunner().invoke(cli, ["prune", str(tmp_path / "m.pt"), "--method", "wanda", "--nm", "2:4", "--data",
                                   "digits", "-o", str(tmp_path / "nm.pt")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["prune", str(tmp_path / "m.pt"), "--method", "wanda", "--sparsity", "0.5",
                                   "-o", str(tmp_path / "x.pt")])
    assert res.exit_code == 2 and "--data" in res.output and not (tmp_path / "x.pt").exists()
