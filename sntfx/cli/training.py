"""``train`` and ``sharpness``: train a model (one process or torchrun) and measure how sharp it is."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from ..errors import SntfxError
from ..train import BASE_OPTIMIZERS, OPTIMIZERS
from .app import cli, console
from .report import json_option, report as report_json
from .console import TrainProgress, train_progress
from .options import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    TEXT,
    check_weights_options,
    json_kwargs,
    model_spec,
    only_with,
    trust_options,
    unique_names,
    weights_options,
    world_size,
)


@cli.command()
@json_option
@click.argument("model", type=TEXT)
@click.option("--data", "data_name", required=True, help="digits, fashion-mnist, cifar10, cifar100, synthetic, or an ImageFolder dir.", type=TEXT)
@click.option("--data-dir", default=None, type=click.Path(exists=True, file_okay=False), help="Where the dataset's files are.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Output .pt file.")
@click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default="adam", show_default=True,
              help="adamw: decoupled weight decay (--weight-decay), the default of timm and Hugging Face.")
@click.option("--sam-base", type=click.Choice(list(BASE_OPTIMIZERS)), default="adam", show_default=True,
              help="Optimizer SAM wraps.")
@click.option("--rho", type=POSITIVE, default=0.05, show_default=True, help="SAM neighbourhood radius.")
@click.option("--adaptive", is_flag=True, help="Adaptive SAM (ASAM).")
@click.option("--lr", type=POSITIVE, default=None, help="Learning rate [1e-3 adam/adamw, 0.1 sgd].")
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
@click.option("--val-images", type=click.IntRange(min=0), default=0, show_default=True,
              help="Hold out N training images (stratified; the same N images for every seed) and report accuracy "
                   "on them each epoch; the test split is then not read. Choose epochs, learning rate and style on "
                   "these; measure test once, at the end (sntfx sweep).")
@click.option("--device", default="auto", show_default=True, type=TEXT)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint beside --out.")
@click.option("--kwargs", default=None, help="JSON constructor arguments for a model spec.", type=TEXT)
@click.option("--entry", default=None, help="Factory name in model.py.", type=TEXT)
@weights_options
@trust_options
def train(model, data_name, data_dir, epochs, out, optimizer, sam_base, rho, adaptive, lr, weight_decay, batch_size,
          schedule, warmup_epochs, label_smoothing, seed, amp, no_online_fold, checkpoint_every, limit_batches,
          deterministic, sync_bn, workers, val_images, device, resume, kwargs, entry, weights_file, pretrained,
          source_file, trust_source):
    """Train MODEL (a file from `sntfx transform`, or a model spec for the baselines).

    Launch with torchrun for DistributedDataParallel:
    torchrun --nproc_per_node=N -m sntfx train ...
    """
    from ..data import hold_out, load_data
    from ..io import check_output_path
    from ..serialization import save
    from ..train import TrainConfig, Trainer, _dist_info, init_distributed, resolve_device, shutdown_distributed
    from ..weights import weights_source
    from ..workflow import is_model_file, model_for_data

    out_path = check_output_path(out, [model] + [p for p in (data_name, weights_file) if p and Path(p).exists()])
    only_with(["sam_base", "rho", "adaptive"], optimizer == "sam", "--optimizer sam")
    saved = is_model_file(model)
    only_with(["kwargs", "entry", "weights_file", "pretrained"], not saved,
              "a model spec (they are fixed in a saved model file)")
    if not saved:
        check_weights_options(model_spec(model, entry, kwargs), weights_file, pretrained)
    only_with(["source_file", "trust_source"], saved, "a saved model file (.pt)")
    only_with(["sync_bn"], world_size() > 1, "several processes (torchrun --nproc_per_node=N)")
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
    split = "test"
    if val_images:  # the trainer reports on data.test: hand it the validation split instead
        data, split = hold_out(data, val_images).evaluated_on("val"), "validation"
    import torch

    torch.manual_seed(seed)  # the same initial weights in every process and every run with this seed
    gm = model_for_data(model, data.info, kwargs=json_kwargs(kwargs), entry=entry, model_file=source_file,
                        trust_source=trust_source, weights=weights_file, pretrained=pretrained)
    started = weights_source(weights_file, pretrained)
    with train_progress() as progress:
        result = Trainer(config, TrainProgress(progress, rank, split)).fit(gm, data, out_path, resume=resume)
    if rank == 0:
        final = result.final
        # the history's per-epoch "test_accuracy" was read on curve_split (validation with --val-images)
        held_out = {"curve_split": split, "val_images": val_images}
        save(gm, out_path, info={"training": config.to_dict(), "data": data.info.to_dict(), "history": result.history,
                                 **held_out, **({"initial_weights": started} if started else {})})
        report_json(model=model, out=out_path, data=data.info.to_dict(), training=config.to_dict(),
                    history=result.history, final=final, seconds=result.seconds, **held_out)
        console.print(f"trained {len(result.history)} epochs in {result.seconds:.1f}s: {split} accuracy "
                      f"{final.get('test_accuracy', float('nan')):.2%}, train loss {final.get('train_loss', float('nan')):.4f}; "
                      f"wrote [bold]{out_path}[/]", highlight=False)


@cli.command()
@json_option
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
def sharpness(models, data_name, data_dir, batches, batch_size, rho, iters, trace_samples, landscape, out, seed,
              source_file, trust_source):
    """Measure the sharpness of trained MODELS (folded first, so all share one architecture)."""
    from .. import sharpness as sh
    from ..api import fold as do_fold
    from ..blocks import is_expanded
    from ..data import fixed_batches, load_data
    from ..io import atomic_write, check_output_path
    from ..serialization import load
    from ..workflow import check_saved_takes_data

    out_path = check_output_path(out, list(models))
    only_with(["data_dir"], data_name is not None, "--data NAME")
    loaded = {}
    for name, path in zip(unique_names(models), models):  # every file is checked before any measuring starts
        gm = load(path, model_file=source_file, trust_source=trust_source)
        if is_expanded(gm):
            gm = do_fold(gm, inplace=True)
        loaded[name] = gm
    data = load_data(data_name, data_dir=data_dir, seed=seed)
    for path, gm in zip(models, loaded.values()):
        check_saved_takes_data(gm, data.info, path)
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
    report_json(out=out_path, **payload)
    console.print(f"wrote [bold]{out_path}[/]" + (f" and {', '.join(plots)}" if plots else ""))
