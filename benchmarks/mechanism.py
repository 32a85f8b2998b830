"""Does a run's mechanism predict how much accuracy it loses under compression? Rank correlations over a study's runs.

    python benchmarks/mechanism.py benchmarks/results/snt-research/04-confirm/smallvgg/results.json \
        --out benchmarks/results/snt-research/04-confirm/mechanism-smallvgg

The study's mechanism tables compare each method's mean with Adam's. This asks
the question one level down, run by run: across every run of a model (all
methods, all seeds), does the folded model's sharpness or weight distribution
go with its loss under the primary compression settings?

For each run (the sweep's images, validation split):

* *pruning drop*: the sweep's float accuracy minus its mean accuracy over the
  pruning score's settings (Wanda 50%, 70%, 2:4, with BatchNorm re-estimation);
* *quantization drop*: the same over the quantization score's settings
  (W4A8, W6A6, W4, W3);

and each mechanism measurement of the folded model (top Hessian eigenvalue,
Hessian trace, SAM sharpness, loss; weight kurtosis, per-channel crest factor,
fraction rounded to zero at W4, centre-tap share where measured).

Two Spearman rank correlations per (drop, measurement), each with a 95%
interval (Fisher z with the Fieller-Hartley-Pearson variance 1.06 / (n - 3)):

* *across runs*: over all runs; methods that differ in both the measurement and
  the drop drive it;
* *within methods*: both quantities centred on their method's mean first, so
  only the seed-to-seed variation inside each method is left (the interval's n
  is reduced by the number of methods less one). A mechanism that explains
  robustness should show here too, not only between methods.

An interval that excludes zero is called an association, nothing more: the runs
of one seed share initial weights and data order, so they are not independent,
and nothing here was pre-registered. It reads validation results only (it
refuses a study evaluated on the test split) and chooses nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from scipy.stats import norm, spearmanr

from sntfx.errors import SntfxError
from sntfx.io import atomic_write
from sntfx.plotting import pyplot, save_png
from sntfx.study.stats import MECHANISM, PRIMARY_SCORES, metrics_of, read_validation_results

DROPS = {"pruning drop": PRIMARY_SCORES["pruning score"], "quantization drop": PRIMARY_SCORES["quantization score"]}
LEVEL = 0.95
FIELLER_VARIANCE = 1.06  # var(atanh(rho_s)) ~ 1.06 / (n - 3) for Spearman's rho (Fieller, Hartley & Pearson, 1957)


def run_table(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per model: one row per run with its method, seed, drops and mechanism measurements (absent ones left out)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for record in results["runs"]:
        m = metrics_of(record)
        if "sweep:float" not in m:
            continue
        row: dict[str, Any] = {"method": record["method"], "seed": record["seed"]}
        for name, keys in DROPS.items():
            if all(k in m for k in keys):
                row[name] = m["sweep:float"] - statistics.fmean(m[k] for k in keys)
        row.update({k: v for k, v in m.items() if k.startswith(MECHANISM) and v is not None and math.isfinite(v)})
        out.setdefault(record["model"], []).append(row)
    return out


def spearman_interval(x: list[float], y: list[float], dof_lost: int = 0) -> dict[str, Any]:
    """Spearman's rho of ``x`` and ``y`` with its 95% Fisher-z interval; ``dof_lost`` shrinks the interval's n (for
    centred data). ``rho`` is None when either side is constant or fewer than 4 effective points remain."""
    n = len(x)
    n_eff = n - dof_lost
    if n_eff < 4 or len(set(x)) < 2 or len(set(y)) < 2:
        return {"rho": None, "ci95": None, "n": n, "n_eff": n_eff}
    rho = float(spearmanr(x, y).statistic)
    z, half = math.atanh(max(min(rho, 1 - 1e-12), -1 + 1e-12)), norm.ppf(0.5 + LEVEL / 2) * math.sqrt(
        FIELLER_VARIANCE / (n_eff - 3))
    return {"rho": rho, "ci95": [math.tanh(z - half), math.tanh(z + half)], "n": n, "n_eff": n_eff}


def _centred(rows: list[dict[str, Any]], key: str) -> list[float]:
    means = {m: statistics.fmean(r[key] for r in rows if r["method"] == m) for m in {r["method"] for r in rows}}
    return [r[key] - means[r["method"]] for r in rows]


def analyse(tables: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per model, drop and mechanism measurement of ``run_table``'s ``tables``: the across-runs and
    within-method correlations."""
    rows = []
    for model, runs in tables.items():
        measurements = sorted({k for r in runs for k in r if k.startswith(MECHANISM)})
        for drop in DROPS:
            for key in measurements:
                both = [r for r in runs if drop in r and key in r]
                if not both:
                    continue
                methods = {r["method"] for r in both}
                rows.append({
                    "model": model, "drop": drop, "measurement": key, "methods": sorted(methods),
                    "across_runs": spearman_interval([r[key] for r in both], [r[drop] for r in both]),
                    "within_methods": spearman_interval(_centred(both, key), _centred(both, drop), len(methods) - 1),
                })
    return rows


def _cell(c: dict[str, Any]) -> str:
    if c["rho"] is None:
        return "n/a"
    lo, hi = c["ci95"]
    mark = " *" if lo > 0 or hi < 0 else ""
    return f"{c['rho']:+.2f} [{lo:+.2f}, {hi:+.2f}]{mark}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | drop | measurement | runs | across runs: Spearman ρ [95%] | within methods: ρ [95%] |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['drop']} | {r['measurement']} | {r['across_runs']['n']} | "
                     f"{_cell(r['across_runs'])} | {_cell(r['within_methods'])} |")
    lines.append("")
    lines.append("`*`: the interval excludes zero (an association between runs, not a pre-registered claim). Drops in "
                 "accuracy points are the sweep's float accuracy minus the mean over the primary score's settings.")
    return "\n".join(lines)


def plot(tables: dict[str, list[dict[str, Any]]], path: Path) -> list[Path]:
    """One PNG per model of ``run_table``'s ``tables`` (PATH.png for one model, PATH-MODEL.png each for several):
    each drop against each mechanism measurement, one colour per method."""
    plt = pyplot()
    written = []
    for model, runs in tables.items():
        keys = sorted({k for r in runs for k in r if k.startswith(MECHANISM)})
        methods = sorted({r["method"] for r in runs}, key=lambda m: (m != "adam", m))
        fig, axes = plt.subplots(len(DROPS), len(keys), figsize=(2.6 * len(keys), 2.4 * len(DROPS)), dpi=100,
                                 squeeze=False)
        for i, drop in enumerate(DROPS):
            for j, key in enumerate(keys):
                ax = axes[i][j]
                for k, method in enumerate(methods):
                    pts = [(r[key], 100 * r[drop]) for r in runs if r["method"] == method and key in r and drop in r]
                    if pts:
                        ax.scatter(*zip(*pts), s=14, color=f"C{k}", label=method)
                ax.grid(alpha=0.3)
                ax.tick_params(labelsize=7)
                if i == len(DROPS) - 1:
                    ax.set_xlabel(key.split(":", 1)[1], fontsize=8)
                if j == 0:
                    ax.set_ylabel(f"{drop} (points)", fontsize=8)
        axes[0][0].legend(fontsize=6)
        fig.suptitle(f"{model}: per-run accuracy drop vs the folded model's mechanism (validation)", fontsize=9)
        fig.tight_layout()
        name = f"{path.name}.png" if len(tables) == 1 else f"{path.name}-{model.replace(':', '-')}.png"
        written.append(save_png(fig, path.parent / name))
    return written


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a study's results.json (validation split)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write OUT.json (the rows), OUT.md (the table) and the scatter plots: OUT.png (one model) or "
                             "OUT-MODEL.png each")
    args = parser.parse_args(argv)
    try:
        results = read_validation_results(args.results, "a mechanism analysis")
    except (SntfxError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    tables = run_table(results)
    rows = analyse(tables)
    if not rows:
        print(f"error: {args.results}: no run has both a sweep and mechanism measurements", file=sys.stderr)
        sys.exit(2)
    text = table(rows)
    print(text)
    if args.out:
        payload = {"results": str(args.results), "level": LEVEL, "rows": rows}
        atomic_write(args.out.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(payload, indent=1) + "\n"))
        atomic_write(args.out.with_suffix(".md"), lambda tmp: tmp.write_text(
            f"# Mechanism vs compression, run by run\n\n`python benchmarks/mechanism.py {args.results} "
            f"--out {args.out}`\n\n{text}\n"))
        for png in plot(tables, args.out):
            print(f"wrote {png}")
        print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return rows


if __name__ == "__main__":
    main()
