"""Does the study's time per epoch agree with the train-step benchmark? Both, side by side, in one run.

Trains every method for one epoch through ``sntfx study`` (one seed, the
study's own data pipeline, trainer and train stage, without the measurement
stages), reads each run's epoch time, and
then times the same model's training step with
``benchmarks/bench_train_step.py``'s interleaved rounds on random inputs of
the same shape and batch. Each column is a ratio to Adam's; the two should
agree within noise (the study's epoch also loads data, which dilutes every
ratio slightly towards 1).

    python benchmarks/bench_study_epoch.py                          # smallvgg on Fashion-MNIST (digits if absent)
    python benchmarks/bench_study_epoch.py --model resnet8 --limit-batches 100

Run it alone on the machine: the study's epochs are timed one after another,
not interleaved, so other load shifts its ratios.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import bench_train_step as step_bench
from sntfx.blocks import get_style
from sntfx.io import atomic_write
from sntfx.study import Study, StudyConfig, quick_data

MODELS = {  # name: (study spec, bench kwargs)
    "smallvgg": ("sntfx:smallvgg", {"in_channels": 1, "num_classes": 10}),
    "resnet8": ("sntfx:resnet8", {"in_channels": 1, "num_classes": 10}),  # the confirmation's residual network
    "resnet20": ("sntfx:resnet20", {"in_channels": 1, "num_classes": 10}),
}
METHODS = ["adam", "sam", "snt-linear", "snt-lin-branch", "snt-powerprop", "snt-qa-branch", "snt-branch"]


def bench_variant(method: str) -> str:
    if method in ("adam", "sam"):
        return method
    style = method.removeprefix("snt-")
    return f"snt {style} {'online' if get_style(style).trains_online else 'explicit'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="smallvgg")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--limit-batches", type=int, default=None, help="training steps of the study's epoch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default="bench-results/study_epoch.json")
    args = parser.parse_args()
    data = quick_data()  # Fashion-MNIST where installed, else digits (as the quick preset)
    spec, kwargs = MODELS[args.model]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    with tempfile.TemporaryDirectory() as tmp:
        config = StudyConfig(models=[spec], data=data, methods=methods, seeds=[0], epochs=1, batch_size=args.batch,
                             limit_batches=args.limit_batches, sparsities=[], channel_sparsities=[], bits=[],
                             act_bits=[], wanda_sparsities=[], nm_patterns=[], onnx=False)
        study = Study(config, Path(tmp) / "study")
        epoch = {}
        for run in study.runs():
            # the study's own train stage, run by run; the measurements after it (the study runs each run's
            # right after its training) are not needed here and would take longer than the epochs
            epoch[run.method.name] = study.train_run(run)["history"][0]["seconds"]
        shape = tuple(study.data.info.input_shape(1)[1:])
    name = f"{args.model}-{data}"
    step_bench.MODELS[name] = (spec, kwargs, shape, args.batch, args.batch)
    variants = [bench_variant(m) for m in methods]
    steps = step_bench.time_model(name, variants, torch.device("cpu"), args.rounds, args.steps, args.batch)
    rows = {m: {"study_epoch_s": epoch[m], "study_vs_adam": epoch[m] / epoch["adam"],
                "bench_step_ms": steps[v]["median_ms"], "bench_vs_adam": steps[v]["time_vs_adam"]}
            for m, v in zip(methods, variants)}
    print(f"{args.model} on {data}, batch {args.batch}: study epoch vs train-step benchmark (ratios to Adam)")
    print(f"{'method':<18}{'epoch s':>9}{'study x':>9}{'step ms':>9}{'bench x':>9}")
    for m, r in rows.items():
        print(f"{m:<18}{r['study_epoch_s']:>9.1f}{r['study_vs_adam']:>9.2f}{r['bench_step_ms']:>9.1f}"
              f"{r['bench_vs_adam']:>9.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": args.model, "data": data, "batch": args.batch, "threads": torch.get_num_threads(),
               "limit_batches": args.limit_batches, "rows": rows}
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
