"""The ``sntfx`` command line. The CLI alone writes to the console.

Commands: ``transform``, ``fold``, ``inspect``. Every command that writes a
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
from .errors import SntfxError

console = Console()
err_console = Console(stderr=True)

__all__ = ["main", "cli"]


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(2)


def handle_errors(fn):
    """Turn sntfx errors into a one-paragraph message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SntfxError as exc:
            _fail(str(exc))
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            _fail(f"{exc.strerror or exc}: '{exc.filename}'")

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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

    try:
        kw = json.loads(kwargs) if kwargs else {}
    except ValueError as exc:
        raise SntfxError(f"--kwargs must be a JSON object, e.g. '{{\"num_classes\": 10}}': {exc}") from exc
    if not isinstance(kw, dict):
        raise SntfxError("--kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return ModelSpec.parse(model, entry=entry, kwargs=kw)


def _inputs_for(path_or_spec: str) -> list[str]:
    return [path_or_spec.rsplit(":", 1)[0] if ".py:" in path_or_spec else path_or_spec]


@cli.command()
@click.argument("model")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Output .pt file.")
@click.option("--style", type=click.Choice(["linear", "branch", "qa-branch"]), default=None, help="Expansion style [linear].")
@click.option("--ratio", type=click.IntRange(min=1), default=None, help="Expansion ratio for 'linear' [4].")
@click.option("--input-shape", default=None, help="Example input shape, e.g. 1,3,32,32.")
@click.option("--entry", default=None, help="Factory name in model.py (default: build_model, model or get_model).")
@click.option("--kwargs", default=None, help="JSON object of constructor arguments.")
@click.option("--policy", type=click.Path(exists=True, dir_okay=False), default=None, help="Policy file (.json/.toml).")
@click.option("--preserve", is_flag=True, help="Start the blocks at exactly the original function.")
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def transform(model, out, style, ratio, input_shape, entry, kwargs, policy, preserve, seed):
    """Trace MODEL and expand its conv/linear layers into SNT blocks.

    MODEL is model.py (with build_model()), torchvision:NAME, timm:NAME or sntfx:NAME.
    """
    from .api import transform as do_transform
    from .io import check_output_path
    from .models import parse_input_shape
    from .serialization import save
    from .tracing import sntfx_meta

    out_path = check_output_path(out, _inputs_for(model) + ([policy] if policy else []))
    spec = _model_spec(model, entry, kwargs)
    inputs = spec.example_inputs(parse_input_shape(input_shape) if input_shape else None)
    with console.status(f"tracing and expanding {spec} ..."):
        from .tracing import trace

        gm = trace(spec.build(), inputs)
        sntfx_meta(gm)["source"] = spec.to_dict()
        gm, report = do_transform(
            gm, inputs, style=style, ratio=ratio, policy=policy, preserve=preserve, seed=seed, report=True, inplace=True
        )
    _print_pass_report(report)
    opaque = sntfx_meta(gm).get("opaque_modules", [])
    if opaque:
        console.print(f"[yellow]kept opaque (not traced, not expanded):[/] {', '.join(opaque)}")
    save(gm, out_path)
    console.print(f"wrote [bold]{out_path}[/]")


@cli.command()
@click.argument("model_file", metavar="SNT_MODEL", type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Output .pt file.")
@click.option("--batchnorm", is_flag=True, help="Also fold the model's own BatchNorms into the layers before them.")
@click.option("--model-file", "source_file", default=None, help="Rebuild from this model.py instead of the recorded one.")
@handle_errors
def fold(model_file, out, batchnorm, source_file):
    """Fold every SNT block of SNT_MODEL back into its original layer, exactly."""
    from .api import fold as do_fold
    from .io import check_output_path
    from .serialization import load, save

    out_path = check_output_path(out, [model_file])
    with console.status(f"loading {model_file} ..."):
        gm = load(model_file, model_file=source_file)
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
@click.option("--model-file", "source_file", default=None, help="Rebuild from this model.py instead of the recorded one.")
@handle_errors
def inspect(file, source_file):
    """Show the layers of FILE: expansion, parameters and MACs before/after folding.

    FILE is a saved sntfx model, or a model spec (model.py, torchvision:NAME, ...).
    """
    from .serialization import load, read_recipe
    from .summary import layer_summary

    if Path(file).suffix == ".pt" or Path(file).is_file() and not file.endswith(".py"):
        gm = load(file, model_file=source_file)
        recipe = read_recipe(file)
        source = recipe["source"]
        pipeline = ",".join(p["name"] for p in recipe["pipeline"]) or "(none)"
    else:
        from .api import trace

        gm = trace(file)
        source, pipeline = {"kind": "spec", "name": file}, "(none)"
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
