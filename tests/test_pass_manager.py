"""Pass machinery: registry, pipeline strings, order checks, report, equivalence checks."""

from __future__ import annotations

import time
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
        ("snt(colour=red)", r"pass 'snt' has no parameter 'colour'; its parameters \(with defaults\): style=none, "),
        ("quantize(bits=8)", r"pass 'quantize' has no parameter 'bits'; its parameters.* wbits=8, abits=none, "
                             r"granularity=channel,"),
        ("fold(x=1)", "pass 'fold' has no parameter 'x'; it takes no parameters"),
        ("snt(style=", "missing value"),
        ("snt,", "ends with a comma"),
        ("", "empty pipeline"),
        ("snt(ratio=0)", "ratio must be an integer >= 1"),
    ],
)
def test_bad_pipeline_strings(text, match):
    with pytest.raises(sntfx.PipelineError, match=match):
        parse_pipeline(text)


def test_the_listed_parameters_of_every_pass_parse_back_to_its_defaults():
    """What `sntfx passes` lists (pass_parameters) is written as a pipeline string takes it: every pass built from
    its listed defaults equals the pass built with none, and the command shows them."""
    from click.testing import CliRunner

    from sntfx.cli import cli
    from sntfx.pass_base import pass_parameters, registered_passes

    for name, cls in registered_passes().items():
        params = pass_parameters(cls)
        assert params is not None and all("=" in v for v in params.values()), (name, params)  # all have defaults
        text = f"{name}({','.join(params.values())})" if params else name
        assert parse_pipeline(text)[0].params() == cls().params(), text
    listed = " ".join(CliRunner().invoke(cli, ["passes"], terminal_width=400).output.split())
    assert "scope=row" in listed and "wbits=8, abits=none" in listed


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
    t0 = time.perf_counter()
    report = PassManager("snt(style=branch),fold,fold_bn,fold", check=True).run(gm, PassContext(example_inputs=(x,)))
    wall = time.perf_counter() - t0
    snt, fold, fold_bn, fold2 = report.passes
    assert snt.modified and snt.stats == {"expanded: branch": 4} and snt.params_after > snt.params_before
    assert fold.modified and fold.params_after == snt.params_before and fold.stats["folded: branch"] == 4
    assert fold.max_error is not None and fold.max_error <= 1e-5
    assert fold_bn.modified and fold_bn.stats["folded"] == 2 and fold_bn.nodes_after == nodes - 2
    assert not fold2.modified  # nothing left to fold
    assert 0 < sum(p.seconds for p in report.passes) <= wall  # each pass timed, within the run's wall time
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


# -- the pass contract (v2): preconditions, replay, eval mode, copy, in-place -------------------------------


class _Recorder(Pass):
    """A test pass that records how the manager called it."""

    name = "test_recorder"
    needs_eval = True

    def __init__(self, needs: str | None = None, replace: bool = False):
        self.needs, self.replace, self.calls = needs, replace, []

    def check(self, ctx):
        return self.needs if self.needs and not ctx.calibration else None

    def run(self, gm, ctx):
        self.calls.append(("run", gm.training, [m.training for m in gm.modules()]))
        if self.replace:
            import copy

            gm = copy.deepcopy(gm)
        return PassResult(gm, False)

    def replay(self, gm, ctx):
        self.calls.append(("replay", gm.training, None))
        return PassResult(gm, False)


def test_preconditions_are_checked_for_the_whole_pipeline_before_anything_runs():
    gm, x = _gm()
    rec = _Recorder(needs="calibration batches")
    with pytest.raises(sntfx.errors.PassPreconditionError, match=r"'test_recorder' \(step 2 .*calibration batches"):
        PassManager([SNTExpand(style="linear"), rec]).run(gm, PassContext(example_inputs=(x,)))
    assert not any(isinstance(m, sntfx.blocks.SNTBlock) for m in gm.modules())  # the first pass never ran
    assert rec.calls == []


def test_the_quantize_pass_declares_its_calibration_need():
    gm, x = _gm()
    w = gm.conv1.weight.clone()
    with pytest.raises(sntfx.errors.PassPreconditionError, match="'quantize'.*calibration data"):
        PassManager("prune(sparsity=0.5),quantize(wbits=4,abits=8)").run(gm, PassContext(example_inputs=(x,)))
    assert torch.equal(gm.conv1.weight, w)  # prune did not run either


def test_replay_is_called_on_rebuild_and_run_otherwise():
    gm, x = _gm()
    rec = _Recorder()
    PassManager([rec]).run(gm, PassContext(example_inputs=(x,)))
    PassManager([rec]).run(gm, PassContext(example_inputs=(x,), rebuild=True))
    assert [c[0] for c in rec.calls] == ["run", "replay"]


def test_needs_eval_is_honoured_and_every_modules_mode_restored():
    gm, x = _gm()
    gm.train()
    frozen = next(m for m in gm.modules() if isinstance(m, torch.nn.BatchNorm2d))
    frozen.eval()  # a frozen norm inside a training model keeps its own mode
    rec = _Recorder()
    PassManager([rec]).run(gm, PassContext(example_inputs=(x,)))
    assert rec.calls[0][1] is False and not any(rec.calls[0][2])  # the pass saw eval mode throughout
    assert gm.training and not frozen.training


def test_an_inplace_pass_that_returns_another_module_is_refused():
    gm, x = _gm()
    with pytest.raises(sntfx.PassError, match="inplace=True but returned a different GraphModule"):
        PassManager([_Recorder(replace=True)]).run(gm, PassContext(example_inputs=(x,)))


def test_copy_once_at_entry_leaves_the_input_untouched():
    gm, x = _gm()
    report = PassManager("snt(style=linear),fold").run(gm, PassContext(example_inputs=(x,)), inplace=False)
    assert report.graph_module is not gm
    assert not any(isinstance(m, sntfx.blocks.SNTBlock) for m in gm.modules())
    assert "pipeline" not in sntfx_meta(gm)


def test_the_shapes_pass_records_every_nodes_shape():
    from sntfx.passes import ShapePropagation

    gm, x = _gm()
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
    with pytest.raises(sntfx.errors.PassPreconditionError, match="example inputs"):
        PassManager([ShapePropagation()]).run(gm, PassContext())
    report = PassManager([ShapePropagation()]).run(gm, PassContext(example_inputs=(x,)))
    assert not report.modified  # metadata only
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op not in ("output",)
              if "tensor_meta" in n.meta}
    assert shapes["x"] == tuple(x.shape) and len(shapes) == len([n for n in gm.graph.nodes if n.op != "output"])


def test_testing_helpers_check_equivalence_and_catch_a_lying_pass():
    from sntfx.testing import assert_equivalent

    gm, x = _gm()
    snt = sntfx.transform(gm, (x,), style="branch", preserve=True)
    report = assert_equivalent(SNTFold(), snt, (x,))
    assert not any(isinstance(m, sntfx.blocks.SNTBlock) for m in report.graph_module.modules())

    class Liar(Pass):
        name = "test_liar"

        def run(self, gm, ctx):
            with torch.no_grad():
                gm.conv1.weight.mul_(2)
            return PassResult(gm, True)

    with pytest.raises(sntfx.EquivalenceError, match="test_liar"):
        assert_equivalent(Liar(), gm, (x,))


def test_every_module_in_the_passes_package_registers_its_pass():
    """A pass is one file under passes/: the package imports it, so its registered name is usable everywhere."""
    import pkgutil

    import sntfx.passes
    from sntfx.pass_base import registered_passes

    modules = {m.name for m in pkgutil.iter_modules(sntfx.passes.__path__) if not m.name.startswith("_")}
    registered = {cls.__module__.rsplit(".", 1)[-1] for cls in registered_passes().values()}
    assert modules and modules <= registered


def test_the_api_runs_the_canonical_pipelines():
    """sntfx.transform and sntfx.fold run what sntfx.pipelines says, with the arguments they were given."""
    from sntfx.pipelines import CANONICAL, DEFAULT_STYLE, canonical_passes

    x = torch.randn(2, 3, 16, 16)
    snt, report = sntfx.transform(ConvNet(), x, preserve=True, report=True)
    assert [p.name for p in report.passes] == CANONICAL["before-training"].split(",")
    assert {m.style for m in snt.modules() if isinstance(m, sntfx.blocks.SNTBlock)} == {DEFAULT_STYLE}
    for batchnorm, stage in ((False, "after-training"), (True, "deployment")):
        _, report = sntfx.fold(snt, x, batchnorm=batchnorm, report=True)
        assert [p.name for p in report.passes] == CANONICAL[stage].split(",")
    (expand,) = canonical_passes("before-training", snt={"style": "linear", "ratio": 2})
    assert (expand.policy.style, expand.policy.ratio) == ("linear", 2)
    with pytest.raises(ValueError, match="no pass named fold"):
        canonical_passes("before-training", fold={})
    with pytest.raises(ValueError, match="unknown pipeline stage"):
        canonical_passes("training")
