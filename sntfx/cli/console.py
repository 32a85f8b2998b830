"""Console rendering shared by the commands: progress bars, pass reports and listings, number formatting."""

from __future__ import annotations

from rich.table import Table

from .app import console, err_console


class TrainProgress:
    """A progress bar per epoch: throughput, loss; a line per finished epoch."""

    def __init__(self, progress, rank: int, split: str = "test"):
        self.progress, self.rank, self.task, self.split = progress, rank, None, split

    def on_epoch_start(self, epoch, steps):
        if self.rank == 0:
            self.task = self.progress.add_task(f"epoch {epoch + 1}", total=steps, loss=float("nan"), rate=0.0)

    def on_step(self, epoch, step, loss, samples_per_s):
        if self.task is not None:
            self.progress.update(self.task, completed=step, loss=loss, rate=samples_per_s)

    def on_epoch_end(self, record):
        if self.rank != 0:
            return
        self.progress.remove_task(self.task)
        self.task = None
        test = f"  {self.split[:3]} acc {record['test_accuracy']:.2%}" if "test_accuracy" in record else ""
        self.progress.console.print(
            f"epoch {record['epoch']:>3}  loss {record['train_loss']:.4f}  train acc {record['train_accuracy']:.2%}"
            f"{test}  {record['samples_per_s']:.0f} samples/s  {record['seconds']:.1f}s", highlight=False)


def train_progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.0f} samples/s"),
                    TimeRemainingColumn(), console=err_console, transient=True)


class StudyProgress:
    """One bar across the whole study (time left from the work done so far) and the current stage."""

    def __init__(self, progress):
        self.progress, self.task, self.runs = progress, None, 0

    def begin(self, total, runs):
        self.runs = runs
        self.task = self.progress.add_task("study", total=total)

    def stage(self, index, run, stage):
        self.progress.update(self.task, description=f"[{index + 1}/{self.runs}] {run}: {stage}")

    def advance(self, amount):
        self.progress.advance(self.task, amount)


def study_progress():
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                    TextColumn("left"), TimeRemainingColumn(), console=console, transient=False)


def fmt_int(v: int | None) -> str:
    if v is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return str(v)


def print_pass_report(report) -> None:
    table = Table(show_edge=False)
    for col in ("pass", "time", "nodes", "params", "modified"):
        table.add_column(col)
    for p in report.passes:
        table.add_row(p.spec, f"{p.seconds:.2f}s", f"{p.nodes_before} -> {p.nodes_after}",
                      f"{p.params_before:,} -> {p.params_after:,}", "yes" if p.modified else "no")
    console.print(table)
    for p in report.passes:
        for key, value in sorted(p.stats.items()):
            console.print(f"  {p.name}: {key}: {value}", highlight=False, soft_wrap=True)


def passes_table() -> Table:
    """The registered passes: what each requires and provides, its summary and its parameters with defaults."""
    from ..pass_base import pass_parameters, registered_passes

    table = Table(title="registered passes (in --passes strings: name(key=value,...),name2)")
    table.add_column("name", no_wrap=True)
    for col in ("requires", "provides", "summary", "parameters (defaults)"):
        table.add_column(col, overflow="fold")
    for name, cls in registered_passes().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        needs = sorted(p.value for p in cls.requires) + (["eval mode"] if cls.needs_eval else [])
        params = pass_parameters(cls)
        table.add_row(name, ", ".join(needs) or "-", ", ".join(sorted(p.value for p in cls.provides)) or "-", doc,
                      "any" if params is None else ", ".join(params.values()) or "-")
    return table
