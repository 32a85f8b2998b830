"""A saved model and a dataset that do not fit each other, and models of several inputs, on every command.

Every command that measures, calibrates or exports a saved model on a
dataset checks first that the model takes the dataset's images (one input,
their shape) and predicts its classes: a mismatch is a clear refusal (exit 2,
no output), not an error from deep inside the measurement. A model of several
inputs exports and benchmarks from the input shapes it was saved with.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

import sntfx
from sntfx.cli import cli

TWO_INPUTS_PY = '''
import torch
from torch import nn

class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x, y):
        return self.fc(torch.relu(self.a(x) + self.b(y)).mean((2, 3)))

def build_model():
    return Two()

def example_inputs():
    return torch.randn(1, 1, 8, 8), torch.randn(1, 2, 8, 8)
'''


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("fit")
    runner = CliRunner()
    (d / "two.py").write_text(TWO_INPUTS_PY)
    for args in (["transform", str(d / "two.py"), "--style", "linear", "--out", str(d / "two.snt.pt")],
                 ["fold", str(d / "two.snt.pt"), "--out", str(d / "two.pt")]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, result.output
    x = torch.zeros(2, 3, 8, 8)  # three channels: digits images have one
    rgb = sntfx.ModelSpec.parse("sntfx:cnn", kwargs={"in_channels": 3, "num_classes": 10})
    sntfx.save(sntfx.trace(rgb, x), d / "rgb.pt")
    four = sntfx.ModelSpec.parse("sntfx:cnn", kwargs={"num_classes": 4})
    sntfx.save(sntfx.trace(four, torch.zeros(2, 1, 8, 8)), d / "four.pt")
    return d


COMMANDS = {
    "prune-wanda": ["prune", "{m}", "--method", "wanda", "--sparsity", "0.5", "--data", "digits", "--out", "{o}.pt"],
    "prune": ["prune", "{m}", "--sparsity", "0.5", "--data", "digits", "--out", "{o}.pt"],
    "quantize": ["quantize", "{m}", "--wbits", "8", "--abits", "8", "--data", "digits", "--out", "{o}.pt"],
    "sweep": ["sweep", "{m}", "--data", "digits", "--sparsities", "0.5", "--out", "{o}.json"],
    "sharpness": ["sharpness", "{m}", "--data", "digits", "--iters", "2", "--out", "{o}.json"],
    "export": ["export", "{m}", "--data", "digits", "--out", "{o}.onnx"],
    "export-int8": ["export", "{m}", "--data", "digits", "--int8", "--out", "{o}.onnx"],
}


@pytest.mark.parametrize("model, match", [
    ("two.pt", r"takes 2 inputs \(x, y\), but a dataset gives one image batch"),
    ("rgb.pt", r"does not accept digits images of shape \(1, 8, 8\).*saved for inputs of shape 3x8x8"),
    ("four.pt", r"outputs \(2, 4\) for a batch of 2, but digits has 10 classes"),
])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_saved_model_that_does_not_fit_the_data_is_refused_before_anything_runs(saved, tmp_path, command, model,
                                                                                  match):
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in saved.iterdir() if p.is_file()}
    args = [a.format(m=saved / model, o=tmp_path / "out") for a in COMMANDS[command]]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert re.search(match, " ".join(result.output.split())), result.output
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in saved.iterdir() if p.is_file()}


def test_a_model_of_two_inputs_exports_verified_on_both_and_benchmarks(saved, tmp_path):
    runner = CliRunner()
    out = tmp_path / "two.onnx"
    result = runner.invoke(cli, ["export", str(saved / "two.pt"), "--dynamic-batch", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "verified on 256 random inputs" in result.output
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape[1:]) for i in sess.get_inputs()] == [("x", [1, 8, 8]), ("y", [2, 8, 8])]
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 1, 8, 8, generator=gen), torch.randn(5, 2, 8, 8, generator=gen)
    with torch.no_grad():
        ref = sntfx.load(saved / "two.pt").eval()(x, y).numpy()
    got = sess.run(None, {"x": x.numpy(), "y": y.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)  # both inputs reach the exported graph
    bench = runner.invoke(cli, ["bench", str(out), "--batch-sizes", "1,4", "--iters", "3", "--warmup", "1",
                                "--out", str(tmp_path / "bench.json")])
    assert bench.exit_code == 0, bench.output
    latency = json.loads((tmp_path / "bench.json").read_text())[0]["latency"]
    assert set(latency) == {"1", "4"} and all(v["p50_ms"] > 0 for v in latency.values())
    refused = runner.invoke(cli, ["bench", str(out), "--data", "digits"])
    assert refused.exit_code == 2 and "takes 2 inputs (x, y)" in refused.output and "b1 p50" not in refused.output
    shape = runner.invoke(cli, ["export", str(saved / "two.pt"), "--input-shape", "1,1,8,8",
                                "--out", str(tmp_path / "one.onnx")])
    assert shape.exit_code == 2 and "--input-shape gives one input, but" in shape.output
    assert not (tmp_path / "one.onnx").exists()


def test_bench_refuses_an_onnx_model_of_other_images_before_measuring(saved, tmp_path):
    from sntfx.exporters import export_onnx

    export_onnx(sntfx.load(saved / "rgb.pt"), tmp_path / "rgb.onnx", torch.zeros(1, 3, 8, 8))
    result = CliRunner().invoke(cli, ["bench", str(tmp_path / "rgb.onnx"), "--data", "digits",
                                      "--out", str(tmp_path / "b.json")])
    assert result.exit_code == 2, result.output
    assert "does not take this dataset's images" in result.output and "[1, 8, 8]" in result.output
    assert not (tmp_path / "b.json").exists()


def test_export_of_a_model_spec_with_data_builds_it_for_the_data(tmp_path):
    """`sntfx export MODEL.py --data digits` builds the model for digits (1 channel, 10 classes) as `transform`
    does, instead of tracing it for its own example inputs and failing on the images."""
    (tmp_path / "m.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def build_model(in_channels=3, num_classes=5):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))\n"
        "def example_inputs():\n    return torch.randn(1, 3, 16, 16)\n")
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "m.py"), "--data", "digits",
                                      "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1:] == [1, 8, 8] and sess.get_outputs()[0].shape[1:] == [10]
