"""transform -> train -> fold -> verify with the Python API, on scikit-learn's digits (no download).

    python examples/train_and_fold.py --out train-and-fold

(`make demo` runs the whole study instead: `sntfx study --preset quick`.)

Trains a small CNN twice from the same initialisation and data order: plainly
with Adam, and in its SNT-expanded form (the online fold keeps the step cheap);
folds the SNT model back into the plain architecture, checks the fold is exact,
saves, reloads in place and compares accuracy and sharpness.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import sntfx
from sntfx.blocks import get_style, style_names
from sntfx.data import fixed_batches, load_data
from sntfx.pipelines import DEFAULT_RATIO, DEFAULT_STYLE
from sntfx.sharpness import batch_loss_fn, top_eigenvalue
from sntfx.tracing import compare_outputs
from sntfx.train import TrainConfig, Trainer, evaluate

console = Console()


class Progress:
    def __init__(self, label):
        self.label = label

    def on_epoch_start(self, epoch, steps):
        pass

    def on_step(self, epoch, step, loss, rate):
        pass

    def on_epoch_end(self, r):
        console.print(f"  {self.label:<12} epoch {r['epoch']:>2}  loss {r['train_loss']:.3f}  "
                      f"test acc {r['test_accuracy']:.2%}", highlight=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="train-and-fold")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--style", default=DEFAULT_STYLE, choices=style_names(),
                        help=f"expansion style (default: {DEFAULT_STYLE}, the product's)")
    parser.add_argument("--ratio", type=int, default=DEFAULT_RATIO, help="expansion ratio, for styles that take one")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = load_data("digits")
    x = torch.zeros(data.info.input_shape(2))
    config = TrainConfig(epochs=args.epochs, batch_size=64, lr=3e-3, seed=0)
    console.print(f"[bold]sntfx demo[/]: sntfx:cnn on scikit-learn digits ({len(data.train)} train / "
                  f"{len(data.test)} test images), {args.epochs} epochs of Adam")

    torch.manual_seed(0)
    plain = sntfx.trace("sntfx:cnn", x)
    snt = sntfx.transform(plain, x, style=args.style, ratio=args.ratio)
    ratio = f" x{args.ratio}" if "ratio" in get_style(args.style).options else ""
    plain_result = Trainer(config, Progress("adam")).fit(plain, data, out / "adam.pt")
    snt_result = Trainer(config, Progress(f"snt-{args.style}")).fit(snt, data, out / "snt.pt")

    test_loader = torch.utils.data.DataLoader(data.test, batch_size=256)
    snt.eval()
    xs = torch.stack([data.test[i][0] for i in range(len(data.test))])
    with torch.no_grad():
        logits_expanded = snt(xs)
    folded, report = sntfx.fold(snt, xs[:64], report=True)
    with torch.no_grad():
        fold_error = compare_outputs(logits_expanded, folded(xs))
    sntfx.save(folded, out / "snt_folded.pt", info={"history": snt_result.history})
    sntfx.save(plain, out / "adam.pt", info={"history": plain_result.history})
    reloaded = sntfx.load(out / "snt_folded.pt")

    batches = fixed_batches(data.train, batches=2, batch_size=256)  # sharpness of the training loss
    rows = []
    for name, model in (("Adam", plain), (f"SNT {args.style}{ratio}, folded", folded),
                        ("  reloaded from disk", reloaded)):
        model.eval()
        acc = evaluate(model, test_loader, torch.device("cpu"))["accuracy"]
        eig = top_eigenvalue(batch_loss_fn(model, batches), model, iters=30)
        rows.append((name, sum(p.numel() for p in model.parameters()), acc, eig))

    table = Table(title="Adam vs SNT on digits (same init, same data order)")
    for col in ("model", "parameters", "test accuracy", "top Hessian eigenvalue"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, n, acc, eig in rows:
        table.add_row(name, f"{n:,}", f"{acc:.2%}", f"{eig:.2f}")
    console.print(table)
    trained_params = sum(p.numel() for p in snt.parameters())
    console.print(f"SNT trained {trained_params:,} parameters and folded back to {rows[1][1]:,}: "
                  f"largest per-block error {report.passes[0].info['max_block_error']:.1e}, "
                  f"whole-model logits error {fold_error:.1e}.", highlight=False)
    ok = fold_error < 1e-5 and rows[1][2] == rows[2][2]
    console.print(("[green]fold verified[/]" if ok else "[red]fold check failed[/]") + f"; models in {out}/")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
