"""Ignored layers (--exclude GLOB) on every compression pass and command; option spellings; piped output."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import sntfx
from sntfx.cli import cli
from sntfx.pass_base import PassContext
from sntfx.passes import MagnitudePrune, NMPrune, SimulatedQuantize, StructuredPrune, WandaPrune

X = torch.zeros(2, 1, 8, 8)


def _model():
    torch.manual_seed(0)
    return sntfx.trace("sntfx:cnn", X).eval()


def _calib():
    torch.manual_seed(1)
    return [torch.randn(16, 1, 8, 8) for _ in range(2)]


def _layers(gm):
    return {n: m.weight.detach().clone() for n, m in gm.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


@pytest.mark.parametrize("make", [
    lambda ex: MagnitudePrune(0.7, exclude=ex), lambda ex: WandaPrune(0.7, exclude=ex),
    lambda ex: NMPrune(1, 2, exclude=ex), lambda ex: SimulatedQuantize(wbits=3, exclude=ex),
    lambda ex: SimulatedQuantize(wbits=4, abits=8, exclude=ex)])
def test_excluded_layers_are_left_alone_and_reported(make):
    gm = _model()
    before = _layers(gm)
    first = next(iter(before))
    ctx = PassContext(example_inputs=(X,), calibration=_calib())
    report = sntfx.PassManager([make([first])]).run(gm, ctx, inplace=False)
    after = _layers(report.graph_module)
    res = report.passes[0]
    if res.stats.get("batchnorms folded"):  # W/A quantization folds BatchNorms first (exact): not on a grid
        assert first not in report.graph_module.meta["sntfx"]["quantized_weights"]
        assert len(set(after[first].abs().flatten().tolist())) > 16
    else:
        assert torch.equal(after[first], before[first])  # untouched, bit for bit
        assert any(not torch.equal(after[n], before[n]) for n in before if n != first)  # the others changed
    assert res.stats["excluded layers"] == 1 and res.info["excluded"] == [first]


def test_a_new_compression_pass_gets_the_shared_layer_selection_from_the_mixin():
    """A pass written as LayerSelection's docstring says selects, counts and records like the built-in ones."""
    from collections import Counter

    from sntfx.compress_utils import LayerSelection
    from sntfx.pass_base import Pass, PassResult

    class Halve(LayerSelection, Pass):
        name = "halve_for_test"  # not registered: PassManager takes instances

        def __init__(self, exclude_first=False, exclude_last=False, exclude=None):
            self._select_options(exclude_first, exclude_last, exclude)

        def params(self):
            return {**self.selection_params()}

        def run(self, gm, ctx):
            stats = Counter()
            layers, excluded = self.selected_layers(gm, stats)
            with torch.no_grad():
                for _, m in layers:
                    m.weight.mul_(0.5)
            stats["halved"] = len(layers)
            return PassResult(gm, bool(layers), stats, {"excluded": excluded})

    gm = _model()
    before = _layers(gm)
    names = list(before)
    assert len(names) >= 3
    p = Halve(exclude_last=True, exclude=[names[1]])
    assert p.params() == {"exclude_first": False, "exclude_last": True, "exclude": [names[1]]}
    report = sntfx.PassManager([p]).run(gm, PassContext(example_inputs=(X,)), inplace=False)
    after = _layers(report.graph_module)
    halved = [n for n in names if torch.allclose(after[n], before[n] * 0.5) and not torch.equal(after[n], before[n])]
    assert halved == [n for n in names if n not in (names[1], names[-1])]
    assert report.passes[0].stats["excluded layers"] == 1 and report.passes[0].info["excluded"] == [names[1]]
    with pytest.raises(ValueError, match="glob"):
        Halve(exclude=[3])
    # the built-in passes record the same three options
    for built_in in (MagnitudePrune(0.5), WandaPrune(0.5), NMPrune(2, 4), SimulatedQuantize(wbits=4)):
        assert {"exclude_first", "exclude_last", "exclude"} <= set(built_in.params())


def test_structured_pruning_keeps_the_channels_of_excluded_layers():
    gm = _model()
    first = next(iter(_layers(gm)))
    ctx = PassContext(example_inputs=(X,))
    out = sntfx.PassManager([StructuredPrune(0.5, exclude=[first])]).run(gm, ctx, inplace=False).graph_module
    kept = out.get_submodule(first).weight.shape[0]
    assert kept == gm.get_submodule(first).weight.shape[0]
    assert sum(p.numel() for p in out.parameters()) < sum(p.numel() for p in gm.parameters())


def test_a_glob_matches_module_names_and_a_pattern_matching_nothing_is_an_error():
    gm = _model()
    names = list(_layers(gm))
    ctx = PassContext(calibration=_calib())
    res = sntfx.PassManager([MagnitudePrune(0.5, exclude=["*"])]).run(gm, ctx, inplace=False).passes[0]
    assert res.info["excluded"] == names
    with pytest.raises(sntfx.SntfxError, match="matches none of the model's conv/linear layers"):
        sntfx.PassManager([MagnitudePrune(0.5, exclude=["no_such_layer*"])]).run(gm, ctx, inplace=False)
    with pytest.raises(ValueError, match="glob patterns"):
        MagnitudePrune(0.5, exclude=[""])


def _saved(tmp_path):
    gm = _model()
    sntfx.save(gm, tmp_path / "f.pt", source=sntfx.ModelSpec.parse("sntfx:cnn"))
    return next(iter(_layers(gm))), tmp_path / "f.pt"


def test_cli_prune_and_quantize_take_exclude(tmp_path):
    first, model = _saved(tmp_path)
    runner = CliRunner()
    res = runner.invoke(cli, ["prune", str(model), "--sparsity", "0.8", "--exclude", first, "-o", str(tmp_path / "p.pt")])
    assert res.exit_code == 0, res.output
    pruned = sntfx.load(tmp_path / "p.pt")
    assert not bool((pruned.get_submodule(first).weight == 0).any())
    res = runner.invoke(cli, ["quantize", str(model), "--wbits", "3", "--exclude", first, "-o", str(tmp_path / "q.pt")])
    assert res.exit_code == 0, res.output
    assert first not in sntfx.load(tmp_path / "q.pt").meta["sntfx"]["quantized_weights"]
    res = runner.invoke(cli, ["prune", str(model), "--sparsity", "0.5", "--exclude", "nothing.here",
                              "-o", str(tmp_path / "x.pt")])
    assert res.exit_code == 2 and "matches none" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x.pt").exists()


def test_old_option_spellings_still_work_and_cannot_be_mixed(tmp_path):
    _, model = _saved(tmp_path)
    runner = CliRunner()
    res = runner.invoke(cli, ["quantize", str(model), "--wbits", "4", "--method", "mse", "-o", str(tmp_path / "a.pt")])
    assert res.exit_code == 0, res.output
    assert sntfx.load(tmp_path / "a.pt").meta["sntfx"]["pipeline"][-1]["params"]["method"] == "mse"
    res = runner.invoke(cli, ["quantize", str(model), "--clip", "rtn", "--method", "mse", "-o", str(tmp_path / "b.pt")])
    assert res.exit_code == 2 and "old spelling of --clip" in res.output
    res = runner.invoke(cli, ["export", str(model), "--onnx", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m.onnx").exists()
    res = runner.invoke(cli, ["export", str(model), "-o", str(tmp_path / "n.onnx")])
    assert res.exit_code == 0 and (tmp_path / "n.onnx").exists()
    for command in (["export", "--help"], ["quantize", "--help"]):
        text = runner.invoke(cli, command).output
        assert "--onnx" not in text and "--act-method" not in text  # hidden aliases


def test_tables_are_not_cut_to_80_columns_when_piped():
    """Piped (a file, a CI log), the console is 200 columns wide instead of rich's 80; COLUMNS still wins."""
    import os
    import subprocess
    import sys

    code = "from sntfx.cli.app import console, err_console; print(console.width, err_console.width)"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    piped = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert piped.stdout.split() == ["200", "200"]
    chosen = subprocess.run([sys.executable, "-c", code], env={**env, "COLUMNS": "90"}, capture_output=True,
                            text=True, check=True)
    assert chosen.stdout.split() == ["90", "90"]


def test_study_config_takes_exclude():
    from sntfx.study import StudyConfig

    assert StudyConfig(exclude=["features.0"]).exclude == ["features.0"]
    with pytest.raises(sntfx.SntfxError, match="exclude"):
        StudyConfig(exclude="features.0")


def test_sweep_measures_on_the_given_device_and_gives_the_model_back(monkeypatch):
    """The study's evaluation stages compute on the training device; the model returns to where it was."""
    import sntfx.compress as compress
    from sntfx.data import load_data

    data = load_data("digits")
    gm = sntfx.trace("sntfx:cnn", X).eval()
    seen = []
    real = compress.evaluate

    def spy(model, loader, device, **kw):
        seen.append((device, next(model.parameters()).device, loader.pin_memory))
        return real(model, loader, device, **kw)

    monkeypatch.setattr(compress, "evaluate", spy)
    # "cpu:0" is a device distinct from the default "cpu": the spy sees which one the sweep used
    result = compress.sweep(gm, data, sparsities=(0.5,), bits=(8,), act_bits=((8, 8),), limit=1, device="cpu:0")
    assert len(seen) == 4 and all(d == torch.device("cpu:0") and p.type == "cpu" and not pin for d, p, pin in seen)
    assert result["float"] > 0 and next(gm.parameters()).device == torch.device("cpu")


def test_the_study_evaluates_on_its_training_device(tmp_path):
    from sntfx.study import Study, StudyConfig

    study = Study(StudyConfig(device="cpu:0", num_workers=1, onnx=False), tmp_path / "s")
    assert study.eval_device == torch.device("cpu:0")
    assert study.train_config(study.runs()[0]).num_workers == 1
    with pytest.raises(sntfx.SntfxError, match="num_workers"):
        StudyConfig(num_workers=-1)


def test_reporting_commands_write_versioned_json(tmp_path):
    """--json FILE: one document per command, valid against the shipped schema, written only on success."""
    import jsonschema

    from sntfx.cli.report import SCHEMA

    schema = json.loads((__import__("pathlib").Path(sntfx.__file__).parent / "schemas" /
                         "command-report.schema.json").read_text())
    runner = CliRunner()
    snt = tmp_path / "snt.pt"
    calls = {
        "transform": ["transform", "sntfx:cnn", "--data", "digits", "--style", "linear", "-o", str(snt)],
        "fold": ["fold", str(snt), "-o", str(tmp_path / "f.pt")],
        "inspect": ["inspect", str(tmp_path / "f.pt")],
        "prune": ["prune", str(tmp_path / "f.pt"), "--sparsity", "0.5", "-o", str(tmp_path / "p.pt")],
        "quantize": ["quantize", str(tmp_path / "f.pt"), "--wbits", "8", "--abits", "8", "--data", "digits",
                     "-o", str(tmp_path / "q.pt")],
        "export": ["export", str(tmp_path / "q.pt"), "-o", str(tmp_path / "q.onnx"), "--data", "digits"],
        "bench": ["bench", str(tmp_path / "q.onnx"), "--provider", "cpu", "--batch-sizes", "1", "--iters", "2",
                  "--warmup", "1"],
    }
    for name, argv in calls.items():
        out = tmp_path / f"{name}.json"
        res = runner.invoke(cli, argv + ["--json", str(out)])
        assert res.exit_code == 0, (name, res.output)
        doc = json.loads(out.read_text())
        jsonschema.validate(doc, schema)
        assert doc["schema"] == SCHEMA and doc["command"] == name and doc["result"], name
    assert json.loads((tmp_path / "prune.json").read_text())["result"]["sparsity"] > 0.4
    assert json.loads((tmp_path / "export.json").read_text())["result"]["float"]["integer_ops"]
    res = runner.invoke(cli, ["prune", str(tmp_path / "f.pt"), "--sparsity", "0.5", "--exclude", "nothing",
                              "-o", str(tmp_path / "x.pt"), "--json", str(tmp_path / "x.json")])
    assert res.exit_code == 2 and not (tmp_path / "x.json").exists()


def test_export_int8_checks_exclude_before_writing_anything(tmp_path):
    _, model = _saved(tmp_path)
    res = CliRunner().invoke(cli, ["export", str(model), "-o", str(tmp_path / "m.onnx"), "--data", "digits", "--int8",
                                   "--exclude", "no_such_layer"])
    assert res.exit_code == 2 and "matches none" in res.output
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.int8.onnx").exists()


class _Decoder(torch.nn.Module):
    """Two Conv2ds, a Conv3d, a ConvTranspose2d and a Conv2d subclass with its own forward (traced through: a
    functional conv2d): the convs are layers the passes handle; the others are left as they are and counted,
    each once."""

    class _Scaled(torch.nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    def __init__(self):
        super().__init__()
        self.lift = torch.nn.Conv2d(1, 4, 1)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)  # 4 input channels: N:M 2:4 prunes it too
        self.up = torch.nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.vol = torch.nn.Conv3d(4, 4, 1)  # 4 input channels: N:M 2:4 prunes it too
        self.scaled = self._Scaled(4, 4, 1)

    def forward(self, x):
        y = self.scaled(self.up(torch.relu(self.conv(self.lift(x)))))
        return y.sum(1, keepdim=True) + self.vol(y.unsqueeze(2)).sum((1, 2)).unsqueeze(1)


@pytest.mark.parametrize("make", [lambda: MagnitudePrune(0.5), lambda: WandaPrune(0.5), lambda: NMPrune(2, 4),
                                  lambda: SimulatedQuantize(wbits=3)])
def test_layers_a_compression_pass_does_not_handle_are_left_as_they_are_and_counted(make):
    gm = sntfx.trace(_Decoder(), X).eval()
    others = {n: gm.get_submodule(n).weight.detach().clone() for n in ("up", "scaled")}
    report = sntfx.PassManager([make()]).run(gm, PassContext(example_inputs=(X,), calibration=_calib()),
                                             inplace=False)
    stats = report.passes[0].stats
    assert {k: v for k, v in stats.items() if k.startswith("left as is")} == {
        "left as is: ConvTranspose2d (not supported)": 1, "left as is: functional conv2d (not supported)": 1}
    for name, weight in others.items():
        assert torch.equal(report.graph_module.get_submodule(name).weight, weight)
    for name in ("conv", "vol"):  # the layers it handles did change
        assert not torch.equal(report.graph_module.get_submodule(name).weight, gm.get_submodule(name).weight), name


def test_the_snt_pass_counts_the_layers_it_has_no_form_for_and_functional_ones_once():
    gm = sntfx.trace(_Decoder(), X).eval()
    report = sntfx.PassManager("snt(style=linear)").run(gm, PassContext(example_inputs=(X,)), inplace=False)
    stats = report.passes[0].stats
    assert stats["skip: ConvTranspose2d (no SNT form)"] == 1 and not any("Conv3d" in k for k in stats)
    assert stats["skip: functional conv"] == 1 and "skip: functional conv2d (no SNT form)" not in stats
    assert all(isinstance(report.graph_module.get_submodule(n), sntfx.blocks.SNTBlock) for n in ("conv", "vol"))


class _FunctionalHead(torch.nn.Module):
    """A transposed conv and a bilinear layer called as functions, beside a Conv2d module."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.up = torch.nn.Parameter(torch.randn(4, 2, 2, 2))
        self.pair = torch.nn.Parameter(torch.randn(3, 2, 2))

    def forward(self, x):
        y = torch.nn.functional.conv_transpose2d(self.conv(x), self.up, stride=2).mean((2, 3))
        return torch.nn.functional.bilinear(y, y, self.pair)


def test_the_snt_pass_counts_functional_transposed_convs_and_bilinear_layers_as_the_compression_passes_do():
    gm = sntfx.trace(_FunctionalHead(), X).eval()
    stats = sntfx.PassManager("snt(style=linear)").run(gm, PassContext(example_inputs=(X,)), inplace=False
                                                       ).passes[0].stats
    assert stats["skip: functional conv"] == 1 and stats["skip: functional linear"] == 1
    assert stats["expanded: linear"] == 1
    pruned = sntfx.PassManager([MagnitudePrune(0.5)]).run(gm, PassContext(example_inputs=(X,)), inplace=False)
    assert {k for k in pruned.passes[0].stats if k.startswith("left as is")} == {
        "left as is: functional conv_transpose2d (not supported)", "left as is: functional bilinear (not supported)"}
