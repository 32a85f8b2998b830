"""The confirmation's candidate rule, applied to the screens' results (validation split only).

    python benchmarks/rank_candidates.py benchmarks/results/snt-research/01-screen-smallvgg/results.json \
        benchmarks/results/snt-research/02-screen-resnet20/results.json

For each SNT method: its mean gain over Adam on each pre-registered primary score
(``sntfx.study.stats.PRIMARY_SCORES``), per screen, and the mean of the two
scores averaged over the screens it ran in. The rule (research log, "Plan for
the confirmation"): qa-branch, plus the two other styles with the highest such
mean; a tie goes to the cheaper style (the registry's step cost). Refuses a
results file that was evaluated on the test split: candidates are chosen on
validation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from sntfx.blocks import get_style
from sntfx.errors import SntfxError
from sntfx.study.config import Method
from sntfx.study.stats import read_validation_results


def screen_scores(path: Path) -> dict[str, dict[str, float]]:
    """{method: {score name: mean paired gain over Adam}} over the models of one results file."""
    try:
        results = read_validation_results(path, "a candidate")
    except SntfxError as e:
        sys.exit(str(e))
    out: dict[str, dict[str, list[float]]] = {}
    for model, summary in results["summary"].items():
        for method, scores in summary.get("primary_scores", {}).items():
            for name, stat in scores.items():
                out.setdefault(method, {}).setdefault(name, []).append(stat["mean"])
    return {m: {n: statistics.fmean(v) for n, v in s.items()} for m, s in out.items()}


def main(argv: list[str] | None = None) -> list[str]:
    """Print the table and return the candidates."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="a screen's results.json (validation split)")
    parser.add_argument("--keep", default="snt-qa-branch", help="the method confirmed whatever it scores")
    parser.add_argument("--pick", type=int, default=2, help="how many other styles to confirm")
    args = parser.parse_args(argv)
    screens = {p.parent.name or str(p): screen_scores(p) for p in args.results}
    methods = sorted({m for s in screens.values() for m in s if Method.parse(m).snt})
    rows = []
    for method in methods:
        per_screen = {name: statistics.fmean(s[method].values()) for name, s in screens.items() if method in s}
        overall = statistics.fmean(per_screen.values())
        style = Method.parse(method).style
        rows.append((method, per_screen, overall, get_style(style).step_cost))
    print(f"{'method':<22}" + "".join(f"{n[:24]:>26}" for n in screens) + f"{'mean':>10}{'step cost':>11}")
    for method, per_screen, overall, cost in sorted(rows, key=lambda r: (-r[2], r[3])):
        cells = "".join(f"{100 * per_screen[n]:>+25.2f} " if n in per_screen else f"{'-':>26}" for n in screens)
        print(f"{method:<22}{cells}{100 * overall:>+10.2f}{cost:>11.2f}")
    others = [r for r in sorted(rows, key=lambda r: (-r[2], r[3])) if r[0] != args.keep]
    chosen = [args.keep] + [r[0] for r in others[:args.pick]]
    print("\n(points: mean over a screen's models of the mean of its primary scores, paired gain over Adam)")
    print("candidates: " + ", ".join(chosen))
    return chosen


if __name__ == "__main__":
    main()
