"""ONNX export and ONNX Runtime: verification, dynamic batch, int8 QDQ, errors, provider fallback."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from click.testing import CliRunner

import sntfx
from sntfx.cli import cli
from sntfx.data import load_data
from sntfx.exporters import ExportError, bench_onnx, export_onnx, onnx_accuracy
from sntfx.graph_utils import randomize_
from sntfx.train import TrainConfig, Trainer


def _folded(model, x, style):
    gm = sntfx.trace(model.eval(), x)
    snt = sntfx.transform(gm, x, style=style, ratio=2)
    randomize_(snt, 1)
    return sntfx.fold(snt, x, inplace=True).eval()


@pytest.mark.parametrize("name,style", [("resnet18", "branch"), ("mobilenet_v3_small", "qa-branch"),
                                        ("efficientnet_b0", "linear"), ("squeezenet1_1", "branch")])
def test_export_and_verify_folded_torchvision_models(tmp_path, name, style):
    x = torch.randn(1, 3, 64, 64)
    folded = _folded(torchvision.models.get_model(name, weights=None), x, style)
    report = export_onnx(folded, tmp_path / "m.onnx", x, dynamic_batch=True, verify_inputs=torch.randn(4, 3, 64, 64))
    assert report.exporter == "torch.export (dynamo)"
    assert report.verification["ok"] and report.verification["rel"] <= 1e-4
    assert report.verification["top1_agreement"] == 1.0


def test_dynamic_batch(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    folded = _folded(sntfx.build_model("sntfx:resnet20"), x, "linear")
    export_onnx(folded, tmp_path / "d.onnx", x, dynamic_batch=True)
    sess = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    for b in (1, 7):
        xb = torch.randn(b, 3, 32, 32)
        out = sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})[0]
        with torch.no_grad():
            assert np.allclose(out, folded(xb).numpy(), rtol=1e-4, atol=1e-5)
    fixed = export_onnx(folded, tmp_path / "f.onnx", x)
    assert not fixed.dynamic_batch
    assert ort.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"]).get_inputs()[0].shape[0] == 1


def test_refuses_expanded_models(tmp_path):
    x = torch.randn(1, 1, 8, 8)
    snt = sntfx.transform("sntfx:cnn", x)
    with pytest.raises(ExportError, match="still holds SNT blocks.*--allow-expanded"):
        export_onnx(snt, tmp_path / "e.onnx", x)
    assert not (tmp_path / "e.onnx").exists()
    assert export_onnx(snt, tmp_path / "e.onnx", x, allow_expanded=True).verification["ok"]


class _Unsupported(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.svdvals(x)


class _Random(torch.nn.Module):
    def forward(self, x):
        return x + torch.rand_like(x)


def test_unsupported_op_gets_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match=r"both ONNX exporters failed.*svdvals"):
        export_onnx(_Unsupported(), tmp_path / "u.onnx", torch.randn(2, 3, 3))
    assert list(tmp_path.iterdir()) == []


def test_disagreeing_export_is_failed_and_not_written(tmp_path):
    with pytest.raises(ExportError, match="disagrees with torch.*nothing was written"):
        export_onnx(_Random(), tmp_path / "r.onnx", torch.randn(2, 4))
    assert list(tmp_path.iterdir()) == []


def test_simplify_keeps_the_model_verified_and_reports_honestly(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    folded = _folded(sntfx.build_model("sntfx:resnet20"), x, "branch")
    plain = export_onnx(folded, tmp_path / "p.onnx", x)
    report = export_onnx(folded, tmp_path / "s.onnx", x, simplify=True)
    assert report.verification["ok"]
    same = (tmp_path / "p.onnx").read_bytes() == (tmp_path / "s.onnx").read_bytes()
    assert report.simplified is not same  # "simplified" only when the file changed
    assert not plain.simplified


def test_simplify_folds_constants_of_a_redundant_graph(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sntfx.exporters.onnx_export import _simplify

    a = numpy_helper.from_array(np.ones((4,), np.float32), "a")
    b = numpy_helper.from_array(np.full((4,), 2.0, np.float32), "b")
    nodes = [helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Identity", ["c"], ["d"]),
             helper.make_node("Mul", ["x", "d"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [a, b])
    path = tmp_path / "r.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    assert _simplify(path)
    simplified = onnx.load(str(path))
    assert [n.op_type for n in simplified.graph.node] == ["Mul"]
    assert not _simplify(path)  # nothing left to do: reported as such, file untouched


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory):
    torch.manual_seed(0)
    data = load_data("digits")
    x = torch.zeros(2, 1, 8, 8)
    snt = sntfx.transform("sntfx:cnn", x, style="linear", ratio=2)
    Trainer(TrainConfig(epochs=8, batch_size=64, lr=3e-3)).fit(snt, data, tmp_path_factory.mktemp("t") / "m.pt")
    return sntfx.fold(snt, x).eval(), data


def _qdq_ops(path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_cli_quantize_w8a8_exports_qdq_and_ort_matches_the_simulated_accuracy(tmp_path, trained_digits):
    """What `sntfx quantize` measures is what `sntfx export` ships: QDQ nodes, integer kernels, same accuracy."""
    from sntfx.compress import accuracy
    from sntfx.exporters.qdq import integer_ops

    folded, data = trained_digits
    sntfx.save(folded, tmp_path / "f.pt", source=sntfx.ModelSpec.parse("sntfx:cnn"))
    runner = CliRunner()
    res = runner.invoke(cli, ["quantize", str(tmp_path / "f.pt"), "--wbits", "8", "--abits", "8", "--data", "digits",
                              "--out", str(tmp_path / "q.pt")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["export", str(tmp_path / "q.pt"), "--onnx", str(tmp_path / "q.onnx"), "--data", "digits",
                              "--dynamic-batch"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "QDQ" in text and "integer kernels" in text
    assert {"QuantizeLinear", "DequantizeLinear"} <= _qdq_ops(tmp_path / "q.onnx")
    import onnx

    from sntfx.exporters.qdq import resolve_weight_type

    weights = [t for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer if len(t.dims) >= 2]
    expected = onnx.TensorProto.INT8 if resolve_weight_type("auto") == "int8" else onnx.TensorProto.UINT8
    assert weights and all(t.data_type == expected for t in weights)  # the file holds 8-bit integer weights
    assert integer_ops(tmp_path / "q.onnx").get("QLinearConv", 0) >= 1
    simulated = sntfx.load(tmp_path / "q.pt")
    sim_acc, ort_acc = accuracy(simulated, data), onnx_accuracy(tmp_path / "q.onnx", data.test)
    assert sim_acc > 0.9
    assert abs(sim_acc - ort_acc) <= 0.005, (sim_acc, ort_acc)


@pytest.mark.parametrize("wbits,abits", [(4, 8), (6, 6), (4, 4)])
def test_low_bit_settings_deploy_the_simulated_grid(tmp_path, trained_digits, wbits, abits):
    """Below 8 bits the file still computes the simulated grid (a Clip), not ORT's wider uint8 range."""
    from sntfx.compress import accuracy, apply_pass
    from sntfx.passes import SimulatedQuantize

    folded, data = trained_digits
    q = apply_pass(folded, SimulatedQuantize(wbits=wbits, abits=abits), data).graph_module
    xs = torch.stack([data.test[i][0] for i in range(len(data.test))])
    report = export_onnx(q, tmp_path / "q.onnx", xs[:1], dynamic_batch=True, verify_inputs=(xs,))
    assert report.quantized and report.verification["top1_agreement"] >= 0.97
    ops = _qdq_ops(tmp_path / "q.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and ("Clip" in ops) == (abits < 8)
    assert abs(accuracy(q, data) - onnx_accuracy(tmp_path / "q.onnx", data.test)) <= 0.02


@pytest.mark.parametrize("weight_type", ["int8", "uint8"])
def test_weight_containers_hold_the_same_grid(tmp_path, trained_digits, weight_type):
    """int8 counts, or the same counts + 128 as uint8 with zero point 128: the same weights either way; grids of
    7 bits or less stay int8 (they cannot saturate ONNX Runtime's uint8 x int8 kernels)."""
    import onnx
    from onnx import numpy_helper

    from sntfx.compress import apply_pass
    from sntfx.exporters.qdq import _QDQWeightLayer, qdq_form
    from sntfx.passes import SimulatedQuantize

    folded, data = trained_digits
    xs = torch.stack([data.test[i][0] for i in range(256)])
    for wbits, container in ((8, weight_type), (7, "int8"), (6, "int8")):
        q = apply_pass(folded, SimulatedQuantize(wbits=wbits, abits=8), data).graph_module
        form = qdq_form(q, weight_type)
        layers_of_q = dict(q.named_modules())
        checked = 0
        for name, m in form.named_modules():
            if isinstance(m, _QDQWeightLayer):  # its counts, dequantized, are the simulated weights
                scale = m.scale.reshape(-1, *[1] * (m.weight_q.dim() - 1)) if m.per_channel else m.scale
                dequantized = (m.weight_q.to(torch.int64) - m.offset).float() * scale
                torch.testing.assert_close(dequantized, layers_of_q[name].weight.detach(), rtol=1e-6, atol=0)
                checked += 1
        assert checked == len(q.meta["sntfx"]["quantized_weights"])
        with torch.no_grad():
            same = torch.isclose(form(xs), q(xs), rtol=1e-5, atol=1e-5).all(dim=1)
        # the two forms round in a different order, so an activation lying on a rounding tie may land one step
        # apart in a rare image (1 of 256 in one training)
        assert same.float().mean() >= 0.98
        report = export_onnx(q, tmp_path / "q.onnx", xs[:1], dynamic_batch=True, verify_inputs=(xs,),
                             weight_type=weight_type)
        layers = len(q.meta["sntfx"]["quantized_weights"])
        assert report.qdq_weights == {container: layers}
        dtype = onnx.TensorProto.UINT8 if container == "uint8" else onnx.TensorProto.INT8
        weights = [t for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer if len(t.dims) >= 2]
        assert len(weights) == layers and all(t.data_type == dtype for t in weights)
        counts = numpy_helper.to_array(weights[0]).astype(np.int64) - (128 if container == "uint8" else 0)
        assert counts.min() >= -127 and counts.max() <= 127 and abs(counts).max() > 2 ** (wbits - 2)
    if weight_type == "uint8":  # exact on every CPU (uint8 x uint8 kernels do not saturate)
        assert report.verification["top1_agreement"] == 1.0 and report.verification["rel"] < 0.02


def test_auto_weight_type_follows_the_cpu(monkeypatch):
    from sntfx.exporters import qdq

    for saturates, expected in ((True, "uint8"), (False, "int8")):
        monkeypatch.setattr(qdq, "int8_kernels_may_saturate", lambda s=saturates: s)
        assert qdq.resolve_weight_type("auto") == expected
        assert qdq.resolve_weight_type("int8") == "int8" and qdq.resolve_weight_type("uint8") == "uint8"
    with pytest.raises(sntfx.SntfxError, match="weight type must be one of auto, int8, uint8"):
        qdq.resolve_weight_type("int4")


def test_a_quantized_model_changed_afterwards_is_not_exported(tmp_path, trained_digits):
    from sntfx.compress import apply_pass
    from sntfx.passes import SimulatedQuantize

    folded, data = trained_digits
    q = apply_pass(folded, SimulatedQuantize(wbits=4), data).graph_module
    torch.manual_seed(0)
    with torch.no_grad():  # e.g. fine-tuned after quantization
        w = next(m for m in q.modules() if isinstance(m, torch.nn.Conv2d)).weight
        w.add_(torch.randn_like(w) * w.abs().max() * 0.01)
    with pytest.raises(sntfx.SntfxError, match="no longer on their 4-bit grid"):
        export_onnx(q, tmp_path / "q.onnx", torch.zeros(1, 1, 8, 8))
    assert not (tmp_path / "q.onnx").exists()


def test_cli_export_int8_and_bench(tmp_path, trained_digits):
    folded, _ = trained_digits
    sntfx.save(folded, tmp_path / "f.pt", source=sntfx.ModelSpec.parse("sntfx:cnn"))
    runner = CliRunner()
    res = runner.invoke(cli, ["export", str(tmp_path / "f.pt"), "--onnx", str(tmp_path / "m.onnx"), "--data", "digits",
                              "--dynamic-batch", "--int8", "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m.onnx").exists() and (tmp_path / "m.int8.onnx").exists()
    res = runner.invoke(cli, ["bench", str(tmp_path / "m.onnx"), str(tmp_path / "m.int8.onnx"), "--provider", "cpu",
                              "--batch-sizes", "1,4", "--iters", "3", "--warmup", "1", "--data", "digits",
                              "--out", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    import json

    rows = json.loads((tmp_path / "b.json").read_text())
    assert [r["provider"] for r in rows] == ["CPUExecutionProvider"] * 2
    assert all(r["accuracy"] > 0.9 and set(r["latency"]) == {"1", "4"} for r in rows)


def test_cli_export_refusals(tmp_path):
    runner = CliRunner()
    snt = tmp_path / "snt.pt"
    assert runner.invoke(cli, ["transform", "sntfx:cnn", "--out", str(snt)]).exit_code == 0
    res = runner.invoke(cli, ["export", str(snt), "--onnx", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "--allow-expanded" in res.output and not (tmp_path / "x.onnx").exists()
    res = runner.invoke(cli, ["export", str(snt), "--onnx", str(tmp_path / "x.onnx"), "--int8"])
    assert res.exit_code == 2 and "--int8 needs --data" in res.output


def test_asking_for_cuda_on_a_cpu_machine_warns_and_reports_cpu(tmp_path, caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    x = torch.randn(1, 3, 32, 32)
    export_onnx(_folded(sntfx.build_model("sntfx:resnet20"), x, "branch"), tmp_path / "m.onnx", x)
    with caplog.at_level(logging.WARNING):
        result = bench_onnx(tmp_path / "m.onnx", provider="cuda", batch_sizes=(1,), iters=2, warmup=1)
    assert result.provider == "CPUExecutionProvider" and result.fallback
    assert any("CPU" in w for w in result.warnings)
    assert "runs the whole session on the CPU" in caplog.text
    assert result.node_providers.get("CPUExecutionProvider", 0) > 0


def test_auto_provider_means_the_hardware_present(monkeypatch):
    """auto: the CPU alone without a GPU (nothing tried that cannot run); CUDA, plus TensorRT only when installed."""
    from exporters import ort_bench

    monkeypatch.setattr(ort_bench, "gpu_present", lambda: False)
    assert ort_bench.resolve_providers("auto") == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort_bench, "gpu_present", lambda: True)
    monkeypatch.setattr(ort_bench, "_preload_gpu_libraries", lambda: None)
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort_bench, "tensorrt_present", lambda: False)
    assert ort_bench.resolve_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort_bench, "tensorrt_present", lambda: True)
    assert ort_bench.resolve_providers("auto")[0] == "TensorrtExecutionProvider"


def test_bench_with_auto_on_this_machine_is_quiet_and_not_a_fallback(tmp_path):
    """The default provider prints no ONNX Runtime provider errors and reports no fallback where none was asked."""
    import json
    import subprocess
    import sys

    x = torch.randn(1, 3, 32, 32)
    export_onnx(_folded(sntfx.build_model("sntfx:resnet20"), x, "branch"), tmp_path / "m.onnx", x)
    res = subprocess.run([sys.executable, "-m", "sntfx", "bench", str(tmp_path / "m.onnx"), "--iters", "2",
                          "--warmup", "1", "--batch-sizes", "1", "--out", str(tmp_path / "b.json")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (row,) = json.loads((tmp_path / "b.json").read_text())
    if not torch.cuda.is_available():
        assert row["provider"] == "CPUExecutionProvider" and not row["fallback"] and row["warnings"] == []
    noise = [line for line in res.stderr.splitlines() if "onnxruntime" in line.lower() or "EP Error" in line
             or "TensorRT" in line or "[E:" in line or "[W:" in line]
    assert noise == [], noise
