"""The confirmation's goal test and default-style rule, applied to its results (validation split only).

    python benchmarks/choose_default.py \
        benchmarks/results/snt-research/04-confirm/smallvgg/results.json \
        benchmarks/results/snt-research/04-confirm/resnet8/results.json \
        --step-costs benchmarks/results/train-step/FILE.json

Written before any SNT result of the confirmation was looked at; the rules are
those of ``benchmarks/results/snt-research/04-confirm/README.md``:

Goal, per candidate and model (the issue's): both primary scores help (the 95%
interval of the paired gain over Adam is above zero); the best setting among
those where Adam loses at least 5 points from its float accuracy gains at
least 2 points (pruning: unstructured, activation-aware, N:M and channel
settings) and at least 5.4 points (quantization: every W and W/A setting);
float accuracy does not hurt (its interval is not below zero); a training step
at most 1.10x Adam's, read from a ``benchmarks/bench_train_step.py`` results
file (the style's online variant if it trains online, else its explicit one).
A cost the file does not have fails the goal: it is not measured.
A candidate meets the goal when it meets it on every model given.

Default: the candidate that meets the goal (several: the higher mean of the
two primary scores over the models); if none does, the highest such mean
among candidates whose float accuracy hurts on no model; ties go to the
cheaper style (the registry's ``step_cost``). With fewer than 5 seeds the
output says it is a screen, not a claim.

SAM, where the results have it, is in the table as the reference the goal is
read against (its gains and goal test, marked "reference"); it is not a
candidate for the default.

Refuses a results file evaluated on the test split.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sntfx.blocks import get_style
from sntfx.study.config import Method
from sntfx.errors import SntfxError
from sntfx.study.stats import PRIMARY_SCORES, read_validation_results

ADAM_LOSS = 0.05  # settings where Adam loses at least this much from its float accuracy
BEST_GAIN = {"pruning": 0.02, "quantization": 0.054}
MAX_STEP_COST = 1.10
CLAIM_SEEDS = 5


def setting_kind(key: str) -> str | None:
    """'pruning', 'quantization' or None for a metric key of the study's summary."""
    if key.startswith(("sparsity:", "wanda:", "channels:")):
        return "pruning"
    if key.startswith("W") and key[1:].split("A")[0].isdigit():
        return "quantization"
    return None


@dataclass
class Verdict:
    model: str
    method: str
    seeds: int
    scores: dict[str, dict[str, Any]]
    float_gain: dict[str, Any]
    best: dict[str, tuple[str, float] | None]
    step_cost: float | None
    failures: list[str] = field(default_factory=list)
    reference: bool = False  # SAM: shown beside the candidates, never chosen

    @property
    def meets_goal(self) -> bool:
        return not self.failures

    @property
    def float_hurts(self) -> bool:
        ci = self.float_gain.get("ci95")
        return ci is not None and ci[1] < 0

    @property
    def mean_score(self) -> float:
        return statistics.fmean(s["mean"] for s in self.scores.values())


def _helps(stat: dict[str, Any]) -> bool:
    return stat.get("ci95") is not None and stat["ci95"][0] > 0


def load(path: Path) -> dict[str, Any]:
    try:
        return read_validation_results(path, "the default")
    except SntfxError as e:
        sys.exit(str(e))


def step_costs(path: Path | None) -> dict[str, dict[str, float]]:
    """{model name without 'sntfx:': {variant: median time vs Adam}} from a bench_train_step results file."""
    if path is None:
        return {}
    data = json.loads(path.read_text())
    return {m: {v: r["time_vs_adam"] for v, r in d["variants"].items()} for m, d in data["results"].items()}


def step_cost(costs: dict[str, dict[str, float]], model: str, method: str) -> float | None:
    m, variants = Method.parse(method), costs.get(model.removeprefix("sntfx:"), {})
    if not m.snt:
        return variants.get("sam" if m.sam else "adam")
    return variants.get(f"snt {m.style} {'online' if get_style(m.style).trains_online else 'explicit'}")


def verdicts(results: dict[str, Any], costs: dict[str, dict[str, float]]) -> list[Verdict]:
    out = []
    for model, summary in results["summary"].items():
        adam = summary["metrics"].get("adam", {})
        adam_float = (adam.get("float") or {}).get("mean")
        hard_settings = [k for k in adam if setting_kind(k) and adam_float is not None
                         and adam_float - adam[k]["mean"] >= ADAM_LOSS]  # where Adam loses 5 points or more
        for method, gains in summary["gains_over_adam"].items():
            parsed = Method.parse(method)
            if not (parsed.snt or parsed.sam):
                continue
            scores = summary["primary_scores"][method]
            best: dict[str, tuple[str, float] | None] = {}
            for kind in BEST_GAIN:
                hard = [k for k in hard_settings if setting_kind(k) == kind and (gains.get(k) or {}).get("mean")
                        is not None]
                best[kind] = max(((k, gains[k]["mean"]) for k in hard), key=lambda kv: kv[1], default=None)
            seeds = min((s["n"] for s in scores.values()), default=0)
            v = Verdict(model, method, seeds, scores, gains.get("float", {}), best, step_cost(costs, model, method),
                        reference=not parsed.snt)
            for name, stat in scores.items():
                if not _helps(stat):
                    v.failures.append(f"{name} does not help")
            for kind, need in BEST_GAIN.items():
                if best[kind] is None:
                    v.failures.append(f"no {kind} setting where Adam loses {100 * ADAM_LOSS:.0f} points")
                elif best[kind][1] < need:
                    v.failures.append(f"best {kind} gain {100 * best[kind][1]:+.2f} < {100 * need:+.1f}")
            if v.float_hurts:
                v.failures.append("float accuracy hurts")
            if v.step_cost is None:
                v.failures.append("step cost not measured")
            elif v.step_cost > MAX_STEP_COST:
                v.failures.append(f"step {v.step_cost:.2f}x Adam")
            out.append(v)
    return out


def choose(all_verdicts: list[Verdict]) -> tuple[str | None, str]:
    """The default method and the rule's clause that chose it."""
    candidates = [v for v in all_verdicts if not v.reference]
    by_method: dict[str, list[Verdict]] = {}
    for v in candidates:
        by_method.setdefault(v.method, []).append(v)
    models = {v.model for v in candidates}
    complete = {m: vs for m, vs in by_method.items() if {v.model for v in vs} == models}

    def key(item):
        method, vs = item
        return (-statistics.fmean(v.mean_score for v in vs), get_style(Method.parse(method).style).step_cost)

    meeting = sorted(((m, vs) for m, vs in complete.items() if all(v.meets_goal for v in vs)), key=key)
    if meeting:
        return meeting[0][0], "meets the goal on every model"
    safe = sorted(((m, vs) for m, vs in complete.items() if not any(v.float_hurts for v in vs)), key=key)
    if safe:
        return safe[0][0], "no candidate meets the goal; highest mean primary score among those whose float " \
                           "accuracy hurts on no model"
    return None, "no candidate meets the goal and every one hurts float accuracy on some model"


def _ci(stat: dict[str, Any]) -> str:
    if stat.get("mean") is None:
        return "-"
    ci = stat.get("ci95")
    return f"{100 * stat['mean']:+.2f}" + (f" [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" if ci else "")


def table(all_verdicts: list[Verdict]) -> str:
    names = list(PRIMARY_SCORES)
    lines = ["| model | method | seeds | " + " | ".join(names) + " | float | best pruning | best quantization "
             "| step vs Adam | goal |", "|" + "---|" * (len(names) + 8)]
    for v in all_verdicts:
        best = ["-" if v.best[kind] is None else f"{v.best[kind][0]} {100 * v.best[kind][1]:+.2f}"
                for kind in BEST_GAIN]
        cost = "-" if v.step_cost is None else f"{v.step_cost:.2f}"
        goal = ("reference, " if v.reference else "") + ("yes" if v.meets_goal else "no: " + "; ".join(v.failures))
        lines.append(f"| {v.model} | {v.method} | {v.seeds} | " + " | ".join(_ci(v.scores[n]) for n in names)
                     + f" | {_ci(v.float_gain)} | {best[0]} | {best[1]} | {cost} | {goal} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> tuple[str | None, str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="a confirmation study's results.json (validation)")
    parser.add_argument("--step-costs", type=Path, help="a benchmarks/bench_train_step.py results file")
    args = parser.parse_args(argv)
    costs = step_costs(args.step_costs)
    all_verdicts = [v for p in args.results for v in verdicts(load(p), costs)]
    print("Paired gains over Adam in points, 95% t interval over seeds in brackets (validation split).\n")
    print(table(all_verdicts))
    method, why = choose(all_verdicts)
    seeds = min((v.seeds for v in all_verdicts), default=0)
    print(f"\ndefault: {method or 'none'} ({why})")
    if seeds < CLAIM_SEEDS:
        print(f"only {seeds} paired seed(s) on some model: a screen, not a claim (a claim needs {CLAIM_SEEDS})")
    return method, why


if __name__ == "__main__":
    main()
