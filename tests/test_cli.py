"""The sntfx command line: transform / fold / inspect, and every bad input it must refuse."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import sntfx
from sntfx.cli import cli
from sntfx.tracing import compare_outputs

MODEL_PY = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

def build_model(classes=3):
    return Net(classes)

def example_inputs():
    return torch.randn(2, 3, 8, 8)
'''

NO_FACTORY_PY = "import torch\nx = 1\n"

UNTRACEABLE_PY = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.mean() > 0:
            return self.conv(x)
        return x

def get_model():
    return Net()
'''


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def files(tmp_path):
    (tmp_path / "model.py").write_text(MODEL_PY)
    (tmp_path / "nofactory.py").write_text(NO_FACTORY_PY)
    (tmp_path / "untraceable.py").write_text(UNTRACEABLE_PY)
    return tmp_path


def _ok(result):
    assert result.exit_code == 0, result.output
    return result.output


def test_transform_inspect_fold_roundtrip(runner, files):
    snt, folded = files / "snt.pt", files / "folded.pt"
    out = _ok(runner.invoke(cli, ["transform", str(files / "model.py"), "--out", str(snt), "--style", "branch"]))
    assert "expanded: branch: 2" in out and snt.exists()
    out = _ok(runner.invoke(cli, ["inspect", str(snt)]))
    assert "branch" in out and "conv2d 3x3" in out and "2 expanded" in out
    out = _ok(runner.invoke(cli, ["fold", str(snt), "--out", str(folded)]))
    assert "per-block relative error over 2 blocks" in out
    a, b = sntfx.load(snt), sntfx.load(folded)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert compare_outputs(a(x), b(x)) <= 1e-5
    out = _ok(runner.invoke(cli, ["inspect", str(folded)]))
    assert "0 expanded" in out


def test_transform_zoo_spec_with_policy_and_kwargs(runner, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text('style = "linear"\nratio = 2\nskip_last = true\n')
    out_file = tmp_path / "r20.pt"
    out = _ok(runner.invoke(cli, ["transform", "sntfx:resnet20", "--out", str(out_file), "--policy", str(policy),
                                  "--kwargs", '{"num_classes": 7}']))
    assert "skip: last layer: 1" in out
    # the policy's 21 other layers expand, but those the training-cost budget leaves plain (its cost model decides)
    expanded = int(re.search(r"expanded: linear: (\d+)", out).group(1))
    over = re.search(r"skip: over the training-cost budget: (\d+)", out)
    assert expanded >= 15 and expanded + (int(over.group(1)) if over else 0) == 21
    gm = sntfx.load(out_file)
    assert gm.get_submodule("fc").out_features == 7


def test_entry_and_input_shape(runner, files):
    out = files / "e.pt"
    (files / "named.py").write_text(MODEL_PY.replace("def build_model", "def make_net").replace("def example_inputs", "def _unused"))
    _ok(runner.invoke(cli, ["transform", str(files / "named.py"), "--entry", "make_net", "--input-shape", "1,3,5,5",
                            "--out", str(out)]))
    assert sntfx.read_recipe(out)["input_spec"][0]["shape"] == [1, 3, 5, 5]


def _refused(result, *needles, out=None):
    assert result.exit_code == 2, result.output
    text = result.output
    for n in needles:
        assert n in text, text
    assert "Traceback" not in text
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.*"))


def test_bad_inputs(runner, files):
    out = files / "out.pt"
    inv = lambda *a: runner.invoke(cli, list(a))  # noqa: E731
    _refused(inv("transform", str(files / "missing.py"), "--out", str(out)), "does not exist", out=out)
    _refused(inv("transform", str(files / "nofactory.py"), "--out", str(out), "--input-shape", "1,3,4,4"),
             "no model factory found", "--entry", out=out)
    _refused(inv("transform", str(files / "model.py"), "--out", str(out), "--input-shape", "1,5,8,8"),
             "does not run on the example inputs", "--input-shape", out=out)
    _refused(inv("transform", str(files / "model.py"), "--out", str(out), "--input-shape", "a,b"),
             "bad input shape", out=out)
    _refused(inv("transform", str(files / "untraceable.py"), "--out", str(out), "--input-shape", "1,3,4,4"),
             "cannot trace Net", out=out)
    res = inv("transform", str(files / "model.py"), "--out", str(out), "--style", "wide")
    assert res.exit_code == 2 and "wide" in res.output and not out.exists()
    _refused(inv("transform", str(files / "model.py"), "--out", str(files / "model.py")), "is the input file")
    assert (files / "model.py").read_text() == MODEL_PY
    _refused(inv("transform", "timm:no_such_net", "--out", str(out)), "timm has no model", out=out)
    _refused(inv("transform", "torchvision:no_such_net", "--out", str(out)), "torchvision has no model", out=out)
    _refused(inv("transform", str(files / "model.py"), "--out", str(files / "nodir" / "x.pt")), "does not exist")
    _refused(inv("transform", str(files / "model.py"), "--out", str(out), "--kwargs", "[1]"), "JSON object", out=out)
    (files / "badinputs.py").write_text(MODEL_PY.replace("return torch.randn(2, 3, 8, 8)", "raise ValueError('nope')"))
    _refused(inv("transform", str(files / "badinputs.py"), "--out", str(out)),
             "example_inputs() in", "failed: ValueError: nope", "--input-shape", out=out)
    assert _ok(inv("transform", str(files / "badinputs.py"), "--out", str(out), "--input-shape", "1,3,8,8"))


def test_fold_refuses_bad_files_and_overwriting_its_input(runner, files):
    snt = files / "snt.pt"
    _ok(runner.invoke(cli, ["transform", str(files / "model.py"), "--out", str(snt)]))
    before = snt.read_bytes()
    _refused(runner.invoke(cli, ["fold", str(snt), "--out", str(snt)]), "is the input file")
    assert snt.read_bytes() == before
    junk = files / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    out = files / "f.pt"
    _refused(runner.invoke(cli, ["fold", str(junk), "--out", str(out)]), "not an sntfx model file", out=out)
    _refused(runner.invoke(cli, ["fold", str(files / "none.pt"), "--out", str(out)]), "does not exist", out=out)


def test_transform_with_a_pipeline_string(runner, files):
    out = files / "p.pt"
    res = runner.invoke(cli, ["transform", str(files / "model.py"), "--out", str(out),
                              "--passes", "snt(style=qa-branch,preserve=true),fold,fold_bn"])
    assert res.exit_code == 0, res.output
    assert [p["name"] for p in sntfx.read_recipe(out)["pipeline"]] == ["snt", "fold", "fold_bn"]
    res = runner.invoke(cli, ["transform", str(files / "model.py"), "--out", str(out), "--passes", "fold_bn,nope"])
    assert res.exit_code == 2 and "unknown pass 'nope'" in res.output
    res = runner.invoke(cli, ["transform", str(files / "model.py"), "--out", str(out), "--passes", "snt", "--style", "branch"])
    assert res.exit_code == 2 and "--passes replaces" in res.output
    res = runner.invoke(cli, ["passes"])
    assert res.exit_code == 0 and "prune_channels" in res.output and "fold_bn" in res.output


def test_module_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "sntfx", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "transform" in res.stdout and "fold" in res.stdout and "inspect" in res.stdout
