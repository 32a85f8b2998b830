"""The confirmation's closing table: every model and method of its studies, on the split the files were read on.

    python benchmarks/final_table.py \
        benchmarks/results/snt-research/04-confirm/smallvgg/results.test.json \
        benchmarks/results/snt-research/04-confirm/resnet8/results.test.json \
        --step-costs benchmarks/results/train-step/cpu-confirm-candidates.json --default snt-lin-branch

Chooses nothing. The default is the one ``choose_default.py`` chose on the validation split (``--default`` marks
its rows); this only lays out what the studies measured, usually on the test split after that choice
(``finish.sh`` writes it as ``final.test.md``). Two tables:

- accuracy: per model and method, the float accuracy and each primary score's mean accuracy over its settings
  (each run's mean over the settings, then the mean over seeds with its 95% t interval);
- gains: the paired gains over Adam with their intervals and the issue's goal test, as ``choose_default.py``
  prints them (SAM is the reference row), here read on the files' split.

Every file must be read on the same split; the heading names it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from choose_default import step_costs, table, verdicts  # noqa: E402  (a sibling script)

from sntfx.study.stats import PRIMARY_SCORES, mean_interval, metrics_of  # noqa: E402

SPLITS = {"val": "validation split", "test": "test split"}


def fail(message: str) -> None:
    """Bad input: the message on stderr, exit 2."""
    print(f"final_table.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def load(path: Path) -> dict[str, Any]:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        fail(f"{path}: not a study's results file ({e})")
    if not isinstance(results, dict) or not {"config", "runs", "summary"} <= results.keys():
        fail(f"{path}: not a study's results file (it needs config, runs and summary; "
                 "give the results.json or results.test.json a study wrote)")
    return results


def accuracy_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model and method, in the study's order: seeds, float accuracy and each primary score's accuracy."""
    per_run: dict[tuple[str, str], list[dict[str, float]]] = {}
    for record in results["runs"]:
        per_run.setdefault((record["model"], record["method"]), []).append(metrics_of(record))
    rows = []
    for (model, method), runs in per_run.items():
        row = {"model": model, "method": method, "seeds": len(runs),
               "float": mean_interval([m["float"] for m in runs if "float" in m])}
        for name, keys in PRIMARY_SCORES.items():
            means = [statistics.fmean(m[k] for k in keys) for m in runs if all(k in m for k in keys)]
            row[name] = mean_interval(means)
        rows.append(row)
    return rows


def _acc(stat: dict[str, Any]) -> str:
    if stat.get("mean") is None:
        return "-"
    ci = stat.get("ci95")
    return f"{100 * stat['mean']:.2f}" + (f" [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if ci else "")


def accuracy_table(rows: list[dict[str, Any]], default: str | None) -> str:
    names = list(PRIMARY_SCORES)
    lines = ["| model | method | seeds | float | " + " | ".join(n.replace("score", "accuracy") for n in names) + " |",
             "|" + "---|" * (len(names) + 4)]
    for r in rows:
        method = f"**{r['method']}** (default)" if r["method"] == default else r["method"]
        lines.append(f"| {r['model']} | {method} | {r['seeds']} | {_acc(r['float'])} | "
                     + " | ".join(_acc(r[n]) for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="a study's results file (results.test.json)")
    parser.add_argument("--step-costs", type=Path, help="a benchmarks/bench_train_step.py results file")
    parser.add_argument("--default", help="the method choose_default.py chose on validation (its rows are marked)")
    args = parser.parse_args(argv)
    all_results = [load(p) for p in args.results]
    splits = {r["config"].get("evaluate_on", "test") for r in all_results}
    if len(splits) != 1:
        fail("the files were read on different splits (" + ", ".join(sorted(splits)) + "); give files of one")
    split = SPLITS.get(splits.pop(), "unknown split")
    rows = [row for r in all_results for row in accuracy_rows(r)]
    if args.default is not None and args.default not in {row["method"] for row in rows}:
        fail(f"--default {args.default}: no such method in the files (they have "
                 + ", ".join(sorted({row["method"] for row in rows})) + ")")
    costs = step_costs(args.step_costs)
    all_verdicts = [v for r in all_results for v in verdicts(r, costs)]
    out = "\n".join([
        f"Accuracy in %, mean over seeds with its 95% t interval ({split}); a primary score's accuracy is each "
        "run's mean over the score's settings (" + "; ".join(f"{n}: {', '.join(k)}" for n, k in PRIMARY_SCORES.items())
        + ").", "", accuracy_table(rows, args.default), "",
        f"Paired gains over Adam in points, 95% t interval over seeds in brackets ({split}); the goal column is the "
        "issue's goal read on this split (the choice was made on validation).", "", table(all_verdicts)])
    print(out)
    return out


if __name__ == "__main__":
    main()
