"""``export`` and ``bench``: ONNX export verified on ONNX Runtime, int8 QDQ, and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from ..errors import SntfxError
from ..quant import ACT_METHODS
from .app import cli, console, err_console
from .report import json_option, report as report_json
from .options import TEXT, FiniteFloat, alias, exclude_option, merge_alias, only_with, trust_options


@cli.command()
@json_option
@click.argument("model", type=TEXT)
@click.option("--out", "-o", "onnx_path", default=None, type=click.Path(dir_okay=False),
              help="Output .onnx file (QDQ when MODEL was quantized by `sntfx quantize`).")
@alias("--onnx", "onnx_alias", type=click.Path(dir_okay=False))
@click.option("--opset", type=click.IntRange(min=13), default=18, show_default=True)
@click.option("--dynamic-batch", is_flag=True, help="Make the batch dimension dynamic.")
@click.option("--input-shape", default=None, help="Example input shape, e.g. 1,3,32,32 [from --data or the recipe].", type=TEXT)
@click.option("--allow-expanded", is_flag=True, help="Export a model that still holds SNT blocks.")
@click.option("--simplify", is_flag=True, help="Simplify the graph with onnxscript's optimizer (verified too).")
@click.option("--data", "data_name", default=None, help="Verify on (and calibrate int8 with) this dataset.", type=TEXT)
@click.option("--data-dir", default=None, type=click.Path(exists=True, file_okay=False), help="Where the dataset's files are.")
@click.option("--int8", is_flag=True, help="Also write OUT.int8.onnx: the model quantized W8A8 exactly as `sntfx "
              "quantize --wbits 8 --abits 8` does (what the sweeps measure), as QDQ ONNX.")
@click.option("--calib-batches", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--calib-method", type=click.Choice(ACT_METHODS), default="minmax", show_default=True,
              help="Activation-range calibration for --int8.")
@exclude_option("With --int8: leave layers whose module name matches GLOB in float")
@click.option("--min-agreement", type=FiniteFloat(0, 1), default=0.98, show_default=True,
              help="Top-1 agreement with the simulated W8A8 model the int8 file must reach on the verification data.")
@click.option("--weight-type", type=click.Choice(["auto", "int8", "uint8"]), default="auto", show_default=True,
              help="Quantized weights in the file: int8, or uint8 (zero point 128) for 8-bit grids, which ONNX "
                   "Runtime's int8 kernels would saturate on x86 CPUs without VNNI; auto: uint8 on such a CPU.")
@click.option("--verify-samples", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False), help="Write the report as JSON.")
@trust_options
def export(model, onnx_path, onnx_alias, opset, dynamic_batch, input_shape, allow_expanded, simplify, data_name, data_dir, int8,
           calib_batches, calib_method, exclude, min_agreement, weight_type, verify_samples, report_path, source_file,
           trust_source):
    """Export MODEL to ONNX, verified against torch on ONNX Runtime (optionally also int8)."""
    import torch

    from ..data import fixed_batches, load_data
    from ..blocks import is_expanded
    from ..exporters import export_int8, export_onnx
    from ..io import atomic_write, check_output_path
    from ..models import parse_input_shape
    from ..tracing import input_spec, inputs_from_spec, sntfx_meta
    from ..workflow import is_model_file

    onnx_path = merge_alias(onnx_path, onnx_alias, "onnx_path", "--out", "--onnx")
    if onnx_path is None:
        raise SntfxError("give the output file: sntfx export MODEL --out model.onnx")
    out = check_output_path(onnx_path, [model])
    report_out = check_output_path(report_path, [model, onnx_path]) if report_path else None
    int8_path = check_output_path(out.with_name(out.stem + ".int8.onnx"), [model]) if int8 else None
    if int8 and not data_name:
        raise SntfxError("--int8 needs --data to calibrate on, e.g. --data fashion-mnist")
    only_with(["calib_batches", "calib_method", "min_agreement", "exclude"], int8, "--int8")
    only_with(["data_dir"], data_name is not None, "--data NAME")
    saved = is_model_file(model)
    only_with(["source_file", "trust_source"], saved, "a saved model file (.pt)")
    shape = parse_input_shape(input_shape) if input_shape else None
    data = load_data(data_name, data_dir=data_dir) if data_name else None
    if saved:
        from ..serialization import load

        gm = load(model, model_file=source_file, trust_source=trust_source)
        if data is not None:
            from ..workflow import check_saved_takes_data

            check_saved_takes_data(gm, data.info, model)
    elif data is not None and not shape:  # built for the dataset's images and classes, as `sntfx transform` does
        from ..workflow import model_for_data

        gm = model_for_data(model, data.info).eval()
    else:
        from ..api import trace

        gm = trace(model, torch.zeros(shape) if shape else None)
    if int8:
        from ..exporters.qdq import is_quantized

        if is_quantized(gm):
            raise SntfxError(f"'{model}' is already quantized; export it without --int8 (it is written in QDQ form)")
        if is_expanded(gm) and not allow_expanded:
            raise SntfxError("--int8 quantizes the deployed model: fold it first (`sntfx fold`)")
        if exclude:  # checked before anything is written
            from ..compress_utils import check_exclude, select_layers

            try:
                select_layers(gm, exclude=check_exclude(exclude))
            except ValueError as exc:
                raise SntfxError(f"--exclude: {exc}") from exc
    if shape:
        from ..graph_utils import required_inputs

        takes = required_inputs(gm)
        if len(takes) > 1:
            raise SntfxError(f"--input-shape gives one input, but '{model}' takes {len(takes)} ({', '.join(takes)}); "
                             "leave it out to export with the input shapes the model was saved with")
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
        # random inputs shaped like every example input, batch verify_samples
        verify = inputs_from_spec([{**item, "shape": [verify_samples, *item["shape"][1:]]}
                                   for item in input_spec(example)])
    with console.status("exporting to ONNX ..."):
        report = export_onnx(gm, out, example, opset=opset, dynamic_batch=dynamic_batch,
                             allow_expanded=allow_expanded, simplify=simplify, verify_inputs=verify,
                             weight_type=weight_type)
    v = report.verification
    simplified = ("" if not simplify else ", simplified" if report.simplified
                  else ", --simplify found nothing to simplify (the graph is unchanged)")
    console.print(f"exported with {report.exporter} (opset {opset}{', dynamic batch' if dynamic_batch else ''}"
                  f"{simplified}): {report.size_bytes / 1e6:.2f} MB; verified on "
                  f"{v['samples']} {'real' if data else 'random'} inputs: max abs {v['max_abs']:.2e}, rel {v['rel']:.2e}"
                  + (f", top-1 agreement {v['top1_agreement']:.2%}" if "top1_agreement" in v else ""), highlight=False)
    if report.quantized:
        console.print(f"quantized model exported in QDQ form ({_weights_summary(report.qdq_weights)}); ONNX Runtime "
                      f"runs {_integer_summary(report.integer_ops)}", highlight=False)
    if report.fallback_reason:
        console.print(f"[yellow]torch.export-based export failed ({report.fallback_reason}); used the TorchScript exporter[/]")
    payload = {"float": report.to_dict()}
    if int8:
        with console.status("quantizing W8A8 and exporting QDQ ..."):
            int8_info = export_int8(gm, int8_path, data, verify, example_inputs=example, calib_batches=calib_batches,
                                    calib_method=calib_method, min_top1=min_agreement, dynamic_batch=dynamic_batch,
                                    exclude=exclude, weight_type=weight_type)
        int8_info.pop("model")
        check = int8_info["verification"]
        console.print(f"int8 model {int8_path} ({int8_path.stat().st_size / 1e6:.2f} MB): top-1 agreement with the "
                      f"simulated W8A8 model {check['top1_agreement']:.2%} on {check['samples']} inputs "
                      f"({_weights_summary(int8_info['qdq_weights'])}); ONNX Runtime runs "
                      f"{_integer_summary(int8_info['integer_ops'])}", highlight=False)
        payload["int8"] = {"path": str(int8_path), **int8_info}
    report_json(**payload)
    if report_out:
        atomic_write(report_out, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))
    console.print(f"wrote [bold]{out}[/]")


def _weights_summary(containers: dict[str, int]) -> str:
    return "weights " + ", ".join(f"{kind} in {n} layer{'s' * (n != 1)}" for kind, n in sorted(containers.items()))


def _integer_summary(ops: dict[str, int]) -> str:
    counts = {k: v for k, v in ops.items() if k != "total"}
    if not counts:
        return "no operator on integer kernels (no QDQ fusion applied: e.g. activations below 8 bits)"
    return ", ".join(f"{v} {k}" for k, v in counts.items()) + f" on integer kernels ({ops.get('total', 0)} nodes)"


@cli.command()
@json_option
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--provider", type=click.Choice(["auto", "tensorrt", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--batch-sizes", default="1,8,32", show_default=True, type=TEXT)
@click.option("--iters", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--data", "data_name", default=None, help="Also measure accuracy on this dataset's test split.", type=TEXT)
@click.option("--data-dir", default=None, type=click.Path(exists=True, file_okay=False), help="Where the dataset's files are.")
@click.option("--out", "-o", default=None, type=click.Path(dir_okay=False), help="Write results as JSON.")
def bench(models, provider, batch_sizes, iters, warmup, data_name, data_dir, out):
    """Benchmark ONNX MODELS on ONNX Runtime side by side: latency, throughput, accuracy, size."""
    from ..data import load_data
    from ..exporters import bench_onnx, onnx_accuracy
    from ..io import atomic_write, check_output_path

    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise SntfxError(f"--batch-sizes must be integers separated by commas, got {batch_sizes!r}") from None
    if not sizes or min(sizes) < 1:
        raise SntfxError("--batch-sizes must list positive integers, e.g. 1,8,32")
    out_path = check_output_path(out, list(models)) if out else None
    only_with(["data_dir"], data_name is not None, "--data NAME")
    from ..exporters.ort_bench import check_onnx_model

    data = load_data(data_name, data_dir=data_dir) if data_name else None
    for path in models:  # every file is checked before anything is measured
        check_onnx_model(path, tuple(data.info.input_shape(1)[1:]) if data is not None else None)
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
    report_json(results=[r.to_dict() for r in results])
    if out_path:
        atomic_write(out_path, lambda tmp: tmp.write_text(json.dumps([r.to_dict() for r in results], indent=2)))
        console.print(f"wrote [bold]{out_path}[/]")
