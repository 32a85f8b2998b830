"""``prune``, ``quantize``, ``sweep``: compress a folded model and measure what it costs in accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from ..errors import SntfxError
from ..quant import ACT_METHODS
from ..workflow import check_saved_takes_data
from .app import cli, console
from .report import json_option, report as report_json
from .console import TrainProgress, print_pass_report, train_progress
from .options import (FRACTION, POSITIVE, TEXT, alias, exclude_option, load_folded, merge_alias, only_with,
                      trust_options, unique_names)


@cli.command()
@json_option
@click.argument("model", type=TEXT)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False))
@click.option("--sparsity", type=FRACTION, default=None,
              help="Fraction of zeros (magnitude, wanda) or of channels removed (structured); not for N:M.")
@click.option("--method", type=click.Choice(["magnitude", "wanda", "nm", "structured"]), default="magnitude",
              show_default=True, help="wanda: activation-aware |W| x ||input|| on --data images, no retraining.")
@click.option("--scope", type=click.Choice(["global", "layer", "row"]), default=None,
              help="One ranking across layers, the same fraction in each layer, or in each output row [global for "
                   "magnitude, row for wanda, layer for structured].")
@click.option("--nm", "nm_pattern", default=None, help="N:M pattern for --method nm or wanda [2:4].", type=TEXT)
@click.option("--importance", type=click.Choice(["magnitude", "taylor", "lamp"]), default=None,
              help="Channel importance for --method structured [magnitude]; taylor needs --data.")
@click.option("--round-to", type=click.IntRange(min=1), default=None, help="Structured: channel counts multiple of N.")
@click.option("--exclude-first", is_flag=True, help="Keep the first layer dense.")
@click.option("--exclude-last", is_flag=True, help="Keep the classifier dense (structured pruning always does).")
@exclude_option()
@click.option("--recalibrate-bn", is_flag=True, help="Re-estimate BatchNorm statistics on --data images afterwards.")
@click.option("--data", "data_name", default=None, help="Dataset: accuracy before/after, Taylor importance, fine-tuning.", type=TEXT)
@click.option("--data-dir", default=None, type=click.Path(exists=True, file_okay=False), help="Where the dataset's files are.")
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Fine-tune after pruning with the zeros held fixed (needs --data).")
@click.option("--lr", type=POSITIVE, default=1e-4, show_default=True, help="Fine-tuning learning rate (Adam).")
@trust_options
def prune(model, out, sparsity, method, scope, nm_pattern, importance, round_to, exclude_first, exclude_last,
          exclude, recalibrate_bn, data_name, data_dir, finetune_epochs, lr, source_file, trust_source):
    """Prune a folded MODEL: magnitude or activation-aware (exact sparsity), N:M, or structured channels."""
    from sntfx.passes import MagnitudePrune, NMPrune, StructuredPrune, WandaPrune

    from ..compress import accuracy, apply_pass
    from ..data import load_data
    from ..io import check_output_path
    from ..serialization import save

    out_path = check_output_path(out, [model])
    only_with(["nm_pattern"], method in ("nm", "wanda"), "--method nm or wanda")
    only_with(["importance", "round_to"], method == "structured", "--method structured")
    only_with(["scope"], method != "nm" and not nm_pattern,
              "--method magnitude, wanda or structured (N:M is per group of M weights)")
    scopes = {"magnitude": ("global", "layer"), "wanda": ("row", "layer"), "structured": ("global", "layer")}
    if scope is not None and scope not in scopes.get(method, ()):
        raise SntfxError(f"--scope {scope} does not apply to --method {method}; choose {' or '.join(scopes[method])}")
    if (method == "wanda" or recalibrate_bn) and not data_name:
        raise SntfxError(f"{'--method wanda' if method == 'wanda' else '--recalibrate-bn'} needs calibration images: "
                         "add --data NAME (e.g. --data fashion-mnist)")
    only_with(["lr"], finetune_epochs > 0, "--finetune-epochs N")
    only_with(["data_dir"], data_name is not None, "--data NAME")
    if (method == "nm" or nm_pattern) and sparsity is not None:
        raise SntfxError("N:M pruning zeroes exactly N of every M weights (2:4 is 50%), so --sparsity does not apply: "
                         "drop it and choose the pattern with --nm N:M")
    if method != "nm" and not nm_pattern and sparsity is None:
        raise SntfxError(f"--method {method} needs --sparsity, e.g. --sparsity 0.5")
    if finetune_epochs and not data_name:
        raise SntfxError("--finetune-epochs needs --data")
    if importance == "taylor" and not data_name:
        raise SntfxError("--importance taylor needs --data (it scores channels by gradients on labelled images)")
    try:
        if method == "magnitude":
            p = MagnitudePrune(sparsity, scope=scope or "global", exclude_first=exclude_first,
                               exclude_last=exclude_last, recalibrate_bn=recalibrate_bn, exclude=exclude)
        elif method == "wanda":
            p = WandaPrune(sparsity, pattern=nm_pattern, scope=scope or "row", recalibrate_bn=recalibrate_bn,
                           exclude_first=exclude_first, exclude_last=exclude_last, exclude=exclude)
        elif method == "nm":
            n, m = NMPrune.parse_pattern(nm_pattern or "2:4")
            p = NMPrune(n, m, exclude_first=exclude_first, exclude_last=exclude_last, recalibrate_bn=recalibrate_bn,
                        exclude=exclude)
        else:
            p = StructuredPrune(sparsity, importance=importance or "magnitude", round_to=round_to,
                                global_pruning=scope == "global", exclude_first=exclude_first,
                                recalibrate_bn=recalibrate_bn, exclude=exclude)
    except ValueError as exc:
        raise SntfxError(str(exc)) from exc
    gm = load_folded(model, source_file, trust_source)
    data = load_data(data_name, data_dir=data_dir) if data_name else None
    if data is not None:
        check_saved_takes_data(gm, data.info, model)
    before = accuracy(gm, data) if data else None
    with console.status("pruning ..."):
        report = apply_pass(gm, p, data, inplace=True)
    gm = report.graph_module
    print_pass_report(report)
    if finetune_epochs:
        from ..compress import finetune_sparse

        with train_progress() as progress:
            finetune_sparse(gm, data, finetune_epochs, lr, callback=TrainProgress(progress, 0))
    zeros = sum(int((q == 0).sum()) for n, q in gm.named_parameters() if n.endswith("weight") and q.dim() > 1)
    total = sum(q.numel() for n, q in gm.named_parameters() if n.endswith("weight") and q.dim() > 1)
    line = f"weights zero: {zeros / total:.2%} of {total:,}; parameters {sum(q.numel() for q in gm.parameters()):,}"
    after = accuracy(gm, data) if data else None
    if data:
        line += f"; accuracy {before:.2%} -> {after:.2%}"
    console.print(line, highlight=False)
    report_json(model=model, out=out_path, pipeline=report.to_dict()["passes"], sparsity=zeros / total,
                accuracy_before=before, accuracy_after=after, finetune_epochs=finetune_epochs)
    save(gm, out_path)
    console.print(f"wrote [bold]{out_path}[/]")


@cli.command()
@json_option
@click.argument("model", type=TEXT)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False))
@click.option("--wbits", type=int, default=8, show_default=True)
@click.option("--abits", type=int, default=None, help="Activation bits (4-8); needs --data for calibration.")
@click.option("--granularity", type=click.Choice(["channel", "tensor"]), default="channel", show_default=True)
@click.option("--clip", "method", type=click.Choice(["rtn", "mse"]), default="rtn", show_default=True,
              help="Weight range: max-abs (rtn) or MSE-optimal clipping.")
@alias("--method", "method_alias", type=click.Choice(["rtn", "mse"]))
@click.option("--calib-method", "act_method", type=click.Choice(ACT_METHODS), default="minmax",
              show_default=True, help="Activation-range calibration (with --abits).")
@alias("--act-method", "act_method_alias", type=click.Choice(ACT_METHODS))
@click.option("--calib-batches", type=click.IntRange(min=1), default=16, show_default=True)
@exclude_option()
@click.option("--data", "data_name", default=None, help="Calibrate activations on (and measure accuracy on) this dataset.", type=TEXT)
@click.option("--data-dir", default=None, type=click.Path(exists=True, file_okay=False), help="Where the dataset's files are.")
@trust_options
def quantize(model, out, wbits, abits, granularity, method, method_alias, act_method, act_method_alias, calib_batches,
             exclude, data_name, data_dir, source_file, trust_source):
    """Quantize a folded MODEL (weights, and activations with --abits); `sntfx export` ships it as QDQ ONNX."""
    from sntfx.passes import SimulatedQuantize

    from ..compress import accuracy, apply_pass
    from ..data import load_data
    from ..io import check_output_path
    from ..serialization import save

    out_path = check_output_path(out, [model])
    method = merge_alias(method, method_alias, "method", "--clip", "--method")
    act_method = merge_alias(act_method, act_method_alias, "act_method", "--calib-method", "--act-method")
    try:
        p = SimulatedQuantize(wbits=wbits, abits=abits, granularity=granularity, method=method, act_method=act_method,
                              exclude=exclude)
    except ValueError as exc:
        raise SntfxError(f"{exc} (--wbits / --abits / --exclude)") from exc
    only_with(["act_method", "act_method_alias", "calib_batches"], abits is not None, "--abits BITS")
    only_with(["data_dir"], data_name is not None, "--data NAME")
    if abits is not None and not data_name:
        raise SntfxError("--abits needs --data to calibrate the activation ranges on real images")
    gm = load_folded(model, source_file, trust_source)
    data = load_data(data_name, data_dir=data_dir) if data_name else None
    if data is not None:
        check_saved_takes_data(gm, data.info, model)
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
    after = accuracy(gm, data) if data else None
    if data:
        console.print(f"accuracy {before:.2%} -> {after:.2%}", highlight=False)
    report_json(model=model, out=out_path, pipeline=report.to_dict()["passes"], accuracy_before=before,
                accuracy_after=after)
    save(gm, out_path)
    console.print(f"wrote [bold]{out_path}[/]")


@cli.command()
@json_option
@click.argument("models", nargs=-1, required=True, type=TEXT)
@click.option("--data", "data_name", required=True, type=TEXT)
@click.option("--data-dir", default=None, type=click.Path(exists=True, file_okay=False), help="Where the dataset's files are.")
@click.option("--sparsities", default="0.5,0.7,0.8,0.9", show_default=True)
@click.option("--channel-sparsities", default="", help="Structured channel sparsities, e.g. 0.2,0.4.")
@click.option("--bits", default="8,6,5,4,3", show_default=True)
@click.option("--act-bits", default="8:8,4:8", show_default=True, help="W:A settings with calibrated activations.")
@click.option("--mse-bits", default="", help="Weight-only settings like --bits whose per-channel ranges minimise the "
                                              "rounding error (clipping the largest weights where that pays), e.g. 4,3.")
@click.option("--out", "-o", default="sweep.json", show_default=True, type=click.Path(dir_okay=False),
              help="JSON results; PNG plots are written beside it.")
@exclude_option()
@trust_options
def sweep(models, data_name, data_dir, sparsities, channel_sparsities, bits, act_bits, mse_bits, out, exclude,
          source_file, trust_source):
    """Accuracy of folded MODELS under pruning and quantization, without fine-tuning, on one set of axes."""
    from ..compress import check_sweep_settings, parse_sweep_axis
    from ..compress import sweep as run_sweep
    from ..compress_utils import check_exclude
    from ..data import load_data
    from ..io import atomic_write, check_output_path

    out_path = check_output_path(out, list(models))
    only_with(["data_dir"], data_name is not None, "--data NAME")
    sp = parse_sweep_axis(sparsities, "fraction", "--sparsities")
    csp = parse_sweep_axis(channel_sparsities, "fraction", "--channel-sparsities")
    bw = parse_sweep_axis(bits, "bits", "--bits")
    ab = parse_sweep_axis(act_bits, "wa", "--act-bits")
    mb = parse_sweep_axis(mse_bits, "bits", "--mse-bits")
    check_sweep_settings(sparsities=sp, channel_sparsities=csp, bits=bw, act_bits=ab, mse_bits=mb)
    try:
        exclude = check_exclude(exclude)
    except ValueError as exc:
        raise SntfxError(f"--exclude: {exc}") from exc
    names = unique_names(models)
    gms = {name: load_folded(m, source_file, trust_source) for name, m in zip(names, models)}
    data = load_data(data_name, data_dir=data_dir)
    for m, gm in zip(models, gms.values()):  # every model is checked before anything is measured
        check_saved_takes_data(gm, data.info, m)
    results = {}
    for name, gm in gms.items():
        with console.status(f"sweeping {name} ...") as status:
            results[name] = run_sweep(gm, data, sparsities=sp, channel_sparsities=csp, bits=bw, act_bits=ab,
                                      mse_bits=mb, exclude=exclude,
                                      progress=lambda label, name=name: status.update(f"sweeping {name}: {label}"))
    table = Table(title=f"accuracy on {data.info.name} test ({len(data.test)} images), no fine-tuning")
    table.add_column("setting")
    for name in results:
        table.add_column(name, justify="right")
    keys = [("float", None)] + [("sparsity", k) for k in map(str, sp)] + [("channel_sparsity", k) for k in map(str, csp)]
    keys += [("bits", str(b)) for b in bw] + [("bits_mse", str(b)) for b in mb]
    keys += [("act_bits", f"W{w}A{a}") for w, a in ab]
    for section, key in keys:
        label = {"float": "float", "sparsity": f"sparsity {key}", "channel_sparsity": f"channels -{key}",
                 "bits": f"W{key}", "bits_mse": f"W{key} (MSE ranges)", "act_bits": key}[section]
        row = []
        for r in results.values():
            v = r[section] if key is None else r[section][key]
            row.append(f"{(v['accuracy'] if isinstance(v, dict) else v):.2%}")
        table.add_row(label, *row)
    console.print(table)
    plots = sweep_plots(results, out_path, data.info.name)
    report_json(data=data.info.to_dict(), results=results, out=out_path, plots=plots)
    atomic_write(out_path, lambda tmp: tmp.write_text(json.dumps({"data": data.info.to_dict(), "results": results,
                                                                   "plots": plots}, indent=2)))
    console.print(f"wrote [bold]{out_path}[/] and {', '.join(plots)}")


def sweep_plots(results: dict, out_path: Path, dataset: str) -> list[str]:
    from ..plotting import pyplot, save_png

    plt = pyplot()
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
        save_png(fig, path)
        written.append(str(path))
    return written
