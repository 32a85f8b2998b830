"""The demo: transform -> train briefly -> fold -> verify, on scikit-learn's digits.

Runs in well under a minute on 2 CPU cores and needs no download:

    python examples/demo.py --out demo-results
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sklearn.datasets import load_digits

import sntfx

console = Console()


def digits(seed: int = 0):
    """8x8 digits as (N, 1, 8, 8) float tensors in [0, 1], a fixed 80/20 split."""
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return (x[perm[:cut]], y[perm[:cut]]), (x[perm[cut:]], y[perm[cut:]])


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-results")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--style", default="linear", choices=["linear", "branch", "qa-branch"])
    parser.add_argument("--ratio", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    (xtr, ytr), (xte, yte) = digits()
    example = xtr[:2]
    snt, report = sntfx.transform(
        "sntfx:cnn", example, style=args.style, ratio=args.ratio, report=True
    )
    console.print(f"[bold]transform[/] sntfx:cnn -> {args.style} x{args.ratio}: "
                  f"{report.passes[0].params_before:,} -> {report.passes[0].params_after:,} parameters")

    opt = torch.optim.Adam(snt.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("training", total=args.epochs)
        for _ in range(args.epochs):
            snt.train()
            for idx in torch.randperm(len(xtr), generator=gen).split(64):
                loss = F.cross_entropy(snt(xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            progress.advance(task)
    acc_expanded = accuracy(snt, xte, yte)
    with torch.no_grad():
        logits_expanded = snt(xte)

    folded, freport = sntfx.fold(snt, xte[:64], report=True)
    acc_folded = accuracy(folded, xte, yte)
    with torch.no_grad():
        logits_folded = folded(xte)
    rel = ((logits_folded - logits_expanded).norm() / logits_expanded.norm()).item()
    sntfx.save(folded, out / "folded.pt")
    reloaded = sntfx.load(out / "folded.pt")
    acc_reloaded = accuracy(reloaded, xte, yte)

    original = sntfx.build_model("sntfx:cnn")
    table = Table(title="SNT demo on scikit-learn digits (360 test images)")
    table.add_column("model")
    table.add_column("parameters", justify="right")
    table.add_column("test accuracy", justify="right")
    table.add_row("original sntfx:cnn", f"{sum(p.numel() for p in original.parameters()):,}", "-")
    table.add_row(f"SNT-expanded ({args.style} x{args.ratio}), trained", f"{sum(p.numel() for p in snt.parameters()):,}", f"{acc_expanded:.2%}")
    table.add_row("folded back", f"{sum(p.numel() for p in folded.parameters()):,}", f"{acc_folded:.2%}")
    table.add_row("folded, saved and reloaded", f"{sum(p.numel() for p in reloaded.parameters()):,}", f"{acc_reloaded:.2%}")
    console.print(table)
    console.print(f"fold: largest per-block error {freport.passes[0].info['max_block_error']:.2e}, "
                  f"whole-model logits relative error {rel:.2e}")
    ok = rel < 1e-5 and acc_folded == acc_expanded == acc_reloaded
    console.print(("[green]fold verified: same outputs, same accuracy[/]" if ok else "[red]fold mismatch[/]")
                  + f"; model written to {out / 'folded.pt'}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
