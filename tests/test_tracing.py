"""sntfx.trace: equality with the model, opaque-module retry, errors, shapes."""

from __future__ import annotations

import pytest
import torch
import torchvision

import sntfx
from sntfx.tracing import compare_outputs, sntfx_meta

from models_for_tests import ConvNet, DataDependent, UntraceableRoot, WithUntraceableChild


def test_trace_equals_model_and_records_shapes():
    model = ConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = sntfx.trace(model, x)
    assert isinstance(gm, torch.fx.GraphModule)
    assert compare_outputs(model(x), gm(x)) == 0.0
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_function", "placeholder"):
            assert "tensor_meta" in node.meta, node
    conv = next(n for n in gm.graph.nodes if n.target == "conv1")
    assert tuple(conv.meta["tensor_meta"].shape) == (2, 8, 8, 8)
    assert sntfx_meta(gm)["input_spec"] == [{"shape": [2, 3, 8, 8], "dtype": "float32"}]
    assert sntfx_meta(gm)["opaque_modules"] == []


def test_trace_keeps_training_mode_of_the_model():
    model = ConvNet().train()
    gm = sntfx.trace(model, torch.randn(2, 3, 8, 8))
    assert gm.training and model.training


def test_untraceable_submodule_is_kept_opaque_and_reported(caplog):
    model = WithUntraceableChild().eval()
    x = torch.randn(1, 3, 6, 6)
    with caplog.at_level("WARNING"):
        gm = sntfx.trace(model, x)
    assert sntfx_meta(gm)["opaque_modules"] == ["body"]
    assert "body" in caplog.text
    assert any(n.op == "call_module" and n.target == "body" for n in gm.graph.nodes)
    assert compare_outputs(model(x), gm(x)) == 0.0
    # Its conv is not reachable by passes, and the expand pass says so.
    _, report = sntfx.transform(gm, x, style="linear", report=True)
    assert report.passes[0].stats["skip: inside opaque module"] == 1
    assert report.passes[0].stats["expanded: linear"] == 2


def test_nested_failures_are_retried_until_traceable():
    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = WithUntraceableChild()
            self.b = DataDependent()

        def forward(self, x):
            return self.a(x), self.b(torch.zeros(1, 4, 3, 3) + x.mean())

    gm = sntfx.trace(Outer().eval(), torch.randn(1, 3, 5, 5))
    assert sorted(sntfx_meta(gm)["opaque_modules"]) == ["a.body", "b"]


def test_untraceable_root_names_the_reason():
    with pytest.raises(sntfx.TraceError) as info:
        sntfx.trace(UntraceableRoot(), torch.randn(1, 3, 4, 4))
    msg = str(info.value)
    assert "UntraceableRoot" in msg and "forward()" in msg
    assert info.value.module_path == ""
    assert "Traceback" not in msg


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(sntfx.TraceError, match=r"does not run on the example inputs of shape \(1, 5, 8, 8\)"):
        sntfx.trace(ConvNet(), torch.randn(1, 5, 8, 8))


def test_missing_inputs_is_a_clear_error():
    with pytest.raises(sntfx.TraceError, match="no example inputs"):
        sntfx.trace(ConvNet(), None)


def test_trace_from_spec_records_the_source():
    gm = sntfx.trace("sntfx:resnet20")
    assert sntfx_meta(gm)["source"]["kind"] == "sntfx"
    assert sntfx_meta(gm)["input_spec"][0]["shape"] == [1, 3, 32, 32]


def test_stochastic_depth_stays_a_module_so_it_still_trains():
    model = torchvision.models.efficientnet_b0(weights=None)
    gm = sntfx.trace(model, torch.randn(1, 3, 64, 64))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert any(t.endswith("stochastic_depth") for t in targets)
