"""The ``sntfx`` command line. The CLI alone writes to the console.

Commands: ``study`` (the whole experiment), ``transform``, ``passes``,
``fold``, ``inspect``, ``train``, ``sharpness``, ``prune``, ``quantize``,
``sweep``, ``export``, ``bench``. Every command that writes a
file writes it atomically and never over one of its inputs; on bad input it
prints one paragraph saying what is wrong and how to fix it, and exits 2.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from . import __version__
from .blocks import get_style, style_names
from .errors import SntfxError

console = Console()
err_console = Console(stderr=True)

__all__ = ["main", "cli"]


def _one_paragraph(message: str) -> str:
    return " ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())


def _fail(message: str) -> None:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(_one_paragraph(message))}", highlight=False, soft_wrap=True)
    sys.exit(2)


def handle_errors(fn):
    """Turn sntfx errors into a one-paragraph message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SntfxError as exc:
            _fail(str(exc))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            _fail(f"{exc.strerror or exc}: '{exc.filename}'")

    return wrapper


class SntfxGroup(click.Group):
    """The command group: usage errors as one paragraph (exit 2), unexpected errors without a traceback.

    Click's own usage errors (bad types, out-of-range values, missing files)
    become the same ``error: ...`` paragraph as sntfx's errors. An exception
    sntfx did not anticipate is a bug: it is reported in one line with exit
    status 1, and ``-vv`` shows its traceback.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        verbose = sum(a in ("-vv", "-vvv") or a == "--verbose" for a in (args if args is not None else sys.argv[1:]))
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            _fail(exc.format_message() + hint)
        except click.exceptions.Abort:
            err_console.print("aborted")
            sys.exit(130)
        except click.exceptions.ClickException as exc:
            _fail(exc.format_message())
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback on the console
            from rich.markup import escape

            if verbose:
                raise
            err_console.print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {escape(_one_paragraph(exc)[:500])}. This is a bug in "
                "sntfx; please report it with the command you ran (add -vv to see the traceback).",
                highlight=False, soft_wrap=True)
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


class FiniteFloat(click.ParamType):
    """A float that must be finite, optionally within bounds."""

    name = "number"

    def __init__(self, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def convert(self, value, param, ctx):
        import math

        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        low_bad = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        high_bad = self.high is not None and (number >= self.high if self.high_open else number > self.high)
        if low_bad or high_bad:
            left = "(" if self.low_open else "["
            right = ")" if self.high_open else "]"
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            self.fail(f"{number:g} is not in {left}{lo}, {hi}{right}", param, ctx)
        return number


class Text(click.ParamType):
    """Free text that may not be blank (an empty --data or --model would otherwise mean "the default")."""

    name = "text"

    def convert(self, value, param, ctx):
        if not isinstance(value, str) or not value.strip():
            self.fail("an empty value is not allowed; give one or leave the option out", param, ctx)
        return value


TEXT = Text()
POSITIVE = FiniteFloat(0, low_open=True)
NON_NEGATIVE = FiniteFloat(0)
FRACTION = FiniteFloat(0, 1, high_open=True)


def _given(name: str) -> bool:
    """Whether the user set option ``name`` (on the command line or by environment), not its default."""
    from click.core import ParameterSource

    source = click.get_current_context().get_parameter_source(name)
    return source not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def _only_with(names: list[str], condition: bool, needs: str) -> None:
    """Refuse options that would be silently ignored unless ``condition`` holds."""
    ctx = click.get_current_context()
    unused = [n for n in names if _given(n)]
    if unused and not condition:
        opts = ", ".join(next(p.opts[0] for p in ctx.command.params if p.name == n) for n in unused)
        raise SntfxError(f"{opts} only appl{'ies' if len(unused) == 1 else 'y'} with {needs}, so "
                         f"{'it' if len(unused) == 1 else 'they'} would be ignored here: drop "
                         f"{'it' if len(unused) == 1 else 'them'} or add {needs}")


def trust_options(fn):
    """--trust-source and --model-file for commands that read a saved model."""
    fn = click.option("--trust-source", is_flag=True,
                      help="Rebuild a model whose file names Python code (a model.py or module) although it was "
                           "not saved by you on this machine: importing runs that code.")(fn)
    fn = click.option("--model-file", "source_file", default=None, type=click.Path(exists=True, dir_okay=False),
                      help="Rebuild from this model.py instead of the recorded one (naming it trusts it).")(fn)
    return fn


@click.group(cls=SntfxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sntfx")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """sntfx: train compression-friendly vision models with SNT on torch.fx."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)], force=True
    )


def _model_spec(model: str, entry: str | None, kwargs: str | None):
    from .models import ModelSpec

    return ModelSpec.parse(model, entry=entry, kwargs=_json_kwargs(kwargs))


def _inputs_for(path_or_spec: str) -> list[str]:
    return [path_or_spec.rsplit(":", 1)[0] if ".py:" in path_or_spec else path_or_spec]


@cli.command()
@click.argument("model", type=TEXT)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Output .pt file.")
@click.option("--style", type=click.Choice(style_names()), default=None,
              help="Expansion style [qa-branch]: " + "; ".join(f"{n}: {get_style(n).label}, "
                                                               f"{'trains online' if get_style(n).trains_online else 'trains in explicit form'}"
                                                               for n in style_names()) + ".")
@click.option("--ratio", type=click.IntRange(min=1), default=None, help="Expansion ratio for 'linear' [4].")
@click.option("--input-shape", default=None, help="Example input shape, e.g. 1,3,32,32.", type=TEXT)
@click.option("--entry", default=None, help="Factory name in model.py (default: build_model, model or get_model).", type=TEXT)
@click.option("--kwargs", default=None, help="JSON object of constructor arguments.", type=TEXT)
@click.option("--policy", type=click.Path(exists=True, dir_okay=False), default=None, help="Policy file (.json/.toml).")
@click.option("--preserve", is_flag=True, help="Start the blocks at exactly the original function.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--passes", "pipeline", default=None, type=TEXT,
              help='Run this pass pipeline instead, e.g. "snt(style=linear,ratio=4)" (see `sntfx passes`).')
@handle_errors
def transform(model, out, style, ratio, input_shape, entry, kwargs, policy, preserve, seed, pipeline):
    """Trace MODEL and expand its conv/linear layers into SNT blocks.

    MODEL is model.py (with build_model()), torchvision:NAME, timm:NAME or sntfx:NAME.
    """
    from .api import transform as do_transform
    from .io import check_output_path
    from .models import parse_input_shape
    from .serialization import save
    from .tracing import sntfx_meta

    out_path = check_output_path(out, _inputs_for(model) + ([policy] if policy else []))
    if ratio is not None and not policy and "ratio" not in get_style(style or "qa-branch").options:
        raise SntfxError(f"--ratio sets an expansion ratio; the '{style or 'qa-branch'}' style has none, so it "
                         "would be ignored: choose a style with a ratio (e.g. --style linear) or drop --ratio")
    spec = _model_spec(model, entry, kwargs)
    inputs = spec.example_inputs(parse_input_shape(input_shape) if input_shape else None)
    if pipeline and (style or ratio or policy or preserve):
        raise SntfxError("--passes replaces --style/--ratio/--policy/--preserve: put them in the pipeline, "
                         'e.g. --passes "snt(style=branch,preserve=true)"')
    if pipeline:
        from .pass_base import parse_pipeline

        pipeline = parse_pipeline(pipeline)  # bad strings fail before any work
    with console.status(f"tracing and expanding {spec} ..."):
        from .tracing import trace

        gm = trace(spec.build(), inputs)
        sntfx_meta(gm)["source"] = spec.to_dict()
    if pipeline:
        from .pass_base import PassContext
        from .pass_manager import PassManager

        report = PassManager(pipeline).run(gm, PassContext(example_inputs=inputs, seed=seed))
        gm = report.graph_module
    else:
        gm, report = do_transform(
            gm, inputs, style=style, ratio=ratio, policy=policy, preserve=preserve, seed=seed, report=True, inplace=True
        )
    _print_pass_report(report)
    opaque = sntfx_meta(gm).get("opaque_modules", [])
    if opaque:
        console.print(f"[yellow]kept opaque (not traced, not expanded):[/] {', '.join(opaque)}")
    save(gm, out_path)
    console.print(f"wrote [bold]{out_path}[/]")


@cli.command(name="passes")
def list_passes():
    """List the registered passes, what they require and provide, and their numerics."""
    from .pass_base import registered_passes

    table = Table(title="registered passes (in --passes strings: name(key=value,...),name2)")
    table.add_column("name", no_wrap=True)
    for col in ("requires", "provides", "summary"):
        table.add_column(col, overflow="fold")
    for name, cls in registered_passes().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        needs = sorted(p.value for p in cls.requires) + (["eval mode"] if cls.needs_eval else [])
        table.add_row(name, ", ".join(needs) or "-", ", ".join(sorted(p.value for p in cls.provides)) or "-", doc)
    console.print(table)


@cli.command()
@click.argument("model_file", metavar="SNT_MODEL", type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Output .pt file.")
@click.option("--batchnorm", is_flag=True, help="Also fold the model's own BatchNorms into the layers before them.")
@trust_options
@handle_errors
def fold(model_file, out, batchnorm, source_file, trust_source):
    """Fold every SNT block of SNT_MODEL back into its original layer, exactly."""
    from .api import fold as do_fold
    from .io import check_output_path
    from .serialization import load, save

    out_path = check_output_path(out, [model_file])
    with console.status(f"loading {model_file} ..."):
        gm = load(model_file, model_file=source_file, trust_source=trust_source)
    gm, report = do_fold(gm, batchnorm=batchnorm, report=True, inplace=True)
    _print_pass_report(report)
    info = report.passes[0].info
    if info.get("block_errors"):
        errs = sorted(info["block_errors"].values())
        console.print(
            f"per-block relative error over {len(errs)} blocks: max {errs[-1]:.2e} ({info['worst_block']}), "
            f"median {errs[len(errs) // 2]:.2e}"
        )
    save(gm, out_path)
    console.print(f"wrote [bold]{out_path}[/]")


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@trust_options
@click.option("--quant", "quant_bits", type=click.IntRange(2, 8), default=None, metavar="BITS",
              help="Quantization-readiness report at BITS-bit weights (folded models).")
@click.option("--data", "data_name", default=None, help="Real inputs for --quant sensitivities.", type=TEXT)
@click.option("--data-dir", default=None, type=click.Path(exists=True, file_okay=False))
@handle_errors
def inspect(file, source_file, trust_source, quant_bits, data_name, data_dir):
    """Show the layers of FILE: expansion, parameters and MACs before/after folding.

    FILE is a saved sntfx model, or a model spec (model.py, torchvision:NAME, ...).
    """
    from .serialization import load, read_recipe
    from .summary import layer_summary
    from .workflow import is_model_file

    _only_with(["data_name"], quant_bits is not None, "--quant BITS")
    _only_with(["data_dir"], data_name is not None, "--data NAME")
    saved = is_model_file(file)
    _only_with(["source_file", "trust_source"], saved, "a saved model file (.pt)")
    if saved:
        gm = load(file, model_file=source_file, trust_source=trust_source)
        recipe = read_recipe(file)
        source = recipe["source"]
        pipeline = ",".join(p["name"] for p in recipe["pipeline"]) or "(none)"
    else:
        from .api import trace

        gm = trace(file)
        source, pipeline = {"kind": "spec", "name": file}, "(none)"
    if quant_bits is not None:
        _quant_report(gm, quant_bits, data_name, data_dir, file)
        return
    rows = layer_summary(gm)
    table = Table(title=f"{file}: source {source.get('kind')}:{Path(source['name']).name}, passes {pipeline}")
    for col, just in (("layer", "left"), ("kind", "left"), ("expansion", "left"), ("params", "right"),
                      ("folded", "right"), ("MACs", "right"), ("folded", "right")):
        table.add_column(col, justify=just, overflow="fold")
    for r in rows:
        table.add_row(r.path, r.kind, r.expansion or "-", _fmt_int(r.params), _fmt_int(r.params_folded),
                      _fmt_int(r.macs), _fmt_int(r.macs_folded))
    total_params = sum(p.numel() for p in gm.parameters())
    folded_params = total_params - sum(r.params - r.params_folded for r in rows)
    macs = sum(r.macs or 0 for r in rows)
    macs_folded = sum(r.macs_folded or 0 for r in rows)
    table.add_section()
    table.add_row("whole model", "", f"{sum(bool(r.expansion) for r in rows)} expanded",
                  _fmt_int(total_params), _fmt_int(folded_params), _fmt_int(macs), _fmt_int(macs_folded))
    console.print(table)
    console.print("params and MACs: K = 1e3, M = 1e6, G = 1e9; MACs of conv/linear layers on the recorded input shape",
                  style="dim")


class _TrainProgress:
    """A progress bar per epoch: throughput, loss; a line per finished epoch."""

    def __init__(self, progress, rank: int):
        self.progress, self.rank, self.task = progress, rank, None

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
        test = f"  test acc {record['test_accuracy']:.2%}" if "test_accuracy" in record else ""
        self.progress.console.print(
            f"epoch {record['epoch']:>3}  loss {record['train_loss']:.4f}  train acc {record['train_accuracy']:.2%}"
            f"{test}  {record['samples_per_s']:.0f} samples/s  {record['seconds']:.1f}s", highlight=False)


def _world_size() -> int:
    import os

    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.0f} samples/s"),
                    TimeRemainingColumn(), console=err_console, transient=True)


@cli.command()
@click.argument("model", type=TEXT)
@click.option("--data", "data_name", required=True, help="digits, fashion-mnist, cifar10, cifar100, synthetic, or an ImageFolder dir.", type=TEXT)
@click.option("--data-dir", default=None, type=click.Path(exists=True, file_okay=False), help="Where the dataset's files are.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Output .pt file.")
@click.option("--optimizer", type=click.Choice(["adam", "sgd", "sam"]), default="adam", show_default=True)
@click.option("--sam-base", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True, help="Optimizer SAM wraps.")
@click.option("--rho", type=POSITIVE, default=0.05, show_default=True, help="SAM neighbourhood radius.")
@click.option("--adaptive", is_flag=True, help="Adaptive SAM (ASAM).")
@click.option("--lr", type=POSITIVE, default=None, help="Learning rate [1e-3 adam, 0.1 sgd].")
@click.option("--weight-decay", type=NON_NEGATIVE, default=0.0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True, help="Global batch size.")
@click.option("--schedule", type=click.Choice(["cosine", "step", "constant"]), default="cosine", show_default=True)
@click.option("--warmup-epochs", type=NON_NEGATIVE, default=0.0, show_default=True)
@click.option("--label-smoothing", type=FRACTION, default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--amp", is_flag=True, help="bf16 autocast.")
@click.option("--no-online-fold", is_flag=True,
              help="Run blocks of styles that train online (linear) layer by layer instead (slower).")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=0, help="Also checkpoint every N steps.")
@click.option("--limit-batches", type=click.IntRange(min=1), default=None, help="At most N batches per epoch.")
@click.option("--deterministic", is_flag=True, help="torch.use_deterministic_algorithms(True).")
@click.option("--sync-bn", is_flag=True, help="SyncBatchNorm across processes (torchrun).")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="DataLoader workers.")
@click.option("--device", default="auto", show_default=True, type=TEXT)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint beside --out.")
@click.option("--kwargs", default=None, help="JSON constructor arguments for a model spec.", type=TEXT)
@click.option("--entry", default=None, help="Factory name in model.py.", type=TEXT)
@trust_options
@handle_errors
def train(model, data_name, data_dir, epochs, out, optimizer, sam_base, rho, adaptive, lr, weight_decay, batch_size,
          schedule, warmup_epochs, label_smoothing, seed, amp, no_online_fold, checkpoint_every, limit_batches,
          deterministic, sync_bn, workers, device, resume, kwargs, entry, source_file, trust_source):
    """Train MODEL (a file from `sntfx transform`, or a model spec for the baselines).

    Launch with torchrun for DistributedDataParallel:
    torchrun --nproc_per_node=N -m sntfx train ...
    """
    from .data import load_data
    from .io import check_output_path
    from .serialization import save
    from .train import Trainer, TrainConfig, _dist_info, init_distributed, resolve_device, shutdown_distributed
    from .workflow import is_model_file, model_for_data

    out_path = check_output_path(out, [model] + ([data_name] if Path(data_name).exists() else []))
    _only_with(["sam_base", "rho", "adaptive"], optimizer == "sam", "--optimizer sam")
    saved = is_model_file(model)
    _only_with(["kwargs", "entry"], not saved, "a model spec (they are fixed in a saved model file)")
    _only_with(["source_file", "trust_source"], saved, "a saved model file (.pt)")
    _only_with(["sync_bn"], _world_size() > 1, "several processes (torchrun --nproc_per_node=N)")
    if warmup_epochs >= epochs:
        raise SntfxError(f"--warmup-epochs ({warmup_epochs:g}) must be shorter than training (--epochs {epochs})")
    config = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer=optimizer, sam_base=sam_base, lr=lr,
                         weight_decay=weight_decay, rho=rho, adaptive=adaptive, schedule=schedule,
                         warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, seed=seed, amp=amp,
                         online_fold=not no_online_fold, checkpoint_every=checkpoint_every,
                         limit_batches=limit_batches, deterministic=deterministic, sync_bn=sync_bn,
                         num_workers=workers, device=device)
    init_distributed(str(resolve_device(device)))
    click.get_current_context().call_on_close(shutdown_distributed)  # leave the group once rank 0 has saved
    rank = _dist_info()[0]
    data = load_data(data_name, data_dir=data_dir, seed=seed)
    import torch

    torch.manual_seed(seed)  # the same initial weights in every process and every run with this seed
    gm = model_for_data(model, data.info, kwargs=_json_kwargs(kwargs), entry=entry, model_file=source_file,
                        trust_source=trust_source)
    with _progress() as progress:
        result = Trainer(config, _TrainProgress(progress, rank)).fit(gm, data, out_path, resume=resume)
    if rank == 0:
        final = result.final
        save(gm, out_path, info={"training": config.to_dict(), "data": data.info.to_dict(), "history": result.history})
        console.print(f"trained {len(result.history)} epochs in {result.seconds:.1f}s: test accuracy "
                      f"{final.get('test_accuracy', float('nan')):.2%}, train loss {final.get('train_loss', float('nan')):.4f}; "
                      f"wrote [bold]{out_path}[/]", highlight=False)


@cli.command()
@click.argument("models", nargs=-1, required=True, type=TEXT)
@click.option("--data", "data_name", required=True, help="Dataset the models were trained on.", type=TEXT)
@click.option("--data-dir", default=None, type=click.Path(exists=True, file_okay=False), help="Where the dataset's files are.")
@click.option("--batches", type=click.IntRange(min=1), default=4, show_default=True, help="Training batches to measure on.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--rho", type=POSITIVE, default=0.05, show_default=True, help="Radius for SAM sharpness.")
@click.option("--iters", type=click.IntRange(min=1), default=50, show_default=True, help="Power iterations.")
@click.option("--trace-samples", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--landscape", type=click.Choice(["none", "1d", "2d"]), default="1d", show_default=True)
@click.option("--out", "-o", default="sharpness.json", show_default=True, type=click.Path(dir_okay=False),
              help="JSON results; plots are written beside it as PNG.")
@click.option("--seed", type=int, default=0, show_default=True)
@trust_options
@handle_errors
def sharpness(models, data_name, data_dir, batches, batch_size, rho, iters, trace_samples, landscape, out, seed,
              source_file, trust_source):
    """Measure the sharpness of trained MODELS (folded first, so all share one architecture)."""
    from .api import fold as do_fold
    from .blocks import SNTBlock
    from . import sharpness as sh
    from .data import fixed_batches, load_data
    from .io import atomic_write, check_output_path
    from .serialization import load

    out_path = check_output_path(out, list(models))
    _only_with(["data_dir"], data_name is not None, "--data NAME")
    loaded = {}
    for name, path in zip(_unique_names(models), models):  # every file is checked before any measuring starts
        gm = load(path, model_file=source_file, trust_source=trust_source)
        if any(isinstance(m, SNTBlock) for m in gm.modules()):
            gm = do_fold(gm, inplace=True)
        loaded[name] = gm
    data = load_data(data_name, data_dir=data_dir, seed=seed)
    fixed = fixed_batches(data.train, batches=batches, batch_size=batch_size, seed=seed)
    results, curves1, curves2 = {}, {}, {}
    for name, gm in loaded.items():
        with console.status(f"measuring {name} ..."):
            results[name] = sh.measure(gm, fixed, rho=rho, iters=iters, trace_samples=trace_samples, seed=seed)
            loss_fn = sh.batch_loss_fn(gm.eval(), fixed)
            if landscape in ("1d", "2d"):
                curves1[name] = sh.landscape(gm, loss_fn, dims=1, seed=seed)
            if landscape == "2d":
                curves2[name] = sh.landscape(gm, loss_fn, dims=2, steps=11, seed=seed)
    table = Table(title=f"sharpness on {batches} x {batch_size} {data.info.name} training images (eval mode)")
    for col in ("model", "loss", "top eigenvalue", "Hessian trace", f"SAM sharpness (rho={rho})"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, r in results.items():
        table.add_row(name, f"{r['loss']:.4f}", f"{r['top_eigenvalue']:.3f}", f"{r['hessian_trace']:.2f}",
                      f"{r['sam_sharpness']:.5f}")
    console.print(table)
    plots = []
    if curves1:
        p1 = out_path.with_name(out_path.stem + "_landscape_1d.png")
        atomic_write(p1, lambda tmp: sh.plot_landscape(curves1, tmp))
        plots.append(str(p1))
    for name, c in curves2.items():
        p2 = out_path.with_name(f"{out_path.stem}_landscape_2d_{name}.png")
        atomic_write(p2, lambda tmp, c=c, name=name: sh.plot_landscape({name: c}, tmp))
        plots.append(str(p2))
    payload = {"data": data.info.to_dict(), "batches": batches, "batch_size": batch_size, "rho": rho,
               "results": results, "landscape_1d": curves1, "landscape_2d": curves2, "plots": plots}
    atomic_write(out_path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))
    console.print(f"wrote [bold]{out_path}[/]" + (f" and {', '.join(plots)}" if plots else ""))


@cli.command()
@click.argument("model", type=TEXT)
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False), help="Output .onnx file (float).")
@click.option("--opset", type=click.IntRange(min=13), default=18, show_default=True)
@click.option("--dynamic-batch", is_flag=True, help="Make the batch dimension dynamic.")
@click.option("--input-shape", default=None, help="Example input shape, e.g. 1,3,32,32 [from --data or the recipe].", type=TEXT)
@click.option("--allow-expanded", is_flag=True, help="Export a model that still holds SNT blocks.")
@click.option("--simplify", is_flag=True, help="Simplify the graph with onnxscript's optimizer (verified too).")
@click.option("--data", "data_name", default=None, help="Verify on (and calibrate int8 with) this dataset.", type=TEXT)
@click.option("--data-dir", default=None, type=click.Path(exists=True, file_okay=False), help="Where the dataset's files are.")
@click.option("--int8", is_flag=True, help="Also write OUT.int8.onnx: static QDQ, int8 weights, uint8 activations.")
@click.option("--calib-batches", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--calib-method", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax", show_default=True)
@click.option("--min-agreement", type=FiniteFloat(0, 1), default=0.98, show_default=True,
              help="Top-1 agreement with the float model an int8 model must reach on the verification data.")
@click.option("--verify-samples", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False), help="Write the report as JSON.")
@trust_options
@handle_errors
def export(model, onnx_path, opset, dynamic_batch, input_shape, allow_expanded, simplify, data_name, data_dir, int8,
           calib_batches, calib_method, min_agreement, verify_samples, report_path, source_file, trust_source):
    """Export MODEL to ONNX, verified against torch on ONNX Runtime (optionally also int8)."""
    import os
    import tempfile

    import torch

    from .calibration import CalibrationReader
    from .data import fixed_batches, load_data
    from .exporters import export_onnx, quantize_int8, verify_onnx
    from .exporters.onnx_export import ExportError
    from .io import atomic_write, check_output_path
    from .models import parse_input_shape
    from .tracing import inputs_from_spec, sntfx_meta
    from .workflow import is_model_file

    out = check_output_path(onnx_path, [model])
    report_out = check_output_path(report_path, [model, onnx_path]) if report_path else None
    if int8:
        check_output_path(out.with_name(out.stem + ".int8.onnx"), [model])
    if int8 and not data_name:
        raise SntfxError("--int8 needs --data to calibrate on, e.g. --data fashion-mnist")
    _only_with(["calib_batches", "calib_method", "min_agreement"], int8, "--int8")
    _only_with(["data_dir"], data_name is not None, "--data NAME")
    saved = is_model_file(model)
    _only_with(["source_file", "trust_source"], saved, "a saved model file (.pt)")
    shape = parse_input_shape(input_shape) if input_shape else None
    data = load_data(data_name, data_dir=data_dir) if data_name else None
    if saved:
        from .serialization import load

        gm = load(model, model_file=source_file, trust_source=trust_source)
    else:
        from .api import trace

        gm = trace(model, torch.zeros(shape) if shape else None)
    if shape:
        example = (torch.randn(shape),)
    elif data is not None:
        example = (torch.zeros(data.info.input_shape(1)),)
    else:
        spec = sntfx_meta(gm).get("input_spec")
        example = inputs_from_spec(spec) if spec else None
        if not example:
            raise SntfxError("cannot tell the input shape: pass --input-shape 1,3,H,W or --data NAME")
    if data is not None:  # every verification sample is checked, in batches when the batch size is fixed
        verify = (torch.cat([x for x, _ in fixed_batches(data.test, batches=1, batch_size=verify_samples)]),)
    else:
        gen = torch.Generator().manual_seed(0)
        verify = (torch.randn(verify_samples, *example[0].shape[1:], generator=gen),)
    with console.status("exporting to ONNX ..."):
        report = export_onnx(gm, out, example, opset=opset, dynamic_batch=dynamic_batch,
                             allow_expanded=allow_expanded, simplify=simplify, verify_inputs=verify)
    v = report.verification
    simplified = ("" if not simplify else ", simplified" if report.simplified
                  else ", --simplify found nothing to simplify (the graph is unchanged)")
    console.print(f"exported with {report.exporter} (opset {opset}{', dynamic batch' if dynamic_batch else ''}"
                  f"{simplified}): {report.size_bytes / 1e6:.2f} MB; verified on "
                  f"{v['samples']} {'real' if data else 'random'} inputs: max abs {v['max_abs']:.2e}, rel {v['rel']:.2e}"
                  + (f", top-1 agreement {v['top1_agreement']:.2%}" if "top1_agreement" in v else ""), highlight=False)
    if report.fallback_reason:
        console.print(f"[yellow]torch.export-based export failed ({report.fallback_reason}); used the TorchScript exporter[/]")
    payload = {"float": report.to_dict()}
    if int8:
        int8_path = out.with_name(out.stem + ".int8.onnx")
        check_output_path(int8_path, [model])
        with console.status("quantizing to int8 (static, QDQ) ..."):
            import onnxruntime as ort

            input_name = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()[0].name
            reader = CalibrationReader(data.train, input_name, batches=calib_batches,
                                       fixed_batch=None if dynamic_batch else example[0].shape[0])
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=".sntfx-int8-") as tmp:
                tmp_int8 = os.path.join(tmp, int8_path.name)
                quantize_int8(out, tmp_int8, reader, method=calib_method)
                check = verify_onnx(tmp_int8, gm, verify, rtol=float("inf"), min_top1=min_agreement)
                if not check["ok"]:
                    raise ExportError(f"the int8 model disagrees with the float model: {check['reason']}; "
                                      "nothing was written for it (try --calib-method percentile or more --calib-batches)")
                os.replace(tmp_int8, int8_path)
        console.print(f"int8 model {int8_path} ({int8_path.stat().st_size / 1e6:.2f} MB): top-1 agreement with the "
                      f"float model {check['top1_agreement']:.2%} on {check['samples']} inputs, rel {check['rel']:.2e}",
                      highlight=False)
        payload["int8"] = {"path": str(int8_path), "verification": check, "calibration_batches": len(reader),
                           "calibration_method": calib_method}
    if report_out:
        atomic_write(report_out, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))
    console.print(f"wrote [bold]{out}[/]")


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--provider", type=click.Choice(["auto", "tensorrt", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--batch-sizes", default="1,8,32", show_default=True, type=TEXT)
@click.option("--iters", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--data", "data_name", default=None, help="Also measure accuracy on this dataset's test split.", type=TEXT)
@click.option("--data-dir", default=None, type=click.Path(exists=True, file_okay=False), help="Where the dataset's files are.")
@click.option("--out", "-o", default=None, type=click.Path(dir_okay=False), help="Write results as JSON.")
@handle_errors
def bench(models, provider, batch_sizes, iters, warmup, data_name, data_dir, out):
    """Benchmark ONNX MODELS on ONNX Runtime side by side: latency, throughput, accuracy, size."""
    from .data import load_data
    from .exporters import bench_onnx, onnx_accuracy
    from .io import atomic_write, check_output_path

    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise SntfxError(f"--batch-sizes must be integers separated by commas, got {batch_sizes!r}") from None
    if not sizes or min(sizes) < 1:
        raise SntfxError("--batch-sizes must list positive integers, e.g. 1,8,32")
    out_path = check_output_path(out, list(models)) if out else None
    _only_with(["data_dir"], data_name is not None, "--data NAME")
    from .exporters.ort_bench import check_onnx_model

    for path in models:  # every file is checked before anything is measured
        check_onnx_model(path)
    data = load_data(data_name, data_dir=data_dir) if data_name else None
    results = []
    for path in models:
        with console.status(f"benchmarking {path} ..."):
            r = bench_onnx(path, provider=provider, batch_sizes=sizes, iters=iters, warmup=warmup)
            if data is not None:
                r.accuracy = onnx_accuracy(path, data.test, provider=provider)
        for w in r.warnings:
            err_console.print(f"[bold yellow]warning:[/] {Path(path).name}: {w}", highlight=False)
        results.append(r)
    table = Table(title=f"ONNX Runtime, provider asked: {provider}")
    table.add_column("model")
    table.add_column("ran on")
    table.add_column("MB", justify="right")
    for b in sizes:
        table.add_column(f"b{b} p50 ms", justify="right")
        table.add_column(f"b{b} p99", justify="right")
    table.add_column("img/s (largest b)", justify="right")
    if data is not None:
        table.add_column("accuracy", justify="right")
    for r in results:
        ran = r.provider.replace("ExecutionProvider", "") + (" (fallback!)" if r.fallback else "")
        row = [Path(r.path).name, ran, f"{r.size_bytes / 1e6:.2f}"]
        for b in sizes:
            lat = r.latency.get(str(b))
            row += [f"{lat['p50_ms']:.2f}", f"{lat['p99_ms']:.2f}"] if lat else ["-", "-"]
        last = r.latency[max(r.latency, key=int)]
        row.append(f"{last['throughput_per_s']:.0f}")
        if data is not None:
            row.append(f"{r.accuracy:.2%}")
        table.add_row(*row)
    console.print(table)
    if out_path:
        atomic_write(out_path, lambda tmp: tmp.write_text(json.dumps([r.to_dict() for r in results], indent=2)))
        console.print(f"wrote [bold]{out_path}[/]")


def _load_folded(path: str, source_file: str | None = None, trust_source: bool = False):
    from .compress import ensure_folded
    from .serialization import load

    gm = load(path, model_file=source_file, trust_source=trust_source)
    ensure_folded(gm, f"'{path}'")
    return gm


@cli.command()
@click.argument("model", type=TEXT)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False))
@click.option("--sparsity", type=FRACTION, default=None,
              help="Fraction of zeros (magnitude) or of channels removed (structured); not for nm.")
@click.option("--method", type=click.Choice(["magnitude", "nm", "structured"]), default="magnitude", show_default=True)
@click.option("--scope", type=click.Choice(["global", "layer"]), default=None,
              help="One ranking across layers, or the same fraction in each layer [global for magnitude, layer for "
                   "structured].")
@click.option("--nm", "nm_pattern", default=None, help="N:M pattern for --method nm [2:4].", type=TEXT)
@click.option("--importance", type=click.Choice(["magnitude", "taylor", "lamp"]), default=None,
              help="Channel importance for --method structured [magnitude]; taylor needs --data.")
@click.option("--round-to", type=click.IntRange(min=1), default=None, help="Structured: channel counts multiple of N.")
@click.option("--exclude-first", is_flag=True, help="Keep the first layer dense.")
@click.option("--exclude-last", is_flag=True, help="Keep the classifier dense (structured pruning always does).")
@click.option("--data", "data_name", default=None, help="Dataset: accuracy before/after, Taylor importance, fine-tuning.", type=TEXT)
@click.option("--data-dir", default=None, type=click.Path(exists=True, file_okay=False), help="Where the dataset's files are.")
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Fine-tune after pruning with the zeros held fixed (needs --data).")
@click.option("--lr", type=POSITIVE, default=1e-4, show_default=True, help="Fine-tuning learning rate (Adam).")
@trust_options
@handle_errors
def prune(model, out, sparsity, method, scope, nm_pattern, importance, round_to, exclude_first, exclude_last,
          data_name, data_dir, finetune_epochs, lr, source_file, trust_source):
    """Prune a folded MODEL: magnitude (exact sparsity), N:M, or structured channels."""
    from .compress import accuracy, apply_pass
    from .data import load_data
    from .io import check_output_path
    from .serialization import save
    from sntfx.passes import MagnitudePrune, NMPrune, StructuredPrune

    out_path = check_output_path(out, [model])
    _only_with(["nm_pattern"], method == "nm", "--method nm")
    _only_with(["importance", "round_to"], method == "structured", "--method structured")
    _only_with(["scope"], method != "nm", "--method magnitude or structured (N:M is per group of M weights)")
    _only_with(["lr"], finetune_epochs > 0, "--finetune-epochs N")
    _only_with(["data_dir"], data_name is not None, "--data NAME")
    if method == "nm" and sparsity is not None:
        raise SntfxError("--method nm zeroes exactly N of every M weights (2:4 is 50%), so --sparsity does not apply: "
                         "drop it and choose the pattern with --nm N:M")
    if method != "nm" and sparsity is None:
        raise SntfxError(f"--method {method} needs --sparsity, e.g. --sparsity 0.5")
    if finetune_epochs and not data_name:
        raise SntfxError("--finetune-epochs needs --data")
    if importance == "taylor" and not data_name:
        raise SntfxError("--importance taylor needs --data (it scores channels by gradients on labelled images)")
    try:
        if method == "magnitude":
            p = MagnitudePrune(sparsity, scope=scope or "global", exclude_first=exclude_first,
                               exclude_last=exclude_last)
        elif method == "nm":
            n, m = NMPrune.parse_pattern(nm_pattern or "2:4")
            p = NMPrune(n, m, exclude_first=exclude_first, exclude_last=exclude_last)
        else:
            p = StructuredPrune(sparsity, importance=importance or "magnitude", round_to=round_to,
                                global_pruning=scope == "global", exclude_first=exclude_first)
    except ValueError as exc:
        raise SntfxError(str(exc)) from exc
    gm = _load_folded(model, source_file, trust_source)
    data = load_data(data_name, data_dir=data_dir) if data_name else None
    before = accuracy(gm, data) if data else None
    with console.status("pruning ..."):
        report = apply_pass(gm, p, data, inplace=True)
    gm = report.graph_module
    _print_pass_report(report)
    if finetune_epochs:
        _finetune_sparse(gm, data, finetune_epochs, lr)
    zeros = sum(int((q == 0).sum()) for n, q in gm.named_parameters() if n.endswith("weight") and q.dim() > 1)
    total = sum(q.numel() for n, q in gm.named_parameters() if n.endswith("weight") and q.dim() > 1)
    line = f"weights zero: {zeros / total:.2%} of {total:,}; parameters {sum(q.numel() for q in gm.parameters()):,}"
    if data:
        line += f"; accuracy {before:.2%} -> {accuracy(gm, data):.2%}"
    console.print(line, highlight=False)
    save(gm, out_path)
    console.print(f"wrote [bold]{out_path}[/]")


def _finetune_sparse(gm, data, epochs: int, lr: float) -> None:
    """Short fine-tuning that keeps every zero weight at zero."""
    import tempfile

    import torch

    from .train import TrainConfig, Trainer

    masks = {n: (p != 0) for n, p in gm.named_parameters() if p.dim() > 1 and bool((p == 0).any())}
    params = dict(gm.named_parameters())
    hooks = [params[n].register_hook(lambda g, m=m: g * m) for n, m in masks.items()]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            with _progress() as progress:
                Trainer(TrainConfig(epochs=epochs, lr=lr, batch_size=128, schedule="cosine", weight_decay=0.0),
                        _TrainProgress(progress, 0)).fit(gm, data, Path(tmp) / "finetune.pt")
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)


@cli.command()
@click.argument("model", type=TEXT)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False))
@click.option("--wbits", type=int, default=8, show_default=True)
@click.option("--abits", type=int, default=None, help="Activation bits (4-8); needs --data for calibration.")
@click.option("--granularity", type=click.Choice(["channel", "tensor"]), default="channel", show_default=True)
@click.option("--method", type=click.Choice(["rtn", "mse"]), default="rtn", show_default=True, help="Weight clipping.")
@click.option("--act-method", type=click.Choice(["minmax", "percentile", "mse"]), default="minmax", show_default=True)
@click.option("--calib-batches", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--data", "data_name", default=None, help="Calibrate activations on (and measure accuracy on) this dataset.", type=TEXT)
@click.option("--data-dir", default=None, type=click.Path(exists=True, file_okay=False), help="Where the dataset's files are.")
@trust_options
@handle_errors
def quantize(model, out, wbits, abits, granularity, method, act_method, calib_batches, data_name, data_dir,
             source_file, trust_source):
    """Simulated post-training quantization of a folded MODEL (still a torch model)."""
    from .compress import accuracy, apply_pass
    from .data import load_data
    from .io import check_output_path
    from .serialization import save
    from sntfx.passes import SimulatedQuantize

    out_path = check_output_path(out, [model])
    try:
        p = SimulatedQuantize(wbits=wbits, abits=abits, granularity=granularity, method=method, act_method=act_method)
    except ValueError as exc:
        raise SntfxError(f"{exc} (--wbits / --abits)") from exc
    _only_with(["act_method", "calib_batches"], abits is not None, "--abits BITS")
    _only_with(["data_dir"], data_name is not None, "--data NAME")
    if abits is not None and not data_name:
        raise SntfxError("--abits needs --data to calibrate the activation ranges on real images")
    gm = _load_folded(model, source_file, trust_source)
    data = load_data(data_name, data_dir=data_dir) if data_name else None
    before = accuracy(gm, data) if data else None
    report = apply_pass(gm, p, data, calib_batches=calib_batches, inplace=True)
    gm = report.graph_module
    table = Table(title=f"W{wbits}" + (f"A{abits}" if abits else "") + f" ({granularity}, {method})")
    table.add_column("layer")
    table.add_column("weight rel. error", justify="right")
    if abits:
        table.add_column("input rel. error", justify="right")
    for layer, r in report.passes[0].info["layers"].items():
        row = [layer, f"{r.get('weight_rel_error', float('nan')):.4f}"]
        if abits:
            row.append(f"{r.get('input_rel_error', float('nan')):.4f}")
        table.add_row(*row)
    console.print(table)
    if data:
        console.print(f"accuracy {before:.2%} -> {accuracy(gm, data):.2%}", highlight=False)
    save(gm, out_path)
    console.print(f"wrote [bold]{out_path}[/]")


@cli.command()
@click.argument("models", nargs=-1, required=True, type=TEXT)
@click.option("--data", "data_name", required=True, type=TEXT)
@click.option("--data-dir", default=None, type=click.Path(exists=True, file_okay=False), help="Where the dataset's files are.")
@click.option("--sparsities", default="0.5,0.7,0.8,0.9", show_default=True)
@click.option("--channel-sparsities", default="", help="Structured channel sparsities, e.g. 0.2,0.4.")
@click.option("--bits", default="8,6,5,4,3", show_default=True)
@click.option("--act-bits", default="8:8,4:8", show_default=True, help="W:A settings with calibrated activations.")
@click.option("--out", "-o", default="sweep.json", show_default=True, type=click.Path(dir_okay=False),
              help="JSON results; PNG plots are written beside it.")
@trust_options
@handle_errors
def sweep(models, data_name, data_dir, sparsities, channel_sparsities, bits, act_bits, out, source_file, trust_source):
    """Accuracy of folded MODELS under pruning and quantization, without fine-tuning, on one set of axes."""
    from .compress import check_sweep_settings, parse_sweep_axis
    from .compress import sweep as run_sweep
    from .data import load_data
    from .io import atomic_write, check_output_path

    out_path = check_output_path(out, list(models))
    _only_with(["data_dir"], data_name is not None, "--data NAME")
    sp = parse_sweep_axis(sparsities, "fraction", "--sparsities")
    csp = parse_sweep_axis(channel_sparsities, "fraction", "--channel-sparsities")
    bw = parse_sweep_axis(bits, "bits", "--bits")
    ab = parse_sweep_axis(act_bits, "wa", "--act-bits")
    check_sweep_settings(sparsities=sp, channel_sparsities=csp, bits=bw, act_bits=ab)
    names = _unique_names(models)
    gms = {name: _load_folded(m, source_file, trust_source) for name, m in zip(names, models)}
    data = load_data(data_name, data_dir=data_dir)
    results = {}
    for name, gm in gms.items():
        with console.status(f"sweeping {name} ...") as status:
            results[name] = run_sweep(gm, data, sparsities=sp, channel_sparsities=csp, bits=bw, act_bits=ab,
                                      progress=lambda label, name=name: status.update(f"sweeping {name}: {label}"))
    table = Table(title=f"accuracy on {data.info.name} test ({len(data.test)} images), no fine-tuning")
    table.add_column("setting")
    for name in results:
        table.add_column(name, justify="right")
    keys = [("float", None)] + [("sparsity", k) for k in map(str, sp)] + [("channel_sparsity", k) for k in map(str, csp)]
    keys += [("bits", str(b)) for b in bw] + [("act_bits", f"W{w}A{a}") for w, a in ab]
    for section, key in keys:
        label = {"float": "float", "sparsity": f"sparsity {key}", "channel_sparsity": f"channels -{key}",
                 "bits": f"W{key}", "act_bits": key}[section]
        row = []
        for r in results.values():
            v = r[section] if key is None else r[section][key]
            row.append(f"{(v['accuracy'] if isinstance(v, dict) else v):.2%}")
        table.add_row(label, *row)
    console.print(table)
    plots = _sweep_plots(results, out_path, data.info.name)
    atomic_write(out_path, lambda tmp: tmp.write_text(json.dumps({"data": data.info.to_dict(), "results": results,
                                                                   "plots": plots}, indent=2)))
    console.print(f"wrote [bold]{out_path}[/] and {', '.join(plots)}")


def _sweep_plots(results: dict, out_path: Path, dataset: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_write

    written = []
    for section, xlabel, fname in (("sparsity", "weight sparsity (global magnitude)", "sparsity"),
                                   ("bits", "weight bits (per-channel, simulated)", "bits")):
        fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
        for name, r in results.items():
            xs = sorted(r[section], key=float)
            ax.plot([float(x) for x in xs], [r[section][x] * 100 for x in xs], marker="o", label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{dataset} test accuracy (%)")
        if section == "bits":
            ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_path.with_name(f"{out_path.stem}_{fname}.png")
        atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png"))
        plt.close(fig)
        written.append(str(path))
    return written


def _unique_names(paths) -> list[str]:
    """Short names for result tables (file stems); two files with one stem are told apart by their folder."""
    stems = [Path(p).stem for p in paths]
    if len(set(map(str, paths))) != len(paths):
        raise SntfxError("the same model file is given twice; list each model once")
    return [f"{Path(p).resolve().parent.name}_{Path(p).stem}" if stems.count(Path(p).stem) > 1 else Path(p).stem
            for p in paths]


def _json_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise SntfxError(f"--kwargs must be a JSON object, e.g. '{{\"num_classes\": 10}}': {exc}") from exc
    if not isinstance(value, dict):
        raise SntfxError("--kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


def _quant_report(gm, bits: int, data_name, data_dir, file) -> None:
    from .compress import ensure_folded
    from .data import fixed_batches, load_data
    from .quant_report import quant_readiness
    from .tracing import inputs_from_spec, sntfx_meta

    ensure_folded(gm, f"'{file}'")
    if data_name:
        data = load_data(data_name, data_dir=data_dir)
        inputs = (fixed_batches(data.test, batches=1, batch_size=64)[0][0],)
        source = f"64 {data.info.name} test images"
    else:
        inputs = inputs_from_spec(sntfx_meta(gm).get("input_spec", []))
        source = "random inputs (give --data for real ones)"
    rows = quant_readiness(gm, inputs, bits=bits)
    table = Table(title=f"{file}: W{bits} quantization readiness, sensitivity on {source}")
    for col in ("layer", "w min", "w max", "outlier max", "outlier med", f"W{bits} err/ch", f"W{bits} err/tensor",
                "output change"):
        table.add_column(col, justify="left" if col == "layer" else "right", overflow="fold")
    for r in rows:
        table.add_row(r.layer, f"{r.weight_min:.3g}", f"{r.weight_max:.3g}", f"{r.outlier_ratio_max:.1f}",
                      f"{r.outlier_ratio_median:.1f}", f"{r.error_channel:.3f}", f"{r.error_tensor:.3f}",
                      f"{r.sensitivity:.4f}")
    console.print(table)
    top = ", ".join(r.layer for r in rows[:3])
    console.print(f"most sensitive to W{bits}: {top}. Outlier ratio = max|w| / rms(w) per output channel; "
                  "output change = relative change of the logits when only that layer is quantized.", highlight=False)


class _StudyProgress:
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


def _study_progress():
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                    TextColumn("left"), TimeRemainingColumn(), console=console, transient=False)


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
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default=None, help="Base optimizer (SAM wraps it).")
@click.option("--weight-decay", type=NON_NEGATIVE, default=None)
@click.option("--rho", type=POSITIVE, default=None, help="SAM radius.")
@click.option("--ratio", type=click.IntRange(min=1), default=None, help="SNT expansion ratio (default 4).")
@click.option("--limit-batches", type=click.IntRange(min=1), default=None, help="Training batches per epoch.")
@click.option("--eval-images", type=click.IntRange(min=1), default=None,
              help="Test images for the compression sweeps and ONNX accuracy (default: all).")
@click.option("--onnx/--no-onnx", default=None, help="Export, verify and benchmark on ONNX Runtime (default on).")
@click.option("--provider", type=click.Choice(["auto", "tensorrt", "cuda", "cpu"]), default=None)
@click.option("--device", default=None, help="Training device: auto, cpu, cuda, cuda:N.", type=TEXT)
@click.option("--config", "config_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="TOML or JSON file setting any study field (sparsities, bits, sharpness_iters, ...); "
                   "command-line options override it, and it overrides the preset.")
@click.option("--out", "-o", default="study-results", show_default=True, type=click.Path(dir_okay=True, file_okay=False))
@click.option("--report-only", is_flag=True, help="Redraw report.md and the plots from OUT/results.json.")
@click.option("--trust-source", is_flag=True,
              help="Accept --model files (.pt) not saved by you on this machine that rebuild from Python code.")
@handle_errors
def study(preset, models, data_name, data_dir, methods, seeds, epochs, batch_size, lr, optimizer, weight_decay, rho,
          ratio, limit_batches, eval_images, onnx, provider, device, config_file, out, report_only, trust_source):
    """Adam vs SAM vs SNT: train, fold, sweep pruning and quantization, export to ONNX, benchmark; one report.

    Resumable: run the same command again and finished stages are kept.
    """
    import os

    from .study import Study, preset_config, validate_results

    out_dir = Path(out)
    if report_only:
        from .report import write_report

        ctx = click.get_current_context()
        extra = [p.opts[0] for p in ctx.command.params if p.name not in ("report_only", "out") and _given(p.name)]
        if extra:
            raise SntfxError(f"--report-only redraws the report from OUT/results.json, so {', '.join(extra)} would "
                             "be ignored: drop them, or run the study without --report-only")

        path = out_dir / "results.json"
        if not path.is_file():
            raise SntfxError(f"no results in '{out_dir}' (results.json is missing); run the study first")
        results = json.loads(path.read_text())
        validate_results(results)
        console.print(f"report: [bold]{write_report(results, out_dir)}[/]")
        return
    from .study import read_config_file

    overrides = read_config_file(config_file) if config_file else {}
    given = {"models": [m for spec in models for m in spec.split(",") if m] or None, "data": data_name,
             "data_dir": data_dir, "methods": methods, "seeds": seeds, "epochs": epochs,
             "batch_size": batch_size, "lr": lr, "optimizer": optimizer, "weight_decay": weight_decay, "rho": rho,
             "ratio": ratio, "limit_batches": limit_batches, "eval_images": eval_images, "onnx": onnx,
             "provider": provider, "device": device}
    overrides |= {k: v for k, v in given.items() if v is not None}  # the command line wins over the file
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
        with _study_progress() as progress:
            runner.progress = _StudyProgress(progress)
            results = runner.run()
    else:
        runner.run()
        return
    planned = (4 if config.onnx else 3) * len(runner.runs())
    if len(runner.executed) < planned:
        console.print(f"resumed: {planned - len(runner.executed)} finished stage(s) kept from an earlier run")
    _print_study_summary(results)
    console.print(f"report: [bold]{out_dir / 'report.md'}[/]  (plots in {out_dir / 'plots'}, "
                  f"every number in {out_dir / 'results.json'})")


def _print_study_summary(results: dict) -> None:
    from .report import short_verdict

    for model, summary in results["summary"].items():
        table = Table(title=f"{model} on {results['dataset']['name']}: accuracy gained over Adam (points, mean ± std "
                            "over seeds; 'helps' = more than one std above zero)", show_edge=False)
        for col in ("method", "float acc", "unstructured pruning", "channel pruning", "quantization <= 6 bit",
                    "time/epoch"):
            table.add_column(col)
        for method, metrics in summary["metrics"].items():
            groups = summary["group_gains_over_adam"].get(method, {})
            acc = metrics.get("float", {})
            t = metrics.get("epoch_time_vs_adam", {})
            table.add_row(method, f"{100 * acc['mean']:.2f}%" if acc.get("mean") is not None else "n/a",
                          *(["-"] * 3 if method == "adam" else
                            [short_verdict(groups.get(g)) for g in ("unstructured pruning", "channel pruning",
                                                               "quantization (<= 6 bits)")]),
                          f"{t['mean']:.2f}x" if t.get("mean") is not None else "n/a")
        console.print(table)


def _fmt_int(v: int | None) -> str:
    if v is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return str(v)


def _print_pass_report(report) -> None:
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


def main() -> None:
    cli(prog_name="sntfx")


if __name__ == "__main__":  # pragma: no cover
    main()
