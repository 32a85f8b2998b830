"""Compression passes: exact sparsity, N:M pattern, structured pruning (+ONNX), quantization bounds, sweeps."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn
from click.testing import CliRunner

import sntfx
from sntfx import PassContext, PassManager
from sntfx.cli import cli
from sntfx.compress import accuracy, apply_pass, sweep
from sntfx.data import load_data
from sntfx.exporters import export_onnx
from sntfx.passes import MagnitudePrune, NMPrune, SimulatedQuantize, StructuredPrune
from sntfx.passes.prune_nm import nm_groups
from sntfx.quant import fake_quant_weight, weight_scale
from sntfx.train import TrainConfig, Trainer


def _weights(gm):
    return [m.weight for n, m in gm.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.73, 0.9])
def test_magnitude_pruning_reaches_the_exact_sparsity(scope, sparsity):
    x = torch.randn(2, 3, 32, 32)
    gm = sntfx.trace("sntfx:resnet20", x)
    report = PassManager([MagnitudePrune(sparsity, scope=scope)]).run(gm, PassContext(example_inputs=(x,)))
    ws = _weights(report.graph_module)
    if scope == "global":
        total = sum(w.numel() for w in ws)
        assert sum(int((w == 0).sum()) for w in ws) == round(sparsity * total)
    else:
        for w in ws:
            assert int((w == 0).sum()) == round(sparsity * w.numel())
    assert report.passes[0].modified == (sparsity > 0)
    assert not any(hasattr(m, "weight_orig") or m._forward_pre_hooks for m in report.graph_module.modules())


def test_global_pruning_keeps_the_largest_weights():
    x = torch.randn(2, 3, 32, 32)
    gm = sntfx.trace("sntfx:resnet20", x)
    before = torch.cat([w.detach().abs().flatten() for w in _weights(gm)])
    gm = PassManager([MagnitudePrune(0.6)]).run(gm, PassContext()).graph_module
    after = torch.cat([w.detach().abs().flatten() for w in _weights(gm)])
    kept, dropped = before[after != 0], before[after == 0]
    assert kept.min() >= dropped.max()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_pattern_holds_in_every_group(n, m):
    x = torch.randn(2, 3, 32, 32)
    gm = sntfx.trace("sntfx:resnet20", x)
    report = PassManager([NMPrune(n, m)]).run(gm, PassContext())
    assert report.passes[0].stats["skip: in-channels not divisible by %d" % m] == 1  # the 3-channel stem
    for name, mod in report.graph_module.named_modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and mod.weight.shape[1] % m == 0:
            groups = nm_groups(mod.weight, m)
            assert ((groups != 0).sum(dim=1) <= n).all(), name
            assert (groups != 0).sum() == groups.shape[0] * n  # random weights: exactly n survive


@pytest.mark.parametrize("text,match", [("prune(sparsity=1.0)", r"sparsity must be in \[0, 1\)"),
                                        ("prune(sparsity=-0.1)", "sparsity"),
                                        ("prune_nm(n=4,m=4)", "1 <= N < M"),
                                        ("quantize(wbits=1)", "weight bits must be an integer from 2 to 8"),
                                        ("quantize(wbits=9)", "from 2 to 8"),
                                        ("quantize(wbits=8,abits=2)", "activation bits")])
def test_invalid_settings(text, match):
    with pytest.raises(sntfx.PipelineError, match=match):
        sntfx.parse_pipeline(text)


def test_compression_refuses_an_expanded_model():
    x = torch.randn(2, 3, 32, 32)
    snt = sntfx.transform("sntfx:resnet20", x)
    with pytest.raises(sntfx.PipelineOrderError, match="'prune' requires folded.*insert one of \\[fold\\]"):
        PassManager([MagnitudePrune(0.5)]).run(snt, PassContext())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_quantize_dequantize_error_is_at_most_half_a_step(bits, per_channel):
    w = torch.randn(16, 8, 3, 3) * torch.rand(16, 1, 1, 1) * 3
    q = fake_quant_weight(w, bits, per_channel=per_channel)
    scale = weight_scale(w, bits, per_channel=per_channel)
    assert ((q - w).abs() <= scale / 2 + 1e-6).all()
    levels = torch.unique(torch.round(q / scale)) if not per_channel else torch.unique(torch.round(q[0] / scale[0]))
    assert len(levels) <= 2**bits - 1


def test_mse_clipping_never_worse_than_rtn():
    w = torch.randn(32, 64)
    w[0, 0] = 40.0  # an outlier
    for bits in (3, 4):
        e_rtn = (fake_quant_weight(w, bits, method="rtn") - w).square().sum(1)
        e_mse = (fake_quant_weight(w, bits, method="mse") - w).square().sum(1)
        assert (e_mse <= e_rtn + 1e-6).all()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    data = load_data("digits")
    gm = sntfx.trace("sntfx:cnn", torch.zeros(2, 1, 8, 8))
    Trainer(TrainConfig(epochs=10, batch_size=64, lr=3e-3)).fit(gm, data, tmp_path_factory.mktemp("c") / "m.pt")
    return gm.eval(), data


def test_w8a8_simulated_ptq_stays_within_one_point_on_real_data(trained):
    gm, data = trained
    float_acc = accuracy(gm, data)
    assert float_acc > 0.9
    report = apply_pass(gm, SimulatedQuantize(wbits=8, abits=8), data)
    q = report.graph_module
    assert report.passes[0].stats["activation quantizers"] == 4
    assert abs(accuracy(q, data) - float_acc) <= 0.01
    for layer in report.passes[0].info["layers"].values():
        assert layer["weight_rel_error"] < 0.02 and layer["input_rel_error"] < 0.05


def test_quantized_model_saves_and_loads(tmp_path, trained):
    gm, data = trained
    sntfx.save(gm, tmp_path / "f.pt", source=sntfx.ModelSpec.parse("sntfx:cnn"))
    q = apply_pass(sntfx.load(tmp_path / "f.pt"), SimulatedQuantize(wbits=4, abits=8), data).graph_module
    sntfx.save(q, tmp_path / "q.pt")
    loaded = sntfx.load(tmp_path / "q.pt")
    x = torch.stack([data.test[i][0] for i in range(32)])
    with torch.no_grad():
        assert torch.equal(q(x), loaded(x))


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("mobilenet_v2", 64), ("vit_b_16", 224)])
def test_structured_pruning_runs_exports_and_matches(tmp_path, name, size):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    x = torch.randn(1, 3, size, size)
    gm = sntfx.trace(model, x)
    original = {n: m.weight.shape[0] for n, m in gm.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    before = sum(p.numel() for p in gm.parameters())
    report = PassManager([StructuredPrune(0.3, round_to=8)]).run(gm, PassContext(example_inputs=(x,)))
    pruned = report.graph_module.eval()
    after = sum(p.numel() for p in pruned.parameters())
    assert after < 0.85 * before
    with torch.no_grad():
        assert pruned(x).shape == (1, 10)
    export = export_onnx(pruned, tmp_path / "p.onnx", x)
    assert export.verification["ok"]
    sntfx.save(pruned, tmp_path / "p.pt", source=sntfx.ModelSpec.parse(f"torchvision:{name}", kwargs={"num_classes": 10}))
    loaded = sntfx.load(tmp_path / "p.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    channels = report.passes[0].info["channels"]
    pruned_layers = {n: c for n, c in channels.items() if c < original[n]}
    assert pruned_layers, "no layer lost channels"
    assert all(c % 8 == 0 for c in pruned_layers.values()), pruned_layers  # round_to=8 on every pruned layer


def test_sweep_and_cli(tmp_path, trained):
    gm, data = trained
    result = sweep(gm, data, sparsities=(0.5, 0.9), bits=(8, 3), act_bits=((8, 8),))
    assert result["sparsity"]["0.5"] > result["sparsity"]["0.9"] - 0.05
    assert abs(result["bits"]["8"] - result["float"]) <= 0.01
    sntfx.save(gm, tmp_path / "a.pt", source=sntfx.ModelSpec.parse("sntfx:cnn"))
    (tmp_path / "other").mkdir()
    sntfx.save(gm, tmp_path / "other" / "a.pt", source=sntfx.ModelSpec.parse("sntfx:cnn"))
    runner = CliRunner()
    res = runner.invoke(cli, ["sweep", str(tmp_path / "a.pt"), str(tmp_path / "other" / "a.pt"), "--data", "digits",
                              "--sparsities", "0.5", "--bits", "8,4", "--act-bits", "8:8", "--out", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    payload = json.loads((tmp_path / "s.json").read_text())
    assert set(payload["results"]) == {f"{tmp_path.name}_a", "other_a"}  # same stem: told apart by folder
    assert payload["results"][f"{tmp_path.name}_a"] == payload["results"]["other_a"]
    assert set(payload["results"]["other_a"]) >= {"float", "sparsity", "bits", "act_bits"}
    assert all((tmp_path / p).exists() for p in payload["plots"])
    res = runner.invoke(cli, ["prune", str(tmp_path / "a.pt"), "--out", str(tmp_path / "p.pt"), "--sparsity", "0.7",
                              "--data", "digits", "--finetune-epochs", "1"])
    assert res.exit_code == 0, res.output
    w = [m.weight for m in sntfx.load(tmp_path / "p.pt").modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    total = sum(x.numel() for x in w)
    assert sum(int((x == 0).sum()) for x in w) >= round(0.7 * total)  # zeros held through fine-tuning
    res = runner.invoke(cli, ["prune", str(tmp_path / "a.pt"), "--out", str(tmp_path / "bad.pt"), "--sparsity", "1.2"])
    assert res.exit_code == 2 and "[0, 1)" in res.output and not (tmp_path / "bad.pt").exists()
    res = runner.invoke(cli, ["quantize", str(tmp_path / "a.pt"), "--out", str(tmp_path / "q.pt"), "--wbits", "9"])
    assert res.exit_code == 2 and "2 to 8" in res.output and not (tmp_path / "q.pt").exists()
    res = runner.invoke(cli, ["inspect", str(tmp_path / "a.pt"), "--quant", "4", "--data", "digits"])
    assert res.exit_code == 0 and "most sensitive to W4" in res.output


def test_sweep_mse_bits_measure_the_model_whose_ranges_minimise_rounding_error(tmp_path, trained):
    """An MSE-range setting is the quantize pass with method="mse": its accuracy is that model's, and per channel its
    rounding error is never above min-max's (the clipping grid includes no clipping); at 3 bits it clips some."""
    from sntfx.compress import check_sweep_settings
    from sntfx.errors import SntfxError

    gm, data = trained
    result = sweep(gm, data, sparsities=(), bits=(3,), act_bits=(), mse_bits=(3,))
    mse = apply_pass(gm, SimulatedQuantize(wbits=3, method="mse"), data).graph_module
    rtn = apply_pass(gm, SimulatedQuantize(wbits=3), data).graph_module
    assert result["bits_mse"] == {"3": accuracy(mse, data)} and result["bits"] == {"3": accuracy(rtn, data)}
    plain = dict(gm.named_modules())
    clipped = 0
    for name, layer in mse.named_modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            w = plain[name].weight.detach().flatten(1)
            err_mse = (layer.weight.detach().flatten(1) - w).square().sum(1)
            err_rtn = (dict(rtn.named_modules())[name].weight.detach().flatten(1) - w).square().sum(1)
            assert bool((err_mse <= err_rtn * (1 + 1e-5) + 1e-12).all()), name
            clipped += int((layer.weight.detach().flatten(1).abs().amax(1) < w.abs().amax(1) * (1 - 1e-4)).sum())
    assert clipped > 0  # some channel's range was clipped below its largest weight
    assert "bits_mse" not in sweep(gm, data, sparsities=(), bits=(8,), act_bits=(), limit=1)
    for bad, match in (([9], "MSE-range weight bits 9"), ([4, 4], "twice")):
        with pytest.raises(SntfxError, match=match):
            check_sweep_settings(mse_bits=bad)
    sntfx.save(gm, tmp_path / "a.pt", source=sntfx.ModelSpec.parse("sntfx:cnn"))
    res = CliRunner().invoke(cli, ["sweep", str(tmp_path / "a.pt"), "--data", "digits", "--sparsities", "",
                                   "--bits", "4", "--act-bits", "", "--mse-bits", "4", "--out", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    assert "W4 (MSE ranges)" in res.output
    assert set(json.loads((tmp_path / "s.json").read_text())["results"]["a"]["bits_mse"]) == {"4"}
    res = CliRunner().invoke(cli, ["sweep", str(tmp_path / "a.pt"), "--data", "digits", "--mse-bits", "x",
                                   "--out", str(tmp_path / "t.json")])
    assert res.exit_code == 2 and "--mse-bits" in res.output and not (tmp_path / "t.json").exists()


def test_cli_refuses_expanded_models(tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["transform", "sntfx:cnn", "--out", str(tmp_path / "snt.pt")]).exit_code == 0
    res = runner.invoke(cli, ["prune", str(tmp_path / "snt.pt"), "--out", str(tmp_path / "p.pt"), "--sparsity", "0.5"])
    assert res.exit_code == 2 and "fold it first" in res.output and not (tmp_path / "p.pt").exists()


def test_cli_options_that_used_to_be_ignored_now_work(tmp_path):
    """--scope reaches structured pruning, and export verifies --verify-samples inputs at a fixed batch size."""
    gm = sntfx.trace("sntfx:smallvgg", torch.zeros(1, 1, 28, 28))
    torch.manual_seed(0)
    with torch.no_grad():
        for i, m in enumerate(m for m in gm.modules() if isinstance(m, torch.nn.Conv2d)):
            m.weight.mul_(10.0 ** -i)  # later layers much smaller: a global ranking prunes them harder
    src = tmp_path / "m.pt"
    sntfx.save(gm, src)
    runner = CliRunner()
    channels = {}
    for scope in ("layer", "global"):
        out = tmp_path / f"{scope}.pt"
        res = runner.invoke(cli, ["prune", str(src), "--method", "structured", "--sparsity", "0.3", "--scope", scope,
                                  "--out", str(out)])
        assert res.exit_code == 0, res.output
        channels[scope] = [m.weight.shape[0] for m in sntfx.load(out).modules() if isinstance(m, torch.nn.Conv2d)]
    assert channels["layer"] != channels["global"]
    first = [m.weight.shape[0] for m in gm.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c < f for c, f in zip(channels["layer"], first))  # layer scope: every layer loses channels
    res = runner.invoke(cli, ["export", str(src), "--onnx", str(tmp_path / "m.onnx"), "--verify-samples", "37"])
    assert res.exit_code == 0, res.output
    assert "verified on 37 random" in res.output
