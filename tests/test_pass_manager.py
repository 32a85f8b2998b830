"""Pass machinery: registry, pipeline strings, order checks, report, equivalence checks."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import sntfx
from sntfx import Numerics, Pass, PassContext, PassManager, PassResult, Property
from sntfx.pass_base import format_pipeline, parse_pipeline
from sntfx.passes import FoldBatchNorm, SNTExpand, SNTFold
from sntfx.tracing import sntfx_meta

from models_for_tests import ConvNet


def _gm():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    return sntfx.trace(ConvNet().eval(), x), x


def test_pipeline_string_roundtrip():
    passes = parse_pipeline('snt(style=branch, ratio=2, preserve=true), fold, fold_bn')
    assert [p.name for p in passes] == ["snt", "fold", "fold_bn"]
    assert passes[0].policy.style == "branch" and passes[0].policy.ratio == 2 and passes[0].preserve
    again = parse_pipeline(format_pipeline(passes))
    assert [p.params() for p in again] == [p.params() for p in passes]


@pytest.mark.parametrize(
    "text,match",
    [
        ("nope", "unknown pass 'nope'"),
        ("snt(style=wide)", "unknown style 'wide'"),
        ("snt(colour=red)", "bad parameters"),
        ("snt(style=", "missing value"),
        ("snt,", "ends with a comma"),
        ("", "empty pipeline"),
        ("snt(ratio=0)", "ratio must be an integer >= 1"),
    ],
)
def test_bad_pipeline_strings(text, match):
    with pytest.raises(sntfx.PipelineError, match=match):
        parse_pipeline(text)


def test_order_is_checked_before_anything_runs():
    gm, x = _gm()
    before = [n.target for n in gm.graph.nodes]
    pm = PassManager("snt,fold_bn")
    with pytest.raises(sntfx.PipelineOrderError, match=r"'fold_bn' requires folded.* after \[snt\].*insert one of \[fold\]"):
        pm.run(gm, PassContext(example_inputs=(x,)))
    assert [n.target for n in gm.graph.nodes] == before
    assert not any(isinstance(m, sntfx.blocks.SNTBlock) for m in gm.modules())


def test_report_counts_and_modified_flags():
    gm, x = _gm()
    nodes = len(gm.graph.nodes)
    report = PassManager("snt(style=branch),fold,fold_bn,fold", check=True).run(gm, PassContext(example_inputs=(x,)))
    snt, fold, fold_bn, fold2 = report.passes
    assert snt.modified and snt.stats == {"expanded: branch": 4} and snt.params_after > snt.params_before
    assert fold.modified and fold.params_after == snt.params_before and fold.stats["folded: branch"] == 4
    assert fold.max_error is not None and fold.max_error <= 1e-5
    assert fold_bn.modified and fold_bn.stats["folded"] == 2 and fold_bn.nodes_after == nodes - 2
    assert not fold2.modified  # nothing left to fold
    assert all(p.seconds >= 0 for p in report.passes)
    assert "fold_bn" in str(report)
    # The recipe records the passes that changed the model, in order.
    assert [p["name"] for p in sntfx_meta(report.graph_module)["pipeline"]] == ["snt", "fold", "fold_bn"]


class _Liar(Pass):
    """Claims exactness but scales one weight."""

    name = "liar_for_test"

    def run(self, gm, ctx):
        with torch.no_grad():
            gm.get_submodule("fc").project.weight.mul_(2)
        return PassResult(gm, True, Counter())


class _Broken(Pass):
    name = "broken_for_test"
    numerics = Numerics.CHANGES

    def run(self, gm, ctx):
        raise RuntimeError("boom")


def test_equivalence_check_catches_a_pass_that_lies():
    gm, x = _gm()
    with pytest.raises(sntfx.EquivalenceError, match=r"pass 'liar_for_test' \(after: snt\).*claims exact"):
        PassManager([SNTExpand(style="linear", preserve=True), _Liar()], check=True).run(gm, PassContext(example_inputs=(x,)))


def test_exact_preserve_expansion_passes_the_check():
    gm, x = _gm()
    report = PassManager([SNTExpand(style="linear", ratio=2, preserve=True)], check=True).run(
        gm, PassContext(example_inputs=(x,))
    )
    assert report.passes[0].numerics == "exact" and report.passes[0].max_error <= 1e-5


def test_errors_name_the_failing_pass_and_those_before():
    gm, x = _gm()
    with pytest.raises(sntfx.PassError, match=r"pass 'broken_for_test' \(after: snt, fold\): RuntimeError: boom"):
        PassManager([SNTExpand(), SNTFold(), _Broken()]).run(gm, PassContext(example_inputs=(x,)))


def test_instruments_see_every_pass():
    seen = []

    class Spy:
        def before_pass(self, p, gm):
            seen.append(("before", p.name))

        def after_pass(self, p, result):
            seen.append(("after", p.name, result.modified))

    gm, x = _gm()
    PassManager([SNTExpand(), SNTFold()], instruments=[Spy()]).run(gm, PassContext(example_inputs=(x,)))
    assert seen == [("before", "snt"), ("after", "snt", True), ("before", "fold"), ("after", "fold", True)]


def test_eval_mode_for_passes_that_need_it_and_mode_restored():
    gm, x = _gm()
    gm.train()
    modes = []

    class Probe(Pass):
        name = "probe_for_test"
        needs_eval = True

        def run(self, gm, ctx):
            modes.append(gm.training)
            return PassResult(gm, False)

    PassManager([Probe()]).run(gm)
    assert modes == [False] and gm.training


def test_registry_lists_builtin_passes():
    names = sntfx.registered_passes()
    assert {"snt", "fold", "fold_bn", "shapes"} <= set(names)
    with pytest.raises(ValueError, match="taken"):
        class Clash(Pass):
            name = "fold"

            def run(self, gm, ctx):
                return PassResult(gm, False)

        sntfx.register_pass(Clash)


def test_properties_derive_from_the_graph():
    from sntfx.pass_manager import graph_properties

    gm, x = _gm()
    assert graph_properties(gm) == {Property.SHAPES, Property.FOLDED}
    snt = sntfx.transform(gm, x)
    assert Property.EXPANDED in graph_properties(snt) and Property.FOLDED not in graph_properties(snt)


def test_fold_bn_pass_alone_is_exact():
    gm, x = _gm()
    report = PassManager([FoldBatchNorm()], check=True).run(gm, PassContext(example_inputs=(x,)))
    assert report.passes[0].stats == {"folded": 2}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in report.graph_module.modules())
