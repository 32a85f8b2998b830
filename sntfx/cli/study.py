"""``study``: Adam vs SAM vs SNT end to end, in one resumable report."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from ..errors import SntfxError
from .app import cli, console
from .console import StudyProgress, study_progress
from .options import BUDGET, NON_NEGATIVE, POSITIVE, TEXT, exclude_option, given


@cli.command()
@click.option("--preset", type=click.Choice(["quick", "paper"]), default=None,
              help="quick: a small CNN on Fashion-MNIST (or digits), under 10 minutes on 2 CPU cores; "
                   "paper: CIFAR-10 with ResNet-20/56, VGG-16, MobileNetV2 and a small ViT, 3 seeds.")
@click.option("--model", "models", multiple=True, type=TEXT, help="Model spec (repeat, or separate with commas); "
              "default: the preset's, else sntfx:smallvgg.")
@click.option("--data", "data_name", default=None, help="Dataset name or ImageFolder directory.", type=TEXT)
@click.option("--data-dir", default=None, type=click.Path(exists=True, file_okay=False), help="Where the dataset's files are.")
@click.option("--methods", default=None, help="Comma-separated: adam, sam, snt-STYLE[-xRATIO][-fresh][+sam].", type=TEXT)
@click.option("--seeds", default=None, help="Comma-separated seeds, e.g. 0,1,2.", type=TEXT)
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--lr", type=POSITIVE, default=None)
@click.option("--optimizer", type=click.Choice(["adam", "adamw", "sgd"]), default=None,
              help="Base optimizer of every method (SAM wraps it) [adam].")
@click.option("--weight-decay", type=NON_NEGATIVE, default=None)
@click.option("--rho", type=POSITIVE, default=None, help="SAM radius.")
@click.option("--ratio", type=click.IntRange(min=1), default=None, help="SNT expansion ratio (default 4).")
@click.option("--budget", type=BUDGET, default=None,
              help="The snt pass's training-cost budget at --batch-size: a fraction, or 'none' to expand every "
                   "eligible layer (see `sntfx transform --help`) [0.1].")
@click.option("--memory-budget", type=BUDGET, default=None,
              help="With --budget: the snt pass's training-memory budget at --batch-size, a fraction of the plain "
                   "model's, or 'none' for no memory limit (see `sntfx transform --help`) [0.25].")
@click.option("--limit-batches", type=click.IntRange(min=1), default=None, help="Training batches per epoch.")
@click.option("--eval-images", type=click.IntRange(min=1), default=None,
              help="Images of the evaluated split for the compression sweeps and ONNX accuracy (default: all).")
@click.option("--val-images", type=click.IntRange(min=0), default=None,
              help="Hold this many training images out as a validation split (the same for every run); training "
                   "then reports its per-epoch accuracy on them.")
@click.option("--evaluate-on", type=click.Choice(["val", "test"]), default=None,
              help="Measure every accuracy after training on the validation split (for choices) or on the test split "
                   "(once, for the chosen configurations) [test]. Switching keeps the trained runs.")
@click.option("--seal-test/--no-seal-test", default=None,
              help="With --evaluate-on val: also measure the test split, into files the report does not read; "
                   "--evaluate-on test on the same folder then reads them without the trained weights.")
@exclude_option("Layers whose module name matches GLOB stay dense and in float in every compression setting")
@click.option("--onnx/--no-onnx", default=None, help="Export, verify and benchmark on ONNX Runtime (default on).")
@click.option("--provider", type=click.Choice(["auto", "tensorrt", "cuda", "cpu"]), default=None)
@click.option("--device", default=None, help="Training (and evaluation) device: auto, cpu, cuda, cuda:N.", type=TEXT)
@click.option("--workers", "num_workers", type=click.IntRange(min=0), default=None,
              help="Data-loader worker processes [0]; memory is pinned when a GPU is used.")
@click.option("--config", "config_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="TOML or JSON file setting any study field (sparsities, bits, sharpness_iters, ...); "
                   "command-line options override it, and it overrides the preset.")
@click.option("--out", "-o", default="study-results", show_default=True, type=click.Path(dir_okay=True, file_okay=False))
@click.option("--report-only", is_flag=True, help="Redraw report.md and the plots from OUT/results.json (this version's statistics over its runs; "
                   "nothing is measured again).")
@click.option("--trust-source", is_flag=True,
              help="Accept --model files (.pt) not saved by you on this machine that rebuild from Python code.")
def study(preset, models, data_name, data_dir, methods, seeds, epochs, batch_size, lr, optimizer, weight_decay, rho,
          ratio, budget, memory_budget, limit_batches, eval_images, val_images, evaluate_on, seal_test, exclude, onnx,
          provider, device, num_workers, config_file, out, report_only, trust_source):
    """Adam vs SAM vs SNT: train, fold, sweep pruning and quantization, export to ONNX, benchmark; one report.

    Resumable: run the same command again and finished stages are kept. Parallel: start the same command more
    than once (one process per core or per GPU) and they share the runs; the last to finish writes the report.
    """
    import os

    from ..study import Study, preset_config, validate_results

    out_dir = Path(out)
    if report_only:
        from ..study import write_report
        from ..study.stats import resummarize

        ctx = click.get_current_context()
        extra = [p.opts[0] for p in ctx.command.params if p.name not in ("report_only", "out") and given(p.name)]
        if extra:
            raise SntfxError(f"--report-only redraws the report from OUT/results.json, so {', '.join(extra)} would "
                             "be ignored: drop them, or run the study without --report-only")

        path = out_dir / "results.json"
        if not path.is_file():
            raise SntfxError(f"no results in '{out_dir}' (results.json is missing); run the study first")
        results = resummarize(json.loads(path.read_text()))  # this version's statistics over the stored runs
        validate_results(results)
        console.print(f"report: [bold]{write_report(results, out_dir)}[/]")
        return
    from ..study import read_config_file

    overrides = read_config_file(config_file) if config_file else {}
    from_cli = {"models": [m for spec in models for m in spec.split(",") if m] or None, "data": data_name,
             "data_dir": data_dir, "methods": methods, "seeds": seeds, "epochs": epochs,
             "batch_size": batch_size, "lr": lr, "optimizer": optimizer, "weight_decay": weight_decay, "rho": rho,
             "ratio": ratio, "budget": "none" if budget is None and given("budget") else budget,
             "memory_budget": "none" if memory_budget is None and given("memory_budget") else memory_budget,
             "limit_batches": limit_batches, "eval_images": eval_images, "val_images": val_images,
             "evaluate_on": evaluate_on, "seal_test": seal_test, "exclude": list(exclude) or None, "onnx": onnx,
             "provider": provider, "device": device, "num_workers": num_workers}
    overrides |= {k: v for k, v in from_cli.items() if v is not None}  # the command line wins over the file
    config = preset_config(preset, overrides)
    if out_dir.exists() and not out_dir.is_dir():
        raise SntfxError(f"--out '{out_dir}' is a file; give a directory")
    if not out_dir.resolve().parent.is_dir():
        raise SntfxError(f"the folder that would hold --out '{out_dir}' does not exist; create it first or choose "
                         "another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "study.json").exists():
        raise SntfxError(f"--out '{out_dir}' exists and does not hold an sntfx study; choose a new or empty folder")
    rank = int(os.environ.get("RANK", "0"))
    runner = Study(config, out_dir, trust_source=trust_source)
    runner.check()
    if rank == 0:
        console.print(f"[bold]sntfx study[/]: {', '.join(config.models)} on {config.data}; methods "
                      f"{', '.join(config.methods)}; seeds {', '.join(map(str, config.seeds))}; {config.epochs} "
                      f"epoch(s) -> {out_dir}", highlight=False)
        with study_progress() as progress:
            runner.progress = StudyProgress(progress)
            results = runner.run()
    else:
        runner.run()
        return
    if results is None:
        console.print(f"{len(runner.held)} run(s) are still being computed by another process sharing '{out_dir}' "
                      f"({', '.join(r.label for r in runner.held[:3])}{', ...' if len(runner.held) > 3 else ''}); "
                      "the last process to finish writes the report (or run this command again once they are done)",
                      highlight=False)
        return
    planned = (4 if config.onnx else 3) * len(runner.runs())
    if len(runner.executed) < planned:
        console.print(f"{planned - len(runner.executed)} stage(s) were already stored (by an earlier run, or by "
                      "another process sharing this folder) and were kept")
    print_study_summary(results)
    console.print(f"report: [bold]{out_dir / 'report.md'}[/]  (plots in {out_dir / 'plots'}, "
                  f"every number in {out_dir / 'results.json'})")


def print_study_summary(results: dict) -> None:
    from ..study import PRIMARY_SCORES, short_verdict

    split = "validation" if results["dataset"].get("evaluated_on") == "val" else "test"
    for model, summary in results["summary"].items():
        table = Table(title=f"{model} on {results['dataset']['name']} ({split} split): accuracy gained over Adam "
                            "(points, mean [95% CI] over seeds; 'helps' = interval above zero)", show_edge=False)
        scores = list(PRIMARY_SCORES)
        for col in ("method", "float acc", *scores, "time/epoch"):
            table.add_column(col)
        for method, metrics in summary["metrics"].items():
            primary = (summary.get("primary_scores") or {}).get(method, {})
            acc = metrics.get("float", {})
            t = metrics.get("epoch_time_vs_adam", {})
            table.add_row(method, f"{100 * acc['mean']:.2f}%" if acc.get("mean") is not None else "n/a",
                          *(["-"] * len(scores) if method == "adam" else [short_verdict(primary.get(s)) for s in scores]),
                          f"{t['mean']:.2f}x" if t.get("mean") is not None else "n/a")
        console.print(table)
