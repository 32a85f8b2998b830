"""``transform``, ``passes``, ``fold``, ``inspect``: expand a model, list the passes, fold back, look inside."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ..blocks import get_style, style_names
from ..blocks.registry import COST_SOURCE
from ..errors import SntfxError
from ..pipelines import DEFAULT_BATCH, DEFAULT_BUDGET, DEFAULT_MEMORY_BUDGET, DEFAULT_RATIO, DEFAULT_STYLE
from .app import cli, console
from .report import json_option, report as report_json
from .console import fmt_int, passes_table, print_pass_report
from .options import (
    BUDGET,
    TEXT,
    check_weights_options,
    given,
    inputs_for,
    model_spec,
    only_with,
    trust_options,
    weights_options,
)


def style_cost(name: str) -> str:
    """How a style trains and what a step costs, as the registry records it (benchmarks/bench_train_step.py)."""
    info = get_style(name)
    mode = "trains online" if info.trains_online else "trains in explicit form"
    return f"{mode}, about {info.step_cost:.2g}x an Adam step ({COST_SOURCE})"


@cli.command()
@json_option
@click.argument("model", type=TEXT)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Output .pt file.")
@click.option("--style", type=click.Choice(style_names()), default=None,
              help=f"Expansion style [{DEFAULT_STYLE}]: "
                   + "; ".join(f"{n}: {get_style(n).label}, {style_cost(n)}" for n in style_names()) + ".")
@click.option("--ratio", type=click.IntRange(min=1), default=None, help=f"Expansion ratio for styles that take one [{DEFAULT_RATIO}].")
@click.option("--input-shape", default=None, help="Example input shape, e.g. 1,3,32,32.", type=TEXT)
@click.option("--entry", default=None, help="Factory name in model.py (default: build_model, model or get_model).", type=TEXT)
@click.option("--kwargs", default=None, help="JSON object of constructor arguments.", type=TEXT)
@click.option("--policy", type=click.Path(exists=True, dir_okay=False), default=None, help="Policy file (.json/.toml).")
@click.option("--preserve", is_flag=True, help="Start the blocks at exactly the original function.")
@click.option("--budget", type=BUDGET, default=DEFAULT_BUDGET, show_default=True,
              help="Most that online training may add to a step (composing kernels, updating the extra "
                   "parameters), as a fraction of the plain layers' multiply-adds at --batch-size; layers over it "
                   "stay plain (counted; -v names them). 'none': expand every eligible layer.")
@click.option("--memory-budget", type=BUDGET, default=DEFAULT_MEMORY_BUDGET, show_default=True,
              help="With --budget: most that the blocks may add to a training step's memory (extra parameters with "
                   "their gradients and optimizer state, tensors the composition keeps), as a fraction of the plain "
                   "model's at --batch-size; layers over it stay plain. 'none': no memory limit.")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH, show_default=True,
              help="The batch you will train with (what --budget and --memory-budget are reckoned at).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--passes", "pipeline", default=None, type=TEXT,
              help='Run this pass pipeline instead, e.g. "snt(style=linear,ratio=4)" (see `sntfx passes`).')
@weights_options
@click.option("--data", "data_name", default=None, type=TEXT,
              help="Build the model for this dataset's images and classes, as `sntfx train` does (channels, "
                   "classes, input shape).")
@click.option("--data-dir", default=None, type=click.Path(exists=True, file_okay=False), help="Where the dataset's files are.")
def transform(model, out, style, ratio, input_shape, entry, kwargs, policy, preserve, budget, memory_budget, batch_size,
              seed, pipeline, weights_file, pretrained, data_name, data_dir):
    """Trace MODEL and expand its conv/linear layers into SNT blocks.

    MODEL is model.py (with build_model()), torchvision:NAME, timm:NAME or sntfx:NAME.
    """
    from ..api import transform as do_transform
    from ..io import check_output_path
    from ..models import parse_input_shape
    from ..serialization import save
    from ..tracing import sntfx_meta
    from ..weights import weights_source
    from ..workflow import build_traced

    out_path = check_output_path(out, inputs_for(model) + [p for p in (policy, weights_file) if p])
    only_with(["data_dir"], data_name is not None, "--data NAME")
    only_with(["memory_budget"], budget is not None, "a --budget other than none")
    if input_shape and data_name:
        raise SntfxError("--data sets the input shape from the dataset's images, so --input-shape would be "
                         "ignored: drop one of them")
    if ratio is not None and not policy and "ratio" not in get_style(style or DEFAULT_STYLE).options:
        raise SntfxError(f"--ratio sets an expansion ratio; the '{style or DEFAULT_STYLE}' style has none, so it "
                         "would be ignored: choose a style with a ratio (e.g. --style linear) or drop --ratio")
    spec = model_spec(model, entry, kwargs)
    check_weights_options(spec, weights_file, pretrained)
    budgets = [n for n in ("budget", "memory_budget", "batch_size") if given(n)]
    if pipeline and (style or ratio or policy or preserve or budgets):
        raise SntfxError("--passes replaces --style/--ratio/--policy/--preserve/--budget/--memory-budget/--batch-size: "
                         'put them in the pipeline, e.g. --passes "snt(style=branch,preserve=true)" or '
                         '"snt(style=linear,budget=0.2,batch_size=64)"')
    if pipeline:
        from ..pass_base import parse_pipeline

        pipeline = parse_pipeline(pipeline)  # bad strings fail before any work
    info = None
    if data_name:
        from ..data import load_data

        info = load_data(data_name, data_dir=data_dir, seed=seed).info
    inputs = spec.example_inputs(info.input_shape(1) if info else parse_input_shape(input_shape) if input_shape else None)
    with console.status(f"tracing and expanding {spec} ..."):
        gm = build_traced(spec, inputs, weights=weights_file, pretrained=pretrained, info=info)
    if pipeline:
        from ..pass_base import PassContext
        from ..pass_manager import PassManager

        report = PassManager(pipeline).run(gm, PassContext(example_inputs=inputs, seed=seed))
        gm = report.graph_module
    else:
        gm, report = do_transform(
            gm, inputs, style=style, ratio=ratio, policy=policy, preserve=preserve, seed=seed, report=True, inplace=True,
            budget=budget, batch_size=batch_size, memory_budget=memory_budget)
    print_pass_report(report)
    from ..passes.snt_expand import OVER_BUDGET, OVER_MEMORY

    for stat, what, option, value in ((OVER_BUDGET, "composing them every training step would cost more than {} of "
                                       "the plain layers' work", "--budget", budget),
                                      (OVER_MEMORY, "as blocks they would add more than {} to the plain model's "
                                       "training memory", "--memory-budget", memory_budget)):
        if over := sum(p.stats.get(stat, 0) for p in report.passes):
            console.print(f"{over} layer(s) stay plain: {what.format(f'{value:.0%}')} at batch {batch_size} "
                          f"({option} none expands them; -v names them)", highlight=False)
    from ..blocks import SNTBlock

    styles = sorted({m.style for m in gm.modules() if isinstance(m, SNTBlock)})
    for name in styles:
        console.print(f"{name}: {style_cost(name)}", highlight=False)
    report_json(model=model, out=out_path, pipeline=report.to_dict()["passes"],
                styles={name: style_cost(name) for name in styles})
    opaque = sntfx_meta(gm).get("opaque_modules", [])
    if opaque:
        console.print(f"[yellow]kept opaque (not traced, not expanded):[/] {', '.join(opaque)}")
    started = weights_source(weights_file, pretrained)
    if started:
        console.print(f"started from {weights_file or 'the pretrained weights in the local cache'}", highlight=False)
    save(gm, out_path, info={"initial_weights": started} if started else None)
    console.print(f"wrote [bold]{out_path}[/]")


@cli.command(name="passes")
def list_passes():
    """List the registered passes, what they require and provide, and their parameters."""
    console.print(passes_table())


@cli.command()
@json_option
@click.argument("model_file", metavar="SNT_MODEL", type=click.Path(dir_okay=False))
@click.option("--out", "-o", default=None, type=click.Path(dir_okay=False), help="Output .pt file (an sntfx model).")
@click.option("--state-dict", "state_dict_path", default=None, type=click.Path(dir_okay=False),
              help="Also (or only) write the folded weights as a state dict (.safetensors or .pt) under the original "
                   "class's names: OriginalClass(...).load_state_dict(state, strict=True).")
@click.option("--batchnorm", is_flag=True, help="Also fold the model's own BatchNorms into the layers before them.")
@trust_options
def fold(model_file, out, state_dict_path, batchnorm, source_file, trust_source):
    """Fold every SNT block of SNT_MODEL back into its original layer, exactly."""
    from ..api import fold as do_fold
    from ..io import check_output_path
    from ..serialization import load, save
    from ..weights import check_state_dict_path, original_state_dict, save_state_dict

    if not out and not state_dict_path:
        raise SntfxError("nothing to write: give --out FILE (the folded sntfx model), --state-dict FILE (its weights "
                         "for the original model class), or both")
    out_path = check_output_path(out, [model_file]) if out else None
    sd_path = check_state_dict_path(check_output_path(state_dict_path, [model_file])) if state_dict_path else None
    if out_path and sd_path and out_path.resolve() == sd_path.resolve():
        raise SntfxError("--out and --state-dict name the same file; give each its own path")
    with console.status(f"loading {model_file} ..."):
        gm = load(model_file, model_file=source_file, trust_source=trust_source)
    gm, report = do_fold(gm, batchnorm=batchnorm, report=True, inplace=True)
    print_pass_report(report)
    info = report.passes[0].info
    if info.get("block_errors"):
        errs = sorted(info["block_errors"].values())
        console.print(
            f"per-block relative error over {len(errs)} blocks: max {errs[-1]:.2e} ({info['worst_block']}), "
            f"median {errs[len(errs) // 2]:.2e}"
        )
    report_json(model=model_file, pipeline=report.to_dict()["passes"], out=out_path, state_dict=sd_path)
    state = original_state_dict(gm) if sd_path else None  # checked before anything is written
    written = [save(gm, out_path)] if out_path else []
    if sd_path:
        written.append(save_state_dict(state, sd_path))
    console.print(f"wrote {' and '.join(f'[bold]{p}[/]' for p in written)}")


@cli.command()
@json_option
@click.argument("file", type=click.Path(dir_okay=False))
@trust_options
@click.option("--quant", "quant_bits", type=click.IntRange(2, 8), default=None, metavar="BITS",
              help="Quantization-readiness report at BITS-bit weights (folded models).")
@click.option("--data", "data_name", default=None, help="Real inputs for --quant sensitivities.", type=TEXT)
@click.option("--data-dir", default=None, type=click.Path(exists=True, file_okay=False))
@click.option("--graph", "graph_out", default=None, type=click.Path(dir_okay=False), metavar="OUT.graphml",
              help="Also write the traced fx graph as GraphML (networkx): one node per fx node with op, target, "
                   "module type, shape, dtype, parameters, SNT style and prunable flag; edges for data flow.")
def inspect(file, source_file, trust_source, quant_bits, data_name, data_dir, graph_out):
    """Show the layers of FILE: expansion, parameters and MACs before/after folding.

    FILE is a saved sntfx model, or a model spec (model.py, torchvision:NAME, ...).
    """
    from ..serialization import load, read_recipe
    from ..graph_utils import count_parameters
    from ..summary import layer_summary
    from ..workflow import is_model_file

    only_with(["data_name"], quant_bits is not None, "--quant BITS")
    only_with(["data_dir"], data_name is not None, "--data NAME")
    saved = is_model_file(file)
    only_with(["source_file", "trust_source"], saved, "a saved model file (.pt)")
    if graph_out is not None:
        from ..io import check_output_path

        graph_out = check_output_path(graph_out, inputs_for(file) + ([source_file] if source_file else []),
                                      option="--graph")
    if saved:
        gm = load(file, model_file=source_file, trust_source=trust_source)
        recipe = read_recipe(file)
        source = recipe["source"]
        pipeline = ",".join(p["name"] for p in recipe["pipeline"]) or "(none)"
    else:
        from ..api import trace

        gm = trace(file)
        source, pipeline = {"kind": "spec", "name": file}, "(none)"
    if graph_out is not None:
        from ..graph_export import write_graphml

        console.print(f"wrote [bold]{write_graphml(gm, graph_out)}[/] (GraphML: one node per fx node)")
    if quant_bits is not None:
        quant_report(gm, quant_bits, data_name, data_dir, file)
        return
    rows = layer_summary(gm)
    report_json(file=file, source=source, pipeline=pipeline, layers=[vars(r) for r in rows])
    table = Table(title=f"{file}: source {source.get('kind')}:{Path(source['name']).name}, passes {pipeline}")
    for col, just in (("layer", "left"), ("kind", "left"), ("expansion", "left"), ("params", "right"),
                      ("folded", "right"), ("MACs", "right"), ("folded", "right")):
        table.add_column(col, justify=just, overflow="fold")
    for r in rows:
        table.add_row(r.path, r.kind, r.expansion or "-", fmt_int(r.params), fmt_int(r.params_folded),
                      fmt_int(r.macs), fmt_int(r.macs_folded))
    total_params = count_parameters(gm)
    folded_params = total_params - sum(r.params - r.params_folded for r in rows)
    macs = sum(r.macs or 0 for r in rows)
    macs_folded = sum(r.macs_folded or 0 for r in rows)
    table.add_section()
    table.add_row("whole model", "", f"{sum(bool(r.expansion) for r in rows)} expanded",
                  fmt_int(total_params), fmt_int(folded_params), fmt_int(macs), fmt_int(macs_folded))
    console.print(table)
    console.print("params and MACs: K = 1e3, M = 1e6, G = 1e9; MACs of conv/linear layers on the recorded input shape",
                  style="dim")


def quant_report(gm, bits: int, data_name, data_dir, file) -> None:
    from ..compress import ensure_folded
    from ..data import fixed_batches, load_data
    from ..quant_report import quant_readiness
    from ..tracing import inputs_from_spec, sntfx_meta

    ensure_folded(gm, f"'{file}'")
    if data_name:
        data = load_data(data_name, data_dir=data_dir)
        inputs = (fixed_batches(data.test, batches=1, batch_size=64)[0][0],)
        source = f"64 {data.info.name} test images"
    else:
        inputs = inputs_from_spec(sntfx_meta(gm).get("input_spec", []))
        source = "random inputs (give --data for real ones)"
    rows = quant_readiness(gm, inputs, bits=bits)
    report_json(file=file, bits=bits, inputs=source, layers=[vars(r) for r in rows])
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
