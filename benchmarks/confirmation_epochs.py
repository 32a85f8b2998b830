"""The confirmation's schedule rule, applied to Adam's validation curves (validation split only).

    python benchmarks/confirmation_epochs.py benchmarks/results/snt-research/03-adam-curve/smallvgg/results.json \
        benchmarks/results/snt-research/03-adam-curve/resnet20/results.json

For each model: Adam's validation accuracy after every epoch of its long run,
the best of them, and the rule's answer (research log, "Plan for the
confirmation"): the confirmation trains each model for the first epoch count
at which Adam's validation accuracy is within ``--tolerance`` points (0.3) of
its best over the whole curve. With several seeds of Adam the curve is their
mean. Refuses a results file that was evaluated on the test split: the
schedule is chosen on validation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from sntfx.errors import SntfxError
from sntfx.study.stats import read_validation_results


def adam_curves(path: Path) -> dict[str, list[float]]:
    """{model: Adam's validation accuracy after each epoch, mean over its seeds} from one results file."""
    try:
        results = read_validation_results(path, "the schedule")
    except SntfxError as e:
        sys.exit(str(e))
    per_seed: dict[str, list[list[float]]] = {}
    for run in results["runs"]:
        history = (run.get("train") or {}).get("history") or []
        if run["method"] == "adam" and history:
            per_seed.setdefault(run["model"], []).append([h["test_accuracy"] for h in history])
    if not per_seed:
        sys.exit(f"{path}: no trained Adam run with a per-epoch curve; run the curve's study to the end first")
    curves = {}
    for model, seeds in per_seed.items():
        if len({len(c) for c in seeds}) != 1:
            sys.exit(f"{path}: {model}'s Adam runs have curves of different lengths {sorted({len(c) for c in seeds})}; "
                     "finish every run of the study first")
        curves[model] = [statistics.fmean(vals) for vals in zip(*seeds)]
    return curves


def epochs_within(curve: list[float], tolerance: float) -> int:
    """The first epoch (1-based) whose accuracy is within ``tolerance`` (a fraction) of the curve's best."""
    best = max(curve)
    return next(i + 1 for i, acc in enumerate(curve) if acc >= best - tolerance - 1e-12)


def main(argv: list[str] | None = None) -> dict[str, int]:
    """Print each model's curve and the rule's epoch count; return {model: epochs}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="a curve study's results.json (validation split)")
    parser.add_argument("--tolerance", type=float, default=0.3, help="points below the best (default 0.3)")
    args = parser.parse_args(argv)
    chosen: dict[str, int] = {}
    for path in args.results:
        for model, curve in adam_curves(path).items():
            if model in chosen:
                sys.exit(f"{model} has a curve in more than one results file; pass one per model")
            epochs = epochs_within(curve, args.tolerance / 100)
            chosen[model] = epochs
            print(f"{model}: Adam's validation accuracy per epoch (%):")
            for row in range(0, len(curve), 10):
                print("  " + " ".join(f"{100 * a:6.2f}" for a in curve[row:row + 10]))
            print(f"  best {100 * max(curve):.2f} (epoch {curve.index(max(curve)) + 1}); within "
                  f"{args.tolerance:g} points from epoch {epochs} ({100 * curve[epochs - 1]:.2f})")
    print("confirmation epochs: " + ", ".join(f"{m} {e}" for m, e in chosen.items()))
    return chosen


if __name__ == "__main__":
    main()
