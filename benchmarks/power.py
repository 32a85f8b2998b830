"""How much could a study's seeds have seen? Power of the paired primary scores, from its validation results.

    python benchmarks/power.py benchmarks/results/snt-research/04-confirm/smallvgg/results.json \
        --out benchmarks/results/snt-research/04-confirm/power-smallvgg.json

For every method and primary score (the pre-registered paired gains over Adam,
per seed), from the spread of its per-seed gains (sample standard deviation
``sd`` over ``n`` seeds):

* the 95% interval's half-width (the study's own interval, ``t(0.975, n-1) sd /
  sqrt(n)``) and its upper end: the largest true gain the seeds leave plausible;
* the minimum detectable gain: the true mean gain a two-sided paired t test at
  5% (the study's "helps" rule: the interval excludes zero) finds with 80%
  probability with ``n`` seeds, from the noncentral t distribution;
* the seeds the same test would need to find a gain of ``--effect`` points
  (1 by default) with 80% probability, if the spread stays as measured.

It reads validation results only (it refuses a study evaluated on the test
split, like ``choose_default.py``), and the spread is itself estimated from
few seeds: these are planning figures, not results.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import chi2, norm, t

from sntfx.errors import SntfxError
from sntfx.io import atomic_write
from sntfx.study.stats import PRIMARY_SCORES, confidence_interval, read_validation_results

ALPHA = 0.05
POWER = 0.80
MAX_SEEDS = 1000


def power(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Probability that a two-sided paired t test at ``alpha`` over ``n`` seeds rejects zero when the true mean
    gain is ``effect`` and the per-seed gains spread with standard deviation ``sd`` (the noncentral t)."""
    if n < 2:
        return 0.0
    if sd <= 0:
        return 1.0 if effect != 0 else alpha
    df, crit = n - 1, float(t.ppf(1 - alpha / 2, n - 1))
    nc = effect * math.sqrt(n) / sd
    # P(|T| > crit) for T = (Z + nc) / sqrt(V / df), Z normal, V chi-squared(df): the rejection probability given V,
    # averaged over V at its quantiles (midpoint rule in probability; scipy's noncentral t returns NaN far in its
    # tails, where this stays accurate)
    scaled = crit * np.sqrt(_chi2_quantiles(df) / df)
    return float(np.clip(np.mean(norm.cdf(nc - scaled) + norm.cdf(-nc - scaled)), 0.0, 1.0))


@functools.lru_cache(maxsize=None)
def _chi2_quantiles(df: int, points: int = 20000) -> np.ndarray:
    return chi2.ppf((np.arange(points) + 0.5) / points, df)


def detectable(sd: float, n: int, target: float = POWER, alpha: float = ALPHA) -> float | None:
    """The smallest true gain found with probability ``target`` (None below 2 seeds)."""
    if n < 2:
        return None
    if sd <= 0:
        return 0.0
    lo, hi = 0.0, sd
    while power(hi, sd, n, alpha) < target:
        hi *= 2
    for _ in range(60):  # bisection: power rises with the gain
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if power(mid, sd, n, alpha) < target else (lo, mid)
    return hi


def seeds_needed(effect: float, sd: float, target: float = POWER, alpha: float = ALPHA) -> int | None:
    """The fewest seeds (2 or more) that find ``effect`` with probability ``target``; None beyond MAX_SEEDS."""
    if effect == 0:
        return None
    for n in range(2, MAX_SEEDS + 1):
        if power(effect, sd, n, alpha) >= target:
            return n
    return None


def analyse(results: dict[str, Any], effect: float) -> list[dict[str, Any]]:
    rows = []
    for model, summary in results["summary"].items():
        for method, scores in summary["primary_scores"].items():
            for name in PRIMARY_SCORES:
                stat = scores.get(name) or {}
                n, sd, mean = stat.get("n", 0), stat.get("std"), stat.get("mean")
                if mean is None or sd is None or n < 2:
                    continue
                upper = confidence_interval(mean, sd, n, 1 - ALPHA)[1]  # the study's own interval
                rows.append({"model": model, "method": method, "score": name, "seeds": n, "mean": mean, "sd": sd,
                             "ci95_half_width": upper - mean, "ci95_upper": upper,
                             "detectable_at_80": detectable(sd, n), "effect": effect,
                             "seeds_for_effect": seeds_needed(effect, sd)})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    effect = rows[0]["effect"] if rows else 0.0
    lines = ["| model | method | score | seeds | mean gain | sd over seeds | 95% half-width | largest plausible gain "
             f"| detectable (80%) | seeds for {100 * effect:+.1f} |", "|" + "---|" * 10]
    for r in rows:
        need = r["seeds_for_effect"]
        lines.append(f"| {r['model']} | {r['method']} | {r['score']} | {r['seeds']} | {100 * r['mean']:+.2f} | "
                     f"{100 * r['sd']:.2f} | {100 * r['ci95_half_width']:.2f} | {100 * r['ci95_upper']:+.2f} | "
                     f"{100 * r['detectable_at_80']:.2f} | {need if need is not None else f'> {MAX_SEEDS}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a study's results.json (validation split)")
    parser.add_argument("--effect", type=float, default=1.0, help="gain in accuracy points to plan for [1.0]")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if not math.isfinite(args.effect) or args.effect <= 0:
        parser.error(f"--effect must be a positive number of points, got {args.effect}")
    try:
        results = read_validation_results(args.results, "a power analysis")
    except SntfxError as e:
        sys.exit(str(e))
    rows = analyse(results, args.effect / 100)
    print(table(rows))
    if args.out:
        payload = {"results": str(args.results), "alpha": ALPHA, "power": POWER, "rows": rows}
        atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(payload, indent=1) + "\n"))
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
