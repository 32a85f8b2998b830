"""`sntfx inspect FILE --graph OUT.graphml` and sntfx.graph_export: the fx graph as networkx GraphML."""

from __future__ import annotations

import errno
import os
import stat

import networkx as nx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import sntfx
from sntfx.cli import cli
from sntfx.compress_utils import prunable_layers
from sntfx.errors import DiskFullError
from sntfx.graph_export import to_networkx, write_graphml
from sntfx.policy import Policy

MODEL_PY = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

def build_model():
    return Net()

def example_inputs():
    return torch.randn(2, 3, 8, 8)
'''


class Residual(nn.Module):
    """Skip connection, a functional call, a method call and a reused value: every op the export must keep."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        z = self.conv2(y) + y
        return self.fc(self.pool(z * z).flatten(1))


def _fx_edges(gm) -> set[tuple[str, str]]:
    return {(src.name, n.name) for n in gm.graph.nodes for src in n.all_input_nodes}


def _write_and_read(gm, path):
    write_graphml(gm, path)
    return nx.read_graphml(path)


def test_graphml_has_one_node_per_fx_node_and_the_data_flow(tmp_path):
    gm = sntfx.trace(Residual(), torch.randn(2, 3, 8, 8))
    g = _write_and_read(gm, tmp_path / "g.graphml")
    nodes = list(gm.graph.nodes)
    assert isinstance(g, nx.DiGraph) and list(g.nodes) == [n.name for n in nodes]
    assert {n: d["op"] for n, d in g.nodes(data=True)} == {n.name: n.op for n in nodes}
    assert [d["index"] for _, d in g.nodes(data=True)] == list(range(len(nodes)))
    assert set(g.edges) == _fx_edges(gm)
    assert nx.is_directed_acyclic_graph(g)
    # the skip connection: conv2's input also feeds the add; `z * z` reads one value twice (one edge)
    add = next(n for n in nodes if n.op == "call_function" and "add" in str(n.target))
    assert set(g.predecessors(add.name)) == {a.name for a in add.all_input_nodes} and g.in_degree(add.name) == 2
    assert g.nodes[add.name]["target"] == "operator.add"
    assert g.nodes["flatten"]["op"] == "call_method" and g.nodes["flatten"]["target"] == "flatten"
    # shapes and dtypes from the trace's shape propagation
    for n in nodes:
        if n.op != "output":
            assert g.nodes[n.name]["shape"] == ",".join(map(str, n.meta["tensor_meta"].shape))
            assert g.nodes[n.name]["dtype"] == "torch.float32"
    assert g.nodes["fc"]["shape"] == "2,5" and g.nodes["x"]["shape"] == "2,3,8,8"
    # modules, parameters, prunable layers
    assert g.nodes["conv1"]["module_type"] == "Conv2d" and g.nodes["pool"]["module_type"] == "AdaptiveAvgPool2d"
    assert g.nodes["conv2"]["params"] == 4 * 4 * 9 + 4 and g.nodes["pool"]["params"] == 0
    assert sum(d["params"] for _, d in g.nodes(data=True)) == sum(p.numel() for p in gm.parameters())
    assert {n for n, d in g.nodes(data=True) if d["prunable"]} == {name for name, _ in prunable_layers(gm)} \
        == {"conv1", "conv2", "fc"}
    assert g.nodes["fc"]["layer_kind"] == "linear" and g.nodes["conv1"]["layer_kind"] == "conv2d"
    assert "layer_kind" not in g.nodes["pool"] and "module_type" not in g.nodes["x"]
    assert not any(d["snt_block"] for _, d in g.nodes(data=True))
    assert g.graph["expanded"] is False and g.graph["sntfx_version"] == sntfx.__version__


@pytest.mark.parametrize("style, ratio", [("linear", 2), ("branch", None)])
def test_snt_blocks_are_annotated_with_their_style(tmp_path, style, ratio):
    policy = Policy(style=style, ratio=ratio or 4, skip_last=True)
    gm = sntfx.transform("sntfx:smallvgg", policy=policy, budget=None)  # every eligible layer
    g = _write_and_read(gm, tmp_path / "snt.graphml")
    blocks = {n: d for n, d in g.nodes(data=True) if d["snt_block"]}
    modules = dict(gm.named_modules())
    expected = {n.name for n in gm.graph.nodes
                if n.op == "call_module" and isinstance(modules[n.target], sntfx.blocks.SNTBlock)}
    assert set(blocks) == expected and len(blocks) == 5  # four convs and the first linear; the last is skipped
    for name, d in blocks.items():
        assert d["snt_style"] == style and not d["prunable"]
        assert d["layer_kind"] == modules[d["target"]].config.kind
        assert d["params"] == sum(p.numel() for p in modules[d["target"]].parameters())
        assert d.get("snt_ratio") == ratio
    last = g.nodes["classifier_2"]
    assert not last["snt_block"] and last["prunable"] and last["layer_kind"] == "linear" and "snt_style" not in last
    assert g.graph["expanded"] is True and '"smallvgg"' in g.graph["source"]
    assert set(g.edges) == _fx_edges(gm)


def test_missing_shapes_are_propagated():
    gm = sntfx.trace(Residual(), torch.randn(1, 3, 6, 6))

    def forget_shapes():
        for n in gm.graph.nodes:
            n.meta.pop("tensor_meta", None)

    forget_shapes()
    assert to_networkx(gm).nodes["conv1"]["shape"] == "1,4,6,6"  # from the input recorded at trace time
    forget_shapes()
    assert to_networkx(gm, torch.randn(3, 3, 4, 4)).nodes["fc"]["shape"] == "3,5"
    forget_shapes()
    gm.meta["sntfx"].pop("input_spec")
    g = to_networkx(gm)  # nothing to propagate from: no shapes, still a graph
    assert "shape" not in g.nodes["conv1"] and g.number_of_nodes() == len(gm.graph.nodes)


@pytest.fixture
def saved(tmp_path):
    (tmp_path / "model.py").write_text(MODEL_PY)
    snt = tmp_path / "snt.pt"
    res = CliRunner().invoke(cli, ["transform", str(tmp_path / "model.py"), "--out", str(snt), "--style", "branch"])
    assert res.exit_code == 0, res.output
    return snt


def test_cli_inspect_writes_the_graph(saved, tmp_path):
    out = tmp_path / "snt.graphml"
    old = os.umask(0o027)
    try:
        res = CliRunner().invoke(cli, ["inspect", str(saved), "--graph", str(out)])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "2 expanded" in res.output  # the table is still shown
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    g = nx.read_graphml(out)
    assert {d["snt_style"] for _, d in g.nodes(data=True) if d["snt_block"]} == {"branch"}
    assert sorted(d["target"] for _, d in g.nodes(data=True) if d["snt_block"]) == ["conv", "fc"]
    assert [n for n, d in g.nodes(data=True) if d["op"] == "placeholder"] == ["x"]
    assert not list(tmp_path.glob(".snt.graphml.*"))
    # a model spec works too (traced, not loaded)
    spec_out = tmp_path / "spec.graphml"
    res = CliRunner().invoke(cli, ["inspect", "sntfx:cnn", "--graph", str(spec_out)])
    assert res.exit_code == 0, res.output
    g = nx.read_graphml(spec_out)
    assert g.graph["expanded"] is False and any(d["prunable"] for _, d in g.nodes(data=True))


def _refused(res, *needles):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "error:" in res.output
    for n in needles:
        assert n in res.output, res.output


def test_cli_refuses_bad_graph_paths(saved, tmp_path):
    runner = CliRunner()
    before = saved.read_bytes()
    _refused(runner.invoke(cli, ["inspect", str(saved), "--graph", str(saved)]), "is the input file", "--graph")
    assert saved.read_bytes() == before
    missing = tmp_path / "nodir" / "g.graphml"
    _refused(runner.invoke(cli, ["inspect", str(saved), "--graph", str(missing)]), "does not exist", "--graph")
    assert not missing.parent.exists()
    _refused(runner.invoke(cli, ["inspect", str(saved), "--graph", str(tmp_path)]))
    model_py = tmp_path / "model.py"
    _refused(runner.invoke(cli, ["inspect", str(model_py), "--graph", str(model_py)]), "is the input file")
    assert model_py.read_text() == MODEL_PY


def test_a_failed_write_leaves_no_file(saved, tmp_path, monkeypatch):
    def partial_then_full(graph, path, **kw):
        with open(path, "w") as fh:
            fh.write("<?xml version='1.0'?><graphml")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nx, "write_graphml", partial_then_full)
    out = tmp_path / "g.graphml"
    gm = sntfx.trace(Residual(), torch.randn(1, 3, 6, 6))
    with pytest.raises(DiskFullError):
        write_graphml(gm, out)
    assert not out.exists() and not list(tmp_path.glob(".g.graphml.*"))
    _refused(CliRunner().invoke(cli, ["inspect", str(saved), "--graph", str(out)]), "no space left")
    assert not out.exists() and not list(tmp_path.glob(".g.graphml.*"))
    out.write_text("old")  # an existing file is kept whole
    _refused(CliRunner().invoke(cli, ["inspect", str(saved), "--graph", str(out)]), "no space left")
    assert out.read_text() == "old"
