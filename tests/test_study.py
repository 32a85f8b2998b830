"""``sntfx study``: method names, statistics, a tiny end-to-end study, resuming, errors."""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from click.testing import CliRunner

import sntfx
from sntfx.cli import cli
from sntfx.errors import SntfxError
from sntfx.study import SCHEMA_PATH, Method, Study, StudyConfig, summarize

TINY = dict(models=["sntfx:cnn"], data="synthetic", epochs=2, limit_batches=3, batch_size=32, eval_images=64,
            sharpness_batches=1, sharpness_batch_size=32, sharpness_iters=3, trace_samples=2, landscape_steps=5,
            bench_iters=2, bench_batch_sizes=[1, 8], sparsities=[0.5, 0.8], channel_sparsities=[0.3], bits=[8, 4],
            # W8A8 (the int8 file) and one other deployed setting: each costs an ONNX export per run
            act_bits=[[8, 8], [4, 8]], provider="cpu")
STAGE_FILES = ["config.json", "train.json", "evaluate.json", "sweep.json", "onnx.json", "model.pt", "model.onnx",
               "model.int8.onnx", "train.ckpt", "train.metrics.jsonl"]
PLOTS = ["accuracy_vs_sparsity", "accuracy_vs_bits", "sharpness", "landscape", "training_curves"]


# -- method names ------------------------------------------------------------------


@pytest.mark.parametrize("text, style, ratio, init, sam", [
    ("adam", None, None, "preserve", False),
    ("sam", None, None, "preserve", True),
    ("snt-linear", "linear", None, "preserve", False),
    ("snt-linear-x2", "linear", 2, "preserve", False),
    ("snt-branch+sam", "branch", None, "preserve", True),
    ("snt-qa-branch", "qa-branch", None, "preserve", False),
    ("SNT-QA-Branch-fresh+SAM", "qa-branch", None, "fresh", True),
    ("SNT-Linear-fresh-x3+SAM", "linear", 3, "fresh", True),
])
def test_method_names(text, style, ratio, init, sam):
    m = Method.parse(text)
    assert (m.style, m.ratio, m.init, m.sam) == (style, ratio, init, sam)
    assert Method.parse(m.name) == m


@pytest.mark.parametrize("text", ["sgd", "snt-wide", "snt-linear-x0", "snt-linear-big", "adam+sam", "sam+sam",
                                  "snt-linear+adam", "snt-", "snt-qa-branch-x3"])
def test_bad_method_names_say_what_is_allowed(text):
    with pytest.raises(SntfxError, match="method|style"):
        Method.parse(text)


def test_adam_baseline_is_always_included():
    assert StudyConfig(methods=["snt-linear"]).methods == ["adam", "snt-linear"]


# -- statistics ---------------------------------------------------------------------


def _record(method, seed, acc, w4, ep):
    return {"model": "m", "method": method, "seed": seed,
            "evaluate": {"float_accuracy": acc, "sharpness": {"loss": 0.1, "top_eigenvalue": 10.0 * acc,
                                                              "hessian_trace": 1.0, "sam_sharpness": 0.1}},
            "sweep": {"float": acc, "sparsity": {"0.5": acc - 0.1}, "channel_sparsity": {}, "bits": {"4": w4},
                      "act_bits": {}},
            "train": {"epoch_seconds_median": ep}}


def test_summary_statistics_are_paired_by_seed():
    config = StudyConfig(models=["m"], methods=["adam", "snt-linear"], seeds=[0, 1, 2])
    adam = [(0.80, 0.50, 10.0), (0.82, 0.60, 11.0), (0.81, 0.40, 12.0)]
    snt = [(0.83, 0.70, 11.0), (0.82, 0.65, 12.1), (0.85, 0.62, 13.2)]
    records = [_record("adam", s, *v) for s, v in enumerate(adam)] + [_record("snt-linear", s, *v)
                                                                       for s, v in enumerate(snt)]
    summary = summarize(records, config)["m"]
    float_stats = summary["metrics"]["snt-linear"]["float"]
    assert float_stats["mean"] == pytest.approx(statistics.fmean([0.83, 0.82, 0.85]))
    assert float_stats["std"] == pytest.approx(statistics.stdev([0.83, 0.82, 0.85]))
    diffs = [b[1] - a[1] for a, b in zip(adam, snt)]
    gain = summary["gains_over_adam"]["snt-linear"]["W4"]
    assert (gain["mean"], gain["std"], gain["n"]) == pytest.approx((statistics.fmean(diffs), statistics.stdev(diffs), 3))
    # the quantization group averages W4 only here; unstructured pruning averages sparsity 0.5
    group = summary["group_gains_over_adam"]["snt-linear"]
    assert group["quantization (<= 6 bits)"]["mean"] == pytest.approx(statistics.fmean(diffs))
    assert group["unstructured pruning"]["mean"] == pytest.approx(statistics.fmean(
        [b[0] - a[0] for a, b in zip(adam, snt)]))
    assert summary["metrics"]["snt-linear"]["epoch_time_vs_adam"]["mean"] == pytest.approx(1.1)
    assert "W4" not in summary["gains_over_adam"].get("adam", {})
    # the mechanism measurements are paired the same way (the fake records' top eigenvalue is 10 x float accuracy)
    eig = summary["mechanism_vs_adam"]["snt-linear"]["sharpness:top_eigenvalue"]
    eig_diffs = [10.0 * (b[0] - a[0]) for a, b in zip(adam, snt)]
    assert (eig["mean"], eig["std"], eig["n"]) == pytest.approx((statistics.fmean(eig_diffs),
                                                                 statistics.stdev(eig_diffs), 3))
    assert eig["ci95"][0] < eig["mean"] < eig["ci95"][1]
    assert summary["mechanism_vs_adam"]["snt-linear"]["sharpness:loss"]["mean"] == pytest.approx(0.0)
    assert "adam" not in summary["mechanism_vs_adam"] and "float" not in summary["mechanism_vs_adam"]["snt-linear"]


def test_the_report_marks_mechanism_differences_whose_interval_excludes_zero():
    from sntfx.study import confidence_interval
    from sntfx.study.report import _mechanism_differences

    def stat(mean, std, n):
        return {"mean": mean, "std": std, "n": n, "ci95": confidence_interval(mean, std, n)}

    mechanism = {"snt-a": {"weights:crest_factor": stat(2.0, 0.1, 5), "sharpness:top_eigenvalue": stat(-5.0, 20.0, 5)},
                 "snt-b": {"weights:crest_factor": stat(0.5, 0.0, 1)}}
    table = "\n".join(_mechanism_differences(mechanism, ["adam", "snt-a", "snt-b"]))
    row_a = next(line for line in table.splitlines() if line.startswith("| snt-a"))
    cells = [c.strip() for c in row_a.strip("|").split("|")]
    assert cells[1].startswith("-5 [") and not cells[1].endswith("*")  # top eigenvalue: the interval holds zero
    assert cells[6].startswith("+2 [") and cells[6].endswith("*")  # crest factor: clearly above Adam
    assert "+0.5 (1 seed)" in table and "n/a" in table
    assert _mechanism_differences({}, ["adam", "snt-a"]) == []  # results written before the differences


def test_confidence_intervals_use_t_over_seeds_and_decide_the_verdict():
    from sntfx.study import confidence_interval
    from sntfx.study.report import short_verdict, verdict

    lo, hi = confidence_interval(1.0, 1.0, 5)
    assert (lo, hi) == pytest.approx((1.0 - 2.776445 / 5**0.5, 1.0 + 2.776445 / 5**0.5), rel=1e-6)  # t(0.975, 4)
    assert confidence_interval(0.3, 0.1, 1) is None
    # mean more than one std above zero, but the 95% interval (3 seeds: t = 4.30) still contains zero
    gain = {"mean": 0.02, "std": 0.015, "n": 3, "ci95": confidence_interval(0.02, 0.015, 3)}
    assert gain["ci95"][0] < 0 < gain["ci95"][1]
    assert verdict(gain).startswith("no clear difference") and short_verdict(gain).endswith("~")
    sure = {"mean": 0.02, "std": 0.005, "n": 5, "ci95": confidence_interval(0.02, 0.005, 5)}
    assert verdict(sure).startswith("helps") and short_verdict(sure).endswith("helps")
    old = {"mean": -0.02, "std": 0.005, "n": 5}  # results.json written before intervals: recomputed
    assert verdict(old).startswith("hurts")


def test_primary_scores_average_their_preregistered_settings_per_seed():
    from sntfx.study import PRIMARY_SCORES

    config = StudyConfig(models=["m"], methods=["adam", "snt-linear"], seeds=[0, 1, 2])
    gen = torch.Generator().manual_seed(0)
    records, per_seed = [], {"pruning score": [], "quantization score": []}
    for seed in range(3):
        accs = {}
        for method in ("adam", "snt-linear"):
            rec = _record(method, seed, 0.8, 0.5, 10.0)
            vals = {k: float(torch.rand((), generator=gen)) for keys in PRIMARY_SCORES.values() for k in keys}
            rec["sweep"]["wanda"] = {k.split(":", 1)[1]: v for k, v in vals.items() if k.startswith("wanda:")}
            rec["sweep"]["bits"] = {k[1:]: v for k, v in vals.items() if re.fullmatch(r"W\d+", k)}
            rec["sweep"]["act_bits"] = {k: v for k, v in vals.items() if re.fullmatch(r"W\d+A\d+", k)}
            records.append(rec)
            accs[method] = vals
        for score, keys in PRIMARY_SCORES.items():
            per_seed[score].append(statistics.fmean(accs["snt-linear"][k] - accs["adam"][k] for k in keys))
    primary = summarize(records, config)["m"]["primary_scores"]["snt-linear"]
    for score, values in per_seed.items():
        s = primary[score]
        assert (s["mean"], s["std"], s["n"]) == pytest.approx((statistics.fmean(values), statistics.stdev(values), 3))
        assert s["ci95"][0] < s["mean"] < s["ci95"][1]


def test_validation_split_is_chosen_on_and_the_test_split_read_only_when_asked(tmp_path, test_split_reads):
    """evaluate_on=val never reads a test image (training curve included); switching to test keeps the training."""
    reads = test_split_reads
    config = StudyConfig(**{**TINY, "eval_images": None}, methods=["adam", "snt-linear"], seeds=[0], onnx=False,
                         val_images=100, evaluate_on="val")
    results = Study(config, tmp_path).run()
    assert reads["test"] == 0
    assert results["dataset"]["val_images"] == 100 and results["dataset"]["evaluated_on"] == "val"
    assert results["dataset"]["train_images"] == 412  # synthetic: 512 training images, 100 held out
    run = results["runs"][0]
    assert run["evaluate"]["split"] == "val" and run["evaluate"]["test_images"] == 100
    assert run["train"]["curve_split"] == "validation"  # what the history's per-epoch accuracy was read on
    assert "validation images" in (tmp_path / "report.md").read_text()
    final = StudyConfig(**{**TINY, "eval_images": None}, methods=["adam", "snt-linear"], seeds=[0], onnx=False,
                        val_images=100, evaluate_on="test")
    again = Study(final, tmp_path)
    results = again.run()
    assert {stage for _, stage in again.executed} == {"evaluate", "sweep"}  # the trained runs are kept
    assert reads["test"] > 0 and results["runs"][0]["evaluate"]["split"] == "test"
    assert results["runs"][0]["evaluate"]["test_images"] == 256
    with pytest.raises(SntfxError, match="val_images"):
        StudyConfig(**TINY, evaluate_on="val")


def _weightless(folder: Path) -> None:
    """What a results folder kept without its weights holds: the stage results, no model or checkpoint."""
    for path in folder.rglob("*"):
        if path.name == "model.pt" or path.name.startswith("train.") and path.name != "train.json":
            path.unlink()


def test_sealed_test_split_is_measured_apart_and_read_later_without_the_weights(tmp_path):
    """seal_test: a validation study also measures the test split into files its report does not read; the
    same folder, kept without its weights, then reports the test split by collecting them, computing nothing."""
    common = dict(**{**TINY, "eval_images": None}, methods=["adam", "snt-linear"], seeds=[0], onnx=False,
                  val_images=100)
    study = Study(StudyConfig(**common, evaluate_on="val", seal_test=True), tmp_path)
    val = study.run()
    assert sorted(study.executed) == sorted((label, stage) for label in ("sntfx:cnn adam seed 0",
                                                                         "sntfx:cnn snt-linear seed 0")
                                            for stage in ("train", "evaluate", "evaluate", "sweep", "sweep"))
    run_dir = tmp_path / "runs/sntfx-cnn/adam/seed0"
    sealed = json.loads((run_dir / "evaluate.json").read_text())
    assert sealed["split"] == "test" and sealed["test_images"] == 256
    assert json.loads((run_dir / "evaluate.val.json").read_text())["split"] == "val"
    assert all(r["evaluate"]["split"] == "val" and r["sweep"]["split"] == "val" for r in val["runs"])
    assert all(r["evaluate"]["test_images"] == 100 for r in val["runs"])  # the validation images, not the test's

    _weightless(tmp_path)
    final = Study(StudyConfig(**common, evaluate_on="test"), tmp_path)
    test = final.run()
    assert final.executed == []
    assert test["runs"][0]["evaluate"]["float_accuracy"] == sealed["float_accuracy"]
    assert all(r["evaluate"]["split"] == "test" for r in test["runs"])
    again = Study(StudyConfig(**common, evaluate_on="val", seal_test=True), tmp_path)  # back to validation
    assert again.run()["runs"][0]["evaluate"] == val["runs"][0]["evaluate"] and again.executed == []
    with pytest.raises(SntfxError, match="evaluate_on = val"):
        StudyConfig(**common, seal_test=True)


def test_a_run_kept_without_weights_trains_again_only_if_it_was_not_measured(tmp_path):
    config = StudyConfig(**TINY, methods=["adam", "snt-linear"], seeds=[0], onnx=False)
    Study(config, tmp_path).run()
    _weightless(tmp_path)
    (tmp_path / "runs/sntfx-cnn/snt-linear/seed0/sweep.json").unlink()  # one measurement missing
    second = Study(config, tmp_path)
    second.run()
    assert second.executed == [("sntfx:cnn snt-linear seed 0", "train"), ("sntfx:cnn snt-linear seed 0", "sweep")]


def test_validation_results_of_older_studies_move_beside_the_test_ones(tmp_path):
    """Before seal_test, a validation study kept its measurements in STAGE.json; they move to STAGE.val.json
    and are not measured again."""
    config = StudyConfig(**TINY, methods=["adam"], seeds=[0], onnx=False, val_images=100, evaluate_on="val")
    Study(config, tmp_path).run()
    run_dir = tmp_path / "runs/sntfx-cnn/adam/seed0"
    for stage in ("evaluate", "sweep"):
        (run_dir / f"{stage}.val.json").rename(run_dir / f"{stage}.json")  # the older layout
    study = Study(config, tmp_path)
    study.run()
    assert study.executed == []
    assert not (run_dir / "evaluate.json").exists() and (run_dir / "evaluate.val.json").exists()


# -- the runs -----------------------------------------------------------------------


def test_every_method_starts_from_the_same_function(tmp_path):
    study = Study(StudyConfig(**TINY, methods=["adam", "snt-linear", "snt-branch", "snt-linear+sam"], seeds=[3]),
                  tmp_path)
    x = torch.stack([study.data.test[i][0] for i in range(16)])
    outputs = []
    for run in study.runs():
        gm = study._build(run).eval()
        with torch.no_grad():
            outputs.append(gm(x))
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=1e-5, atol=1e-5)
    fresh = Study(StudyConfig(**TINY, methods=["adam", "snt-linear-fresh"], seeds=[3]), tmp_path)
    gm = fresh._build(fresh.runs()[1]).eval()
    with torch.no_grad():
        assert not torch.allclose(gm(x), outputs[0], atol=1e-3)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    settings = {k: v for k, v in TINY.items() if k not in ("models", "data", "epochs")}
    (folder / "tiny.json").write_text(json.dumps(settings))
    out = folder / "out"
    res = CliRunner().invoke(cli, [
        "study", "--model", "sntfx:cnn", "--data", "synthetic", "--methods", "adam,sam,snt-linear,snt-branch",
        "--seeds", "0,1", "--epochs", "2", "--config", str(folder / "tiny.json"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out, res.output


def test_tiny_study_writes_every_file(tiny_study):
    out, output = tiny_study
    assert "report:" in output
    for name in ("results.json", "report.md", "study.json"):
        assert (out / name).is_file(), name
    for plot in PLOTS:
        png = out / "plots" / f"sntfx-cnn-{plot}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    for method in ("adam", "sam", "snt-linear", "snt-branch"):
        for seed in (0, 1):
            run = out / "runs" / "sntfx-cnn" / method / f"seed{seed}"
            for name in STAGE_FILES:
                assert (run / name).is_file(), run / name
    assert not list(out.rglob("*.tmp")), "temporary files left behind"


def test_results_validate_against_the_schema(tiny_study):
    out, _ = tiny_study
    results = json.loads((out / "results.json").read_text())
    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(results)
    assert len(results["runs"]) == 8
    assert {r["train"]["curve_split"] for r in results["runs"]} == {"test"}  # no validation split held out
    assert results["config"]["seeds"] == [0, 1]
    assert "torch" in results["environment"]["packages"]
    # the summary is computed from the runs it lists
    runs = [r for r in results["runs"] if r["method"] == "snt-linear"]
    mean = statistics.fmean(r["evaluate"]["float_accuracy"] for r in runs)
    assert results["summary"]["sntfx:cnn"]["metrics"]["snt-linear"]["float"]["mean"] == pytest.approx(mean)
    # a broken document is rejected
    bad = dict(results, runs=[dict(results["runs"][0], evaluate={"float_accuracy": 1.5})])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(bad)


def test_study_models_are_folded_and_the_fold_is_recorded(tiny_study):
    out, _ = tiny_study
    plain = sum(p.numel() for p in sntfx.load(out / "runs/sntfx-cnn/adam/seed0/model.pt").parameters())
    for method in ("snt-linear", "snt-branch"):
        train = json.loads((out / f"runs/sntfx-cnn/{method}/seed0/train.json").read_text())
        assert train["params_trained"] > train["params_deployed"] == plain
        assert train["fold"]["rel_error"] < 1e-5
        gm = sntfx.load(out / f"runs/sntfx-cnn/{method}/seed0/model.pt")
        assert sum(p.numel() for p in gm.parameters()) == plain
        # the folded model scores what the trained (expanded) model scored on the same test set
        evaluate = json.loads((out / f"runs/sntfx-cnn/{method}/seed0/evaluate.json").read_text())
        assert abs(evaluate["float_accuracy"] - train["final_test_accuracy"]) <= 1 / evaluate["test_images"]


def test_report_has_the_answer_first(tiny_study):
    out, _ = tiny_study
    report = (out / "report.md").read_text()
    head = report[: report.index("### Accuracy")]
    for method in ("adam", "sam", "snt-linear", "snt-branch"):
        assert f"**{method}**" in head
    assert "Δ unstructured pruning" in head and "time / epoch vs Adam" in head
    # the pre-registered primary scores lead: before the per-kind table, with every method's interval
    primary = report[report.index("### Primary scores"): report.index("Δ unstructured pruning")]
    assert "pruning score" in primary and "quantization score" in primary
    for method in ("sam", "snt-linear", "snt-branch"):
        assert re.search(rf"\*\*{method}\*\* \| [+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]", primary), method
    for plot in PLOTS:
        assert f"plots/sntfx-cnn-{plot}.png" in report
    assert "ONNX Runtime" in report
    # the mechanism table is followed by its paired differences from Adam, with intervals
    mechanism = report[report.index("### Mechanism"): report.index("### Training cost")]
    assert "Paired difference from Adam" in mechanism
    assert re.search(r"\| snt-linear \| [+-][\d.e+-]+ \[[+-][\d.e+-]+, [+-][\d.e+-]+\]", mechanism), mechanism


def test_report_only_redraws_from_results(tiny_study, tmp_path):
    out, _ = tiny_study
    (out / "report.md").unlink()
    res = CliRunner().invoke(cli, ["study", "--report-only", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "report.md").is_file()
    # a results file written before a statistic existed: the report recomputes the summary from the runs
    results = json.loads((out / "results.json").read_text())
    for summary in results["summary"].values():
        del summary["mechanism_vs_adam"]
    (tmp_path / "results.json").write_text(json.dumps(results))
    res = CliRunner().invoke(cli, ["study", "--report-only", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "Paired difference from Adam" in (tmp_path / "report.md").read_text()
    assert "mechanism_vs_adam" not in json.loads((tmp_path / "results.json").read_text())["summary"]["sntfx:cnn"]


def test_interrupted_study_resumes_without_redoing_finished_work(tmp_path):
    config = StudyConfig(**TINY, methods=["adam", "snt-linear"], seeds=[0], onnx=False)
    first = Study(config, tmp_path / "a", stop_after=lambda run, stage: run.method.name == "snt-linear"
                  and stage == "train")
    with pytest.raises(KeyboardInterrupt):
        first.run()
    # each run is measured as soon as it is trained
    assert first.executed == [("sntfx:cnn adam seed 0", "train"), ("sntfx:cnn adam seed 0", "evaluate"),
                              ("sntfx:cnn adam seed 0", "sweep"), ("sntfx:cnn snt-linear seed 0", "train")]
    adam_dir = tmp_path / "a/runs/sntfx-cnn/adam/seed0"
    stamp = (adam_dir / "train.json").stat().st_mtime_ns, (adam_dir / "model.pt").stat().st_mtime_ns
    second = Study(config, tmp_path / "a")
    second.run()
    assert ("sntfx:cnn adam seed 0", "train") not in second.executed
    assert ("sntfx:cnn snt-linear seed 0", "train") not in second.executed
    assert ("sntfx:cnn snt-linear seed 0", "evaluate") in second.executed
    assert ("sntfx:cnn adam seed 0", "evaluate") not in second.executed
    assert ((adam_dir / "train.json").stat().st_mtime_ns, (adam_dir / "model.pt").stat().st_mtime_ns) == stamp
    third = Study(config, tmp_path / "a")
    third.run()
    assert third.executed == []
    assert (tmp_path / "a/results.json").is_file()


def test_a_study_stopped_part_way_holds_complete_pairs_over_the_seeds_it_reached(tmp_path):
    """Runs are computed seed by seed, every method of a seed before the next seed; the results keep the
    method-major order."""
    config = StudyConfig(**{**TINY, "epochs": 1, "limit_batches": 1}, methods=["adam", "snt-linear"], seeds=[0, 1],
                         onnx=False)
    study = Study(config, tmp_path, stop_after=lambda run, stage: run.seed == 1 and stage == "train")
    with pytest.raises(KeyboardInterrupt):
        study.run()
    trained = [label for label, stage in study.executed if stage == "train"]
    assert trained == ["sntfx:cnn adam seed 0", "sntfx:cnn snt-linear seed 0", "sntfx:cnn adam seed 1"]
    assert [(r.method.name, r.seed) for r in study.runs()] == [("adam", 0), ("adam", 1), ("snt-linear", 0),
                                                                ("snt-linear", 1)]


def test_processes_sharing_a_study_folder_skip_the_runs_another_one_holds(tmp_path):
    """Two processes on one folder share the runs: a run whose lock another process holds is skipped, not
    computed twice; the process that is not last writes no report and names the held runs; once the lock is
    free, the next one computes just that run and writes the report."""
    from sntfx.io import try_lock
    from sntfx.study.runner import LOCK

    config = StudyConfig(**TINY, methods=["adam", "snt-linear"], seeds=[0, 1], onnx=False)
    busy = tmp_path / "runs/sntfx-cnn/snt-linear/seed0"
    busy.mkdir(parents=True)
    with try_lock(busy / LOCK) as mine:  # "another process" is computing snt-linear seed 0
        assert mine
        with try_lock(busy / LOCK) as again:
            assert not again  # a second holder is refused at once
        first = Study(config, tmp_path)
        assert first.run() is None
    assert [r.label for r in first.held] == ["sntfx:cnn snt-linear seed 0"]
    assert {label for label, _ in first.executed} == {"sntfx:cnn adam seed 0", "sntfx:cnn adam seed 1",
                                                      "sntfx:cnn snt-linear seed 1"}
    assert len(first.executed) == 9  # three runs x (train, evaluate, sweep)
    assert not (busy / "train.json").exists() and not (tmp_path / "results.json").exists()
    last = Study(config, tmp_path)
    results = last.run()
    assert last.executed == [("sntfx:cnn snt-linear seed 0", stage) for stage in ("train", "evaluate", "sweep")]
    assert len(results["runs"]) == 4 and (tmp_path / "results.json").is_file() and (tmp_path / "report.md").is_file()


def test_a_run_trains_alone_through_the_public_entry_and_the_study_measures_it_later(tmp_path):
    """``Study.train_run`` is the study's train stage for one run: train.json and the folded weights, no
    measurement; a second call trains nothing; a held run or a run of another study is refused; ``run()`` then
    only measures it."""
    from dataclasses import replace

    from sntfx.io import try_lock
    from sntfx.study.runner import LOCK

    config = StudyConfig(**TINY, methods=["adam", "snt-linear"], seeds=[0], onnx=False)
    study = Study(config, tmp_path)
    adam, snt = study.runs()
    trained = study.train_run(snt)
    assert study.executed == [(snt.label, "train")]
    assert trained == json.loads((snt.path / "train.json").read_text())
    assert len(trained["history"]) == config.epochs and trained["fold"]["rel_error"] <= 1e-4
    assert trained["params_trained"] > trained["params_deployed"]  # trained expanded, stored folded
    assert (snt.path / "model.pt").is_file() and not list(snt.path.glob("evaluate*.json"))
    assert not adam.path.exists()  # nothing else of the study ran
    assert study.train_run(snt) == trained and study.executed == [(snt.label, "train")]  # done: not again
    adam.path.mkdir(parents=True)
    with try_lock(adam.path / LOCK) as mine:  # "another process" is computing Adam seed 0
        assert mine
        with pytest.raises(SntfxError, match="another process is computing"):
            Study(config, tmp_path).train_run(adam)
    with pytest.raises(SntfxError, match="not a run of this study"):
        study.train_run(replace(snt, seed=7))
    later = Study(config, tmp_path)
    later.run()
    assert [(label, stage) for label, stage in later.executed if label == snt.label] == [
        (snt.label, "evaluate"), (snt.label, "sweep")]


def test_a_run_let_go_while_another_is_still_held_is_computed_and_no_report_is_written(tmp_path, monkeypatch):
    """Of two held runs, one is let go while the process is busy: it computes that one, and still writes no
    report, because the other run is not done."""
    import contextlib

    from sntfx.io import try_lock
    from sntfx.study.runner import LOCK

    config = StudyConfig(**TINY, methods=["adam"], seeds=[0, 1, 2], onnx=False)
    locks = {}
    for seed in (1, 2):
        folder = tmp_path / f"runs/sntfx-cnn/adam/seed{seed}"
        folder.mkdir(parents=True)
        locks[seed] = contextlib.ExitStack()
        assert locks[seed].enter_context(try_lock(folder / LOCK))
    original = Study._claimable

    def let_seed_1_go(self, run):  # the other process finishes seed 1 while this one works
        locks[1].close()
        return original(self, run)

    monkeypatch.setattr(Study, "_claimable", let_seed_1_go)
    study = Study(config, tmp_path)
    try:
        assert study.run() is None
    finally:
        locks[2].close()
    assert [r.label for r in study.held] == ["sntfx:cnn adam seed 2"]
    assert {label for label, _ in study.executed} == {"sntfx:cnn adam seed 0", "sntfx:cnn adam seed 1"}
    assert not (tmp_path / "results.json").exists()


def test_joining_a_process_at_work_with_other_measurement_settings_is_refused(tmp_path):
    """Two processes with different sweep settings would redo each other's sweeps forever: the second is refused
    (naming the difference) while the first holds a run. One with the same measurements but more seeds and
    another device joins, and computes only what the first does not hold. (With nothing held, a changed setting
    is an ordinary rerun: test_changed_sweep_settings_redo_the_sweep_only.)"""
    from sntfx.errors import SntfxError
    from sntfx.io import try_lock
    from sntfx.study.runner import LOCK

    first = StudyConfig(**TINY, methods=["adam"], seeds=[0], onnx=False)
    (tmp_path / "study.json").write_text(json.dumps({"format": "sntfx-study", "config": first.to_dict()}))
    busy = tmp_path / "runs/sntfx-cnn/adam/seed0"
    busy.mkdir(parents=True)
    other = StudyConfig(**{**TINY, "sparsities": [0.6]}, methods=["adam"], seeds=[0], onnx=False)
    with try_lock(busy / LOCK):
        with pytest.raises(SntfxError, match=r"another process .* other settings \(sparsities"):
            Study(other, tmp_path).run()
        more_seeds = StudyConfig(**TINY, methods=["adam"], seeds=[0, 1], onnx=False, device="cpu")
        assert Study(more_seeds, tmp_path).run() is None  # same measurements: it shares, computing seed 1
    assert not (busy / "train.json").exists() and (tmp_path / "runs/sntfx-cnn/adam/seed1/sweep.json").is_file()


def test_the_command_says_which_runs_another_process_still_holds(tmp_path):
    from sntfx.io import try_lock
    from sntfx.study.runner import LOCK

    busy = tmp_path / "out/runs/sntfx-cnn/adam/seed0"
    busy.mkdir(parents=True)
    (tmp_path / "out/study.json").write_text('{"format": "sntfx-study"}')  # the other process started the study
    with try_lock(busy / LOCK):
        res = CliRunner().invoke(cli, ["study", "--model", "sntfx:cnn", "--data", "synthetic", "--methods", "adam",
                                       "--seeds", "0", "--epochs", "1", "--limit-batches", "1", "--no-onnx",
                                       "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "1 run(s) are still being computed by another process" in res.output
    assert "sntfx:cnn adam seed 0" in res.output and "last process to finish writes the report" in res.output
    assert not (tmp_path / "out/results.json").exists() and not (busy / "train.json").exists()


def test_changed_sweep_settings_redo_the_sweep_only(tmp_path):
    config = StudyConfig(**TINY, methods=["adam"], seeds=[0], onnx=False)
    Study(config, tmp_path).run()
    changed = StudyConfig(**{**TINY, "sparsities": [0.5, 0.6, 0.8]}, methods=["adam"], seeds=[0], onnx=False)
    again = Study(changed, tmp_path)
    results = again.run()
    assert again.executed == [("sntfx:cnn adam seed 0", "sweep")]
    assert sorted(results["runs"][0]["sweep"]["sparsity"]) == ["0.5", "0.6", "0.8"]


def test_mse_bits_add_sweep_settings_to_a_finished_study_without_retraining(tmp_path):
    """A study run without mse_bits records nothing for them (so older studies resume as they were); adding them
    redoes the sweep only, and the report gets their table and their gains over Adam."""
    config = StudyConfig(**TINY, methods=["adam", "snt-linear"], seeds=[0], onnx=False)
    Study(config, tmp_path).run()
    stored = json.loads((tmp_path / "runs/sntfx-cnn/adam/seed0/sweep.json").read_text())["settings"]
    assert "mse_bits" not in stored
    changed = StudyConfig(**TINY, methods=["adam", "snt-linear"], seeds=[0], onnx=False, mse_bits=[4, 3])
    again = Study(changed, tmp_path)
    results = again.run()
    assert sorted(again.executed) == [("sntfx:cnn adam seed 0", "sweep"), ("sntfx:cnn snt-linear seed 0", "sweep")]
    for run in results["runs"]:
        assert sorted(run["sweep"]["bits_mse"]) == ["3", "4"]
    summary = results["summary"]["sntfx:cnn"]
    adam = next(r for r in results["runs"] if r["method"] == "adam")
    assert summary["metrics"]["adam"]["W4:mse"]["mean"] == pytest.approx(adam["sweep"]["bits_mse"]["4"])
    assert "W4:mse" in summary["gains_over_adam"]["snt-linear"]
    assert "W4:mse" not in summary["primary_scores"]["snt-linear"]  # pre-registered scores are unchanged
    report = (tmp_path / "report.md").read_text()
    table = report[report.index("MSE-chosen ranges"):]
    assert table.index("| W4 (MSE) |") < table.index("| W3 (MSE) |")
    with pytest.raises(SntfxError, match="MSE-range weight bits 1"):
        StudyConfig(**TINY, methods=["adam"], seeds=[0], mse_bits=[1])


def test_killed_mid_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Interrupt inside the second epoch: the resumed run ends bit-identical to an uninterrupted one."""
    import sntfx.study.runner as study_mod

    config = StudyConfig(**TINY, methods=["adam", "snt-linear"], seeds=[0], onnx=False)
    Study(config, tmp_path / "ref").run()

    calls = {"n": 0}
    original = study_mod._TrainTicker.on_step

    def crash(self, epoch, step, loss, rate):
        calls["n"] += 1
        # Adam trains first (2 epochs x 3 steps); crash in the second epoch of snt-linear
        if calls["n"] > 6 and epoch == 1 and step == 2:
            raise KeyboardInterrupt("simulated kill")
        original(self, epoch, step, loss, rate)

    monkeypatch.setattr(study_mod._TrainTicker, "on_step", crash)
    with pytest.raises(KeyboardInterrupt):
        Study(config, tmp_path / "b").run()
    assert (tmp_path / "b/runs/sntfx-cnn/snt-linear/seed0/train.ckpt").exists()
    assert not (tmp_path / "b/runs/sntfx-cnn/snt-linear/seed0/train.json").exists()
    monkeypatch.setattr(study_mod._TrainTicker, "on_step", original)
    resumed = Study(config, tmp_path / "b")
    resumed.run()
    assert [s for s in resumed.executed if s[1] == "train"] == [("sntfx:cnn snt-linear seed 0", "train")]
    for method in ("adam", "snt-linear"):
        a = sntfx.load(tmp_path / f"ref/runs/sntfx-cnn/{method}/seed0/model.pt").state_dict()
        b = sntfx.load(tmp_path / f"b/runs/sntfx-cnn/{method}/seed0/model.pt").state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), (method, k)


# -- errors ---------------------------------------------------------------------------


def _invoke(*args):
    return CliRunner().invoke(cli, ["study", *args])


def test_bad_method_exits_2_without_output(tmp_path):
    res = _invoke("--data", "synthetic", "--methods", "adam,snt-wide", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2
    assert "snt-wide" in res.output and "linear" in res.output
    assert not (tmp_path / "o").exists()


def test_missing_dataset_exits_2_without_output(tmp_path):
    res = _invoke("--data", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "CIFAR" in res.output.upper()
    assert not (tmp_path / "o").exists()


def test_changed_settings_are_refused_on_resume(tmp_path):
    config = StudyConfig(**TINY, methods=["adam"], seeds=[0], onnx=False)
    Study(config, tmp_path).run()
    args = ["--model", "sntfx:cnn", "--data", "synthetic", "--methods", "adam", "--seeds", "0", "--limit-batches", "3",
            "--batch-size", "32", "--out", str(tmp_path)]
    res = _invoke(*args, "--epochs", "3")
    assert res.exit_code == 2 and "epochs" in res.output and "different settings" in res.output


def test_out_must_be_new_or_a_study(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    res = _invoke("--data", "synthetic", "--out", str(tmp_path))
    assert res.exit_code == 2 and "does not hold an sntfx study" in res.output
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_unknown_setting_in_config_file(tmp_path):
    (tmp_path / "s.toml").write_text("epochs = 2\nsharpnes_iters = 3\n")
    res = _invoke("--data", "synthetic", "--config", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "sharpnes_iters" in res.output and "sharpness_iters" in res.output
    assert not (tmp_path / "o").exists()


def test_presets_resolve():
    from sntfx.study import preset_config

    paper = preset_config("paper", {})
    assert paper.data == "cifar10" and len(paper.seeds) == 3 and "sntfx:resnet20" in paper.models
    quick = preset_config("quick", {"data": "digits"})
    assert quick.data == "digits" and quick.models == ["sntfx:smallvgg"]
    assert preset_config("quick", {"epochs": 7}).epochs == 7
    with pytest.raises(SntfxError, match="preset"):
        preset_config("huge", {})


def test_every_preset_and_the_default_study_compare_the_default_style_with_adam_and_sam():
    """Changing the default style (sntfx.pipelines) without the study's presets would demo a style nobody ships."""
    from sntfx.pipelines import DEFAULT_STYLE
    from sntfx.study import preset_config
    from sntfx.study.config import PRESETS

    want = {"adam", "sam", f"snt-{DEFAULT_STYLE}"}
    assert want <= set(StudyConfig().methods)
    for name, by_data in PRESETS.items():
        for data in by_data:
            assert want <= set(preset_config(name, {"data": data}).methods), (name, data)


def test_run_labels_are_unique():
    study = Study(StudyConfig(models=["sntfx:cnn", "sntfx:resnet20"], methods=["adam", "snt-linear"], seeds=[0, 1]),
                  "unused")
    runs = study.runs()
    assert len({r.path for r in runs}) == len(runs) == 8
    assert {(r.model, r.method.name, r.seed) for r in runs} == {
        (m, meth, s) for m in ("sntfx:cnn", "sntfx:resnet20") for meth in ("adam", "snt-linear") for s in (0, 1)}


def test_study_under_torchrun(tmp_path):
    """Two ranks train every run together (DDP); rank 0 alone evaluates and writes the report."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = {k: v for k, v in TINY.items() if k not in ("models", "data")}
    (tmp_path / "tiny.json").write_text(json.dumps(settings))
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "sntfx", "study", "--model",
                          "sntfx:cnn", "--data", "synthetic", "--methods", "adam,snt-linear", "--seeds", "0",
                          "--no-onnx", "--config", str(tmp_path / "tiny.json"), "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [len(r["train"]["history"]) for r in results["runs"]] == [2, 2]
    assert (out / "report.md").is_file()


@pytest.mark.parametrize("field,value,match", [
    ("bits", [10], "weight bits must be an integer from 2 to 8"),  # the quantize pass's own check
    ("act_bits", [[8, 2]], "activation bits must be an integer from 4 to 8"),
    ("sparsities", [1.2], r"sparsity must be in \[0, 1\)"),  # the prune pass's own check
    ("channel_sparsities", [0.3, 0.3], "twice"),
    ("epochs", "three", "wrong type"),
    ("lr", float("nan"), "wrong type|finite"),
    ("weight_decay", -1.0, "non-negative"),
    ("budget", "lots", "budget must be a fraction"),
    ("memory_budget", -0.1, "memory_budget must be a fraction"),
    ("eval_images", 0, "eval_images must be at least 1 \\(or leave it out\\), got 0"),
    ("limit_batches", -2, "limit_batches must be at least 1"),
    ("trace_samples", 0, "trace_samples must be at least 1"),
    ("landscape_steps", 1, "landscape_steps must be at least 2"),
    ("sharpness_batch_size", 0, "sharpness_batch_size must be at least 1"),
    ("bench_batch_sizes", [1, 0], "bench_batch_sizes must list batch sizes of at least 1"),
    ("bench_batch_sizes", [], "bench_batch_sizes must list"),
])
def test_study_settings_are_checked_by_the_passes_before_anything_runs(field, value, match):
    with pytest.raises(SntfxError, match=match):
        StudyConfig(**{field: value})


def test_every_quantization_setting_is_deployed_and_agrees_with_the_simulation(tiny_study):
    """The onnx stage ships each W/A setting of the sweep as QDQ ONNX and runs it on ONNX Runtime."""
    out, _ = tiny_study
    results = json.loads((out / "results.json").read_text())
    settings = {f"W{w}A{a}" for w, a in results["config"]["act_bits"]}
    for run in results["runs"]:
        deployed = run["onnx"]["deployed"]
        assert set(deployed) == settings
        for d in deployed.values():
            assert 0 <= d["onnxruntime"] <= 1 and d["images"] >= 1
        w8a8 = deployed.get("W8A8")
        if w8a8:  # identical grids, the same images: the same accuracy up to a rounding flip or two
            assert abs(w8a8["onnxruntime"] - w8a8["simulated"]) <= 2 / w8a8["images"] + 1e-9
        assert run["onnx"]["int8"]["integer_ops"].get("total", 0) > 0
        assert sum(run["onnx"]["int8"]["qdq_weights"].values()) >= 1  # which weight container was shipped
    assert "Simulated vs deployed quantization" in (out / "report.md").read_text()


def test_the_time_left_estimate_uses_step_costs_measured_on_the_studied_model(tmp_path):
    """Before training, each method's step is timed against Adam's on the study's own model, batch and device; the
    progress weights use those ratios (SAM's two passes cost clearly more than one), and nothing is re-measured
    for runs whose training is stored with its weights."""
    config = StudyConfig(**{**TINY, "methods": ["adam", "sam", "snt-linear"], "seeds": [0], "epochs": 1})
    study = Study(config, tmp_path / "s")
    runs = study.runs()
    costs = study.measure_step_costs(runs)
    assert set(costs) == {("sntfx:cnn", "sam"), ("sntfx:cnn", "snt-linear")}
    assert costs[("sntfx:cnn", "sam")] > 1.3 and costs[("sntfx:cnn", "snt-linear")] > 0
    sam = next(r for r in runs if r.method.name == "sam")
    steps = study._steps_per_epoch() * config.epochs
    assert study._weights(sam, costs)["train"] == pytest.approx(steps * costs[("sntfx:cnn", "sam")])
    assert study._weights(sam)["train"] == pytest.approx(steps * 2.0)  # no measurement: the declared figure
    for run in runs:  # stored training without its weights (and unmeasured): it trains again
        run.path.mkdir(parents=True, exist_ok=True)
        (run.path / "train.json").write_text(json.dumps({"settings": study.stage_settings("train")}))
    assert set(study.measure_step_costs(runs)) == set(costs)
    for run in runs:  # stored training with its weights: nothing left to measure
        (run.path / "model.pt").write_bytes(b"")
    assert study.measure_step_costs(runs) == {}


def test_the_study_builds_its_snt_models_under_both_budgets(tmp_path, monkeypatch):
    """The study hands its budgets to the snt pass: a zero memory budget leaves every online block plain;
    'none' for the budget sets no limit of either kind, whatever memory_budget says."""
    from sntfx.blocks import SNTBlock
    from sntfx.passes import snt_expand

    monkeypatch.setattr(snt_expand, "MIN_HELD", 0)  # the tiny model's blocks would fit in the floor

    def blocks(**budgets):
        study = Study(StudyConfig(**TINY, methods=["adam", "snt-linear"], seeds=[0], onnx=False, **budgets), tmp_path)
        run = next(r for r in study.runs() if r.method.snt)
        return sum(isinstance(m, SNTBlock) for m in study._build(run).modules())

    assert StudyConfig(budget="none", memory_budget=0.2).memory_budget is None
    assert StudyConfig(memory_budget="None").memory_budget is None and StudyConfig().memory_budget == 0.25
    unlimited = blocks(budget="none", memory_budget=0.0)
    assert unlimited > 0 and blocks(budget=0.1, memory_budget=0.0) == 0
    assert blocks(budget=0.1, memory_budget="none") >= 1


def _benchmark_script(name):
    """A committed research command under benchmarks/, imported as a module."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_candidate_rule_ranks_styles_by_their_mean_primary_score_over_the_screens(tmp_path, capsys):
    """benchmarks/rank_candidates.py: qa-branch is kept whatever it scores; the others are ranked by the mean of
    the two primary scores, averaged over the screens each ran in; results read on the test split are refused."""
    rank = _benchmark_script("rank_candidates")

    def screen(name, scores, split="val"):
        primary = {m: {"pruning score": {"mean": p}, "quantization score": {"mean": q}} for m, (p, q) in scores.items()}
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"config": {"evaluate_on": split},
                                    "summary": {"m": {"primary_scores": primary}}}))
        return str(path)

    one = screen("one", {"sam": (0.5, 0.5), "snt-qa-branch": (-0.1, -0.1), "snt-powerprop": (0.04, 0.0),
                         "snt-lin-branch": (0.01, 0.01)})
    two = screen("two", {"snt-qa-branch": (0.2, 0.2), "snt-powerprop": (-0.04, -0.04), "snt-lin-branch": (0.0, 0.0),
                         "snt-linear": (0.03, 0.01)})
    # means: powerprop (0.02 + -0.04) / 2 = -0.01, lin-branch 0.005, linear 0.02 (one screen only)
    assert rank.main([one, two]) == ["snt-qa-branch", "snt-linear", "snt-lin-branch"]
    assert "sam" not in capsys.readouterr().out.split("candidates")[0].split()  # only SNT methods are ranked
    with pytest.raises(SystemExit, match="validation"):
        rank.main([screen("test", {"snt-linear": (0.1, 0.1)}, split="test")])


def test_the_schedule_rule_picks_the_first_epoch_within_the_tolerance_of_adams_best(tmp_path, capsys):
    """benchmarks/confirmation_epochs.py: per model, the first epoch whose validation accuracy (mean over Adam's
    seeds) is within 0.3 points of the curve's best; other methods are ignored; the test split is refused."""
    rule = _benchmark_script("confirmation_epochs")

    def curve(name, runs, split="val"):
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"config": {"evaluate_on": split}, "runs": [
            {"model": model, "method": method, "train": {"history": [{"test_accuracy": a} for a in accs]}}
            for model, method, accs in runs]}))
        return str(path)

    vgg = curve("vgg", [("m:vgg", "adam", [0.80, 0.900, 0.9040, 0.9060, 0.9050]),
                        ("m:vgg", "sam", [0.99, 0.99, 0.99, 0.99, 0.99])])
    # two seeds: mean curve 0.85, 0.896, 0.900, 0.899; epoch 2 is 0.4 points below the best, so epoch 3
    res = curve("res", [("m:res", "adam", [0.84, 0.896, 0.901, 0.899]), ("m:res", "adam", [0.86, 0.896, 0.899, 0.899])])
    assert rule.main([vgg, res]) == {"m:vgg": 3, "m:res": 3}
    assert "within 0.3 points from epoch 3" in capsys.readouterr().out
    assert rule.main([vgg, "--tolerance", "2"]) == {"m:vgg": 2}
    with pytest.raises(SystemExit, match="validation"):
        rule.main([curve("test", [("m:vgg", "adam", [0.9])], split="test")])
    with pytest.raises(SystemExit, match="different lengths"):
        rule.main([curve("cut", [("m:vgg", "adam", [0.9, 0.91]), ("m:vgg", "adam", [0.9])])])


def test_the_default_rule_takes_the_candidate_meeting_the_goal_else_the_best_one_that_keeps_float_accuracy(tmp_path,
                                                                                                          capsys):
    """benchmarks/choose_default.py: the goal needs both primary scores' intervals above zero, best-setting gains
    of 2 / 5.4 points where Adam loses 5 points, float accuracy not hurt and a measured step at most 1.10x Adam;
    a candidate meeting it on every model is the default even against a higher-scoring one that does not;
    without one, the best mean primary score among those whose float accuracy is not hurt; the test split is
    refused."""
    choose = _benchmark_script("choose_default")

    def stat(mean, half=0.01, n=5):
        return {"mean": mean, "std": 0.0, "n": n, "ci95": [mean - half, mean + half]}

    def summary(methods):
        adam = {"float": {"mean": 0.90}, "wanda:0.7": {"mean": 0.80}, "W3": {"mean": 0.70}, "W8": {"mean": 0.899}}
        gains, primary = {}, {}
        for method, (prune, quant, best_prune, best_quant, float_gain) in methods.items():
            gains[method] = {"float": stat(float_gain), "wanda:0.7": stat(best_prune), "W3": stat(best_quant),
                             "W8": stat(0.5)}  # W8: Adam loses nothing there, so it is no best setting
            primary[method] = {"pruning score": stat(prune), "quantization score": stat(quant)}
        return {"metrics": {"adam": adam}, "gains_over_adam": gains, "primary_scores": primary}

    def results(name, per_model, split="val"):
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"config": {"evaluate_on": split},
                                    "summary": {m: summary(methods) for m, methods in per_model.items()}}))
        return str(path)

    good = (0.03, 0.06, 0.03, 0.06, 0.0)
    better_but_slow = (0.05, 0.08, 0.05, 0.08, 0.0)
    costs = tmp_path / "steps.json"
    costs.write_text(json.dumps({"results": {m: {"variants": {
        "adam": {"time_vs_adam": 1.0}, "snt linear online": {"time_vs_adam": 1.05},
        "snt qa-branch explicit": {"time_vs_adam": 1.8}}} for m in ("a", "b")}}))
    path = results("goal", {"sntfx:a": {"snt-linear": good, "snt-qa-branch": better_but_slow},
                            "sntfx:b": {"snt-linear": good, "snt-qa-branch": better_but_slow}})
    assert choose.main([path, "--step-costs", str(costs)]) == ("snt-linear", "meets the goal on every model")
    out = capsys.readouterr().out
    assert "step 1.80x Adam" in out and "a screen" not in out
    # without the cost file no cost is measured, so nothing meets the goal: the higher mean score wins
    method, why = choose.main([path])
    assert method == "snt-qa-branch" and "no candidate meets the goal" in why
    assert "step cost not measured" in capsys.readouterr().out
    # a best setting 1.9 points up is not enough, and a float interval below zero rules a candidate out
    short = (0.03, 0.06, 0.019, 0.06, 0.0)
    hurts = (0.09, 0.09, 0.09, 0.09, -0.02)
    path = results("none", {"sntfx:a": {"snt-linear": short, "snt-lin-branch": hurts},
                            "sntfx:b": {"snt-linear": good, "snt-lin-branch": good}})
    assert choose.main([path, "--step-costs", str(costs)])[0] == "snt-linear"
    out = capsys.readouterr().out
    assert "best pruning gain +1.90 < +2.0" in out and "float accuracy hurts" in out
    # SAM is a reference row: its goal test is shown, and however well it does it is never the default
    path = results("sam", {"sntfx:a": {"snt-linear": short, "sam": better_but_slow},
                           "sntfx:b": {"snt-linear": good, "sam": better_but_slow}})
    assert choose.main([path, "--step-costs", str(costs)])[0] == "snt-linear"
    sam_rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| sntfx:a | sam |")]
    assert len(sam_rows) == 1 and "reference, no: step cost not measured" in sam_rows[0]
    with pytest.raises(SystemExit, match="validation"):
        choose.main([results("test", {"sntfx:a": {"snt-linear": good}}, split="test")])


def _bench_file(path, results, **header):
    path.write_text(json.dumps({"device": "cpu", "torch": "x", "threads": 2, "rounds": 5, "steps": 1,
                                "memory_only": False, **header, "results": results}))
    return path


def test_the_step_cost_table_merges_timing_and_memory_runs_and_bolds_online_styles_over_the_goal(tmp_path, capsys):
    """benchmarks/train_step_table.py: one row per model from a timing run and a memory-only run; a later file's
    measurement of the same variant wins; only online variants above the goal are bold; absent cells are '-'."""
    table = _benchmark_script("train_step_table")

    def timed(ratio, q=(0.9, 1.2)):
        return {"median_ms": 10.0, "time_vs_adam": ratio, "ratio_quartiles": list(q)}

    times = _bench_file(tmp_path / "t.json", {
        "smallvgg": {"batch": 128, "variants": {"adam": timed(1.0), "snt linear online": timed(1.13),
                                                "snt qa-branch explicit": timed(1.74), "sam": timed(2.0),
                                                "snt lin-branch online": timed(1.1004)}},
        "resnet8": {"batch": 64, "variants": {"adam": timed(1.0), "snt linear online": timed(1.05)}}})
    memory = _bench_file(tmp_path / "m.json", {
        "smallvgg": {"batch": 128, "variants": {
            "adam": {"held_vs_adam": 1.0, "memory_vs_adam": 1.0},
            "snt linear online": {"held_vs_adam": 1.1, "memory_vs_adam": 1.38}}}}, memory_only=True)
    assert table.main([str(times), str(memory)]) == 0
    out = capsys.readouterr().out
    time_row, memory_row = [line for line in out.splitlines() if line.startswith("| smallvgg (128)")]
    assert "| **1.13** (0.90-1.20) |" in time_row and "| 1.74 (0.90-1.20) |" in time_row  # explicit: not bold
    assert "| 2.00 (0.90-1.20) |" in time_row
    assert time_row.endswith("| 1.10 (0.90-1.20) |")  # bold only above the goal as shown, not 1.1004
    assert memory_row == "| smallvgg (128) | 1.10 (1.38) |"  # Adam is not a column; only measured variants are
    resnet8 = next(line for line in out.splitlines() if line.startswith("| resnet8 (64)"))
    assert resnet8 == "| resnet8 (64) | 1.05 (0.90-1.20) | - | - | - |"  # only linear was measured there
    later = _bench_file(tmp_path / "later.json", {
        "smallvgg": {"batch": 128, "variants": {"snt linear online": timed(1.02, (1.0, 1.04))}}})
    assert table.main([str(times), str(later)]) == 0
    assert "| 1.02 (1.00-1.04) |" in capsys.readouterr().out


@pytest.mark.parametrize("content", ["not json", json.dumps({"device": "cpu"}),
                                     json.dumps({"results": {"smallvgg": {"variants": {"adam": 1.0}}}}),
                                     json.dumps({"results": {"smallvgg": {"batch": 1, "variants": {"adam": {}}}}})])
def test_the_step_cost_table_refuses_a_file_that_is_not_a_results_file(tmp_path, capsys, content):
    table = _benchmark_script("train_step_table")
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert table.main([str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "bad.json" in captured.err and "Traceback" not in captured.err


def test_the_step_benchmark_writes_its_results_atomically_honouring_the_umask(tmp_path):
    bench = _benchmark_script("bench_train_step")
    target = tmp_path / "r.json"
    old = os.umask(0o027)
    try:
        bench._write_json(target, {"results": {"m": 1}})
        bench._write_json(target, {"results": {"m": 2}})
    finally:
        os.umask(old)
    assert json.loads(target.read_text()) == {"results": {"m": 2}}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind
    assert target.stat().st_mode & 0o777 == 0o640


def test_the_power_analysis_matches_a_simulated_paired_t_test_and_refuses_the_test_split(tmp_path, capsys):
    """benchmarks/power.py: the noncentral-t power of the study's "helps" rule agrees with simulated paired t tests;
    the detectable gain is where that power reaches 80%; more seeds are needed for smaller gains; the interval's
    half-width is the study's own; test-split results are refused."""
    import numpy as np

    from sntfx.study import confidence_interval

    power = _benchmark_script("power")
    rng = np.random.default_rng(0)
    for effect, sd, n in [(1.0, 1.0, 5), (0.5, 1.0, 10), (2.0, 3.0, 3)]:
        gains = rng.normal(effect, sd, size=(40000, n))
        lo = [confidence_interval(float(g.mean()), float(g.std(ddof=1)), n)[0] for g in gains[:2000]]
        tstat = gains.mean(1) / (gains.std(1, ddof=1) / np.sqrt(n))
        from scipy.stats import t as student

        rejects = np.abs(tstat) > student.ppf(0.975, n - 1)
        assert power.power(effect, sd, n) == pytest.approx(rejects.mean(), abs=0.01)
        assert np.mean(np.array(lo) > 0) == pytest.approx(rejects[:2000].mean(), abs=0.005)  # the same rule
    mde = power.detectable(0.02, 5)
    assert power.power(mde, 0.02, 5) == pytest.approx(0.80, abs=1e-6) and power.power(0.9 * mde, 0.02, 5) < 0.8
    assert power.seeds_needed(0.01, 0.02) > power.seeds_needed(0.02, 0.02) >= 2
    assert power.seeds_needed(0.02, 0.004) == 3  # large gains against a small spread: far in the t tail, no NaN
    assert power.power(0.0, 0.02, 5) == pytest.approx(0.05, abs=1e-6)  # no gain: the test's own 5%
    assert power.power(0.01, 0.02, power.seeds_needed(0.01, 0.02)) >= 0.8
    assert power.power(0.01, 0.02, power.seeds_needed(0.01, 0.02) - 1) < 0.8

    def results(split, gains):
        stat = {"mean": float(np.mean(gains)), "std": float(np.std(gains, ddof=1)), "n": len(gains)}
        path = tmp_path / split / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"config": {"evaluate_on": split}, "summary": {"m": {"primary_scores": {
            "snt-linear": {"pruning score": stat, "quantization score": stat}}}}}))
        return str(path)

    gains = [0.01, -0.02, 0.03, 0.0, 0.015]
    rows = power.main([results("val", gains), "--effect", "2", "--out", str(tmp_path / "p.json")])
    ci = confidence_interval(float(np.mean(gains)), float(np.std(gains, ddof=1)), 5)
    assert len(rows) == 2 and rows[0]["ci95_upper"] == pytest.approx(ci[1])
    assert rows[0]["seeds_for_effect"] == power.seeds_needed(0.02, float(np.std(gains, ddof=1)))
    assert json.loads((tmp_path / "p.json").read_text())["rows"] == rows
    with pytest.raises(SystemExit, match="validation"):
        power.main([results("test", gains)])


def test_the_mechanism_analysis_correlates_each_run_s_drop_and_separates_between_from_within_methods(tmp_path):
    """benchmarks/mechanism.py: a run's drop is its sweep float accuracy minus the mean over the primary score's
    settings; across runs the rank correlation sees the methods' difference, within methods (centred) only the
    seed-to-seed relation, here of the opposite sign; the interval is Fisher's z with 1.06 / (n - 3); a constant
    measurement has no correlation; test-split results are refused with exit 2."""
    import math

    mech = _benchmark_script("mechanism")

    def record(method, seed, crest, quant_drop, eig):
        acc = 0.9
        q = acc - quant_drop
        return {"model": "m", "method": method, "seed": seed,
                "evaluate": {"float_accuracy": acc, "weights": {"crest_factor": crest, "kurtosis": 1.0},
                             "sharpness": {"top_eigenvalue": eig, "hessian_trace": 1.0, "sam_sharpness": 0.1,
                                           "loss": 0.2}},
                "sweep": {"float": acc, "sparsity": {}, "channel_sparsity": {}, "bits": {"4": q + 0.01, "3": q - 0.01},
                          "act_bits": {"W4A8": q + 0.02, "W6A6": q - 0.02},
                          "wanda": {"0.5": 0.89, "0.7": 0.85 - 0.001 * seed, "2:4": 0.8}}}

    # method b: higher crest factor and larger drops than adam; inside each method, the drop falls as crest rises
    crests = {"adam": [3.0 + 0.01 * s for s in range(5)], "b": [4.0 + 0.013 * s * s for s in range(5)]}
    runs = [record("adam", s, c, 0.02 - 0.1 * (c - 3.0), 100 + 7 * (s % 3)) for s, c in enumerate(crests["adam"])]
    runs += [record("b", s, c, 0.06 - 0.1 * (c - 4.0), 90 + 5 * (s % 2)) for s, c in enumerate(crests["b"])]

    def write(split):
        path = tmp_path / split / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"config": {"evaluate_on": split}, "runs": runs}))
        return str(path)

    table = mech.run_table({"runs": runs})["m"]
    assert table[1]["quantization drop"] == pytest.approx(0.019) and table[1]["pruning drop"] == pytest.approx(
        0.9 - (0.89 + 0.849 + 0.8) / 3)
    rows = mech.main([write("val"), "--out", str(tmp_path / "mech")])
    by = {(r["drop"], r["measurement"]): r for r in rows}
    crest = by[("quantization drop", "weights:crest_factor")]
    assert crest["across_runs"]["rho"] > 0.5 and crest["within_methods"]["rho"] == pytest.approx(-1.0)
    assert crest["within_methods"]["n_eff"] == 9
    lo, hi = crest["across_runs"]["ci95"]
    z, half = math.atanh(crest["across_runs"]["rho"]), 1.959964 * math.sqrt(1.06 / 7)
    assert (lo, hi) == (pytest.approx(math.tanh(z - half), abs=1e-6), pytest.approx(math.tanh(z + half), abs=1e-6))
    assert by[("pruning drop", "sharpness:hessian_trace")]["across_runs"]["rho"] is None  # constant: no correlation
    assert json.loads((tmp_path / "mech.json").read_text())["rows"] == json.loads(json.dumps(rows))
    assert "weights:crest_factor" in (tmp_path / "mech.md").read_text() and (tmp_path / "mech.png").stat().st_size
    with pytest.raises(SystemExit) as refused:
        mech.main([write("test")])
    assert refused.value.code == 2


def test_the_final_table_lays_out_every_method_s_accuracy_and_gains_on_one_split_and_chooses_nothing(tmp_path,
                                                                                                    capsys):
    """benchmarks/final_table.py: per model and method, the float accuracy and each primary score's accuracy (each
    run's mean over the score's settings, then the mean over seeds with its t interval); the default named on the
    command line is marked; the gains table is choose_default's, with SAM as the reference; files of different
    splits, an unknown default and a file that is not a study's results are refused with exit 2."""
    import statistics

    from sntfx.study import PRIMARY_SCORES, confidence_interval

    final = _benchmark_script("final_table")

    def record(method, seed, shift):
        acc = 0.90 + shift + 0.001 * seed
        return {"model": "sntfx:m", "method": method, "seed": seed,
                "evaluate": {"float_accuracy": acc, "sharpness": {"top_eigenvalue": 1.0, "hessian_trace": 1.0,
                                                                  "sam_sharpness": 0.1, "loss": 0.2}},
                "sweep": {"float": acc, "sparsity": {}, "channel_sparsity": {}, "bits": {"4": acc - 0.03,
                                                                                          "3": acc - 0.10 - 0.01 * seed},
                          "act_bits": {"W4A8": acc - 0.02, "W6A6": acc - 0.01},
                          "wanda": {"0.5": acc - 0.01, "0.7": acc - 0.05 + 0.002 * seed, "2:4": acc - 0.04}}}

    runs = [record(m, s, shift) for m, shift in (("adam", 0.0), ("sam", 0.01), ("snt-linear", -0.005))
            for s in range(3)]
    stat = {"mean": 0.01, "std": 0.001, "n": 3, "ci95": [0.005, 0.015]}
    summary = {"sntfx:m": {"metrics": {"adam": {"float": {"mean": 0.90}, "W3": {"mean": 0.80}}},
                           "gains_over_adam": {m: {"float": stat, "W3": stat} for m in ("sam", "snt-linear")},
                           "primary_scores": {m: {n: stat for n in PRIMARY_SCORES} for m in ("sam", "snt-linear")}}}

    def write(name, split="test"):
        path = tmp_path / name
        path.write_text(json.dumps({"config": {"evaluate_on": split}, "runs": runs, "summary": summary}))
        return str(path)

    out = final.main([write("results.test.json"), "--default", "snt-linear"])
    assert "(test split)" in out
    rows = [line for line in out.splitlines() if line.startswith("| sntfx:m |")]
    adam = next(r for r in rows if r.startswith("| sntfx:m | adam |"))
    per_run = [statistics.fmean(0.90 + 0.001 * s - d for d in (0.01, 0.05 - 0.002 * s, 0.04)) for s in range(3)]
    mean, ci = statistics.fmean(per_run), confidence_interval(statistics.fmean(per_run), statistics.stdev(per_run), 3)
    assert adam.split(" | ")[2:5] == ["3", "90.10 [89.85, 90.35]",
                                      f"{100 * mean:.2f} [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"]
    assert any(r.startswith("| sntfx:m | **snt-linear** (default) | 3 | 89.60 ") for r in rows)
    gains = [r for r in rows if "+1.00 [+0.50, +1.50]" in r]
    assert len(gains) == 2 and any("reference, no" in r for r in gains)  # SAM's row is the reference
    for argv, says in [([write("a.json"), write("b.json", split="val")], "different splits"),
                       ([write("c.json"), "--default", "snt-nope"], "no such method"),
                       ([str(tmp_path)], "not a study's results file")]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as refused:
            final.main(argv)
        captured = capsys.readouterr()
        assert refused.value.code == 2 and says in captured.err and captured.out == ""
