"""Markdown tables of `bench_train_step.py` results: step time and memory, x Adam, one row per model.

    python benchmarks/train_step_table.py benchmarks/results/train-step/TIME.json \
        benchmarks/results/train-step/MEMORY.json [--goal 1.10]

Every file given is read; a model's variants are merged across files (a timing
run with ``--no-memory`` and a ``--memory-only`` run give one row), and where
two files measure the same thing of the same variant, the later file wins.
Two tables are printed, each with only the columns some file measured:

- step time x Adam: the median of the per-round ratios, quartiles in
  brackets; an online variant whose median is above ``--goal`` is in bold
  (the cost issue's goal: an online style at most 1.10x Adam);
- memory x Adam: held (counted: parameters, gradients, optimizer state and
  what autograd keeps for backward), the resident-set peak in brackets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def merge(paths: list[Path]) -> tuple[dict[str, dict], list[dict]]:
    """``{model: {"batch": n, "variants": {variant: measurements}}}`` merged over ``paths``, and each file's
    header (device, torch, threads, rounds, steps)."""
    models: dict[str, dict] = {}
    headers = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
            rows = {model: (row.get("batch"), dict(row["variants"])) for model, row in data["results"].items()}
            if not all(isinstance(m, dict) for _, variants in rows.values() for m in variants.values()):
                raise TypeError("a variant's measurements are not an object")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: not a bench_train_step.py results file ({exc}); "
                             "give the JSON that bench_train_step.py --out wrote") from None
        headers.append({k: v for k, v in data.items() if k != "results"} | {"file": str(path)})
        for model, (batch, variants) in rows.items():
            entry = models.setdefault(model, {"batch": batch, "variants": {}})
            for variant, measured in variants.items():
                entry["variants"].setdefault(variant, {}).update(measured)
    return models, headers


def _columns(models: dict[str, dict], key: str) -> list[str]:
    """The variants (Adam left out: it is 1 by definition) that have ``key`` in some model, in first-seen order."""
    seen: dict[str, None] = {}
    for row in models.values():
        for variant, measured in row["variants"].items():
            if variant != "adam" and key in measured:
                seen.setdefault(variant)
    return list(seen)


def _header(variant: str) -> str:
    return variant.removeprefix("snt ")


def _table(models: dict[str, dict], key: str, cell) -> list[str]:
    """One row per model that measured ``key`` somewhere, one column per variant that has it; ``cell(variant,
    measurements)`` writes a measured cell, ``-`` marks a variant the model did not measure."""
    columns = _columns(models, key)
    if not columns:
        return []
    lines = ["| model (batch) | " + " | ".join(_header(c) for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for model, row in models.items():
        cells = [cell(c, row["variants"][c]) if key in row["variants"].get(c, {}) else "-" for c in columns]
        if any(text != "-" for text in cells):
            lines.append(f"| {model} ({row['batch']}) | " + " | ".join(cells) + " |")
    return lines


def time_table(models: dict[str, dict], goal: float = 1.10) -> list[str]:
    def cell(variant: str, m: dict) -> str:
        ratio = f"{m['time_vs_adam']:.2f}"
        if " online" in variant and float(ratio) > goal:  # as shown: a bold 1.10 against a goal of 1.10 would puzzle
            ratio = f"**{ratio}**"
        q = m.get("ratio_quartiles")
        return ratio + (f" ({q[0]:.2f}-{q[1]:.2f})" if q else "")

    return _table(models, "time_vs_adam", cell)


def memory_table(models: dict[str, dict]) -> list[str]:
    def cell(_variant: str, m: dict) -> str:
        return f"{m['held_vs_adam']:.2f}" + (f" ({m['memory_vs_adam']:.2f})" if "memory_vs_adam" in m else "")

    return _table(models, "held_vs_adam", cell)


def render(paths: list[Path], goal: float = 1.10) -> str:
    """The header lines and both tables for the results files ``paths`` (ValueError for a file that is not one)."""
    models, headers = merge(paths)
    parts = []
    for h in headers:
        what = "memory only" if h.get("memory_only") else (
            f"{h.get('rounds')} rounds x {h.get('steps')} steps")
        parts.append(f"{h['file']}: {h.get('device')}, torch {h.get('torch')}, {h.get('threads')} threads, {what}")
    time_lines, memory_lines = time_table(models, goal), memory_table(models)
    text = "\n".join(parts)
    if time_lines:
        text += ("\n\nStep time x Adam: median of the per-round ratios (quartiles); bold: an online variant above "
                 f"{goal:.2f}x\n\n" + "\n".join(time_lines))
    if memory_lines:
        text += ("\n\nMemory per step x Adam: held, counted (resident-set peak)\n\n" + "\n".join(memory_lines))
    if not time_lines and not memory_lines:
        raise ValueError(f"{', '.join(map(str, paths))}: no measurements (time_vs_adam or held_vs_adam) to "
                         "tabulate; give files that bench_train_step.py wrote after measuring")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="bench_train_step.py results files")
    parser.add_argument("--goal", type=float, default=1.10,
                        help="bold an online variant's step time above this ratio to Adam (default 1.10)")
    args = parser.parse_args(argv)
    try:
        print(render(args.files, args.goal))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
