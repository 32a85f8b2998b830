"""Training-step cost of SNT against Adam and SAM, as ratios, on every built-in and torchvision ResNet-18.

For each model: Adam (plain model), SAM (two passes), and every registered SNT
style in explicit form, plus its online fold where the style trains online.
All variants of a model are timed in one process, interleaved round by round,
so that machine noise hits them alike; the table gives the median ms per step
and the ratio to Adam's median. Peak memory per step is measured for each
variant in a fresh process (CUDA: ``max_memory_allocated``; CPU: the
parameters' bytes plus the highest growth of the resident set, sampled every
0.5 ms, over three steps: gradients, optimizer state, activations and
workspaces) and given as a ratio to Adam's. Beside it, "held" is the memory a
step must hold, counted rather than sampled, so free of the allocator's and
the sampler's noise: parameters, gradients and optimizer state, plus every
tensor autograd keeps for the backward pass (saved-tensor hooks, each storage
once); workspaces are left out.

    python benchmarks/bench_train_step.py                      # every model, this machine
    python benchmarks/bench_train_step.py --models smallvgg,resnet20 --rounds 3
    python benchmarks/bench_train_step.py --device cuda        # on a GPU
    python benchmarks/bench_train_step.py --memory-only        # memory alone (needs no quiet machine)
    python benchmarks/train_step_table.py OUT.json [MORE.json]  # the results as markdown tables

The results file is rewritten after each model, so a run stopped part-way
keeps the models it finished (rerun the rest with ``--models`` into a second
file; ``train_step_table.py`` merges them).

Inputs are random (a step's cost does not depend on the values) of each
model's usual size and batch: Fashion-MNIST 1x28x28 for smallvgg and resnet8, CIFAR
3x32x32 for the CIFAR models (batch 128), ImageNet 3x224x224 for ResNet-18
(batch 32 on a CPU, 256 on a GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sntfx
from sntfx.blocks import get_style, style_names
from sntfx.graph_utils import saved_for_backward
from sntfx.io import atomic_write
from sntfx.train import TrainConfig, Trainer, set_online_fold

MODELS = {  # name: (spec, kwargs, input shape without batch, CPU batch, GPU batch)
    "smallvgg": ("sntfx:smallvgg", {"in_channels": 1, "num_classes": 10}, (1, 28, 28), 128, 128),
    "resnet8": ("sntfx:resnet8", {"in_channels": 1, "num_classes": 10}, (1, 28, 28), 128, 128),  # the research's ResNet
    "resnet20": ("sntfx:resnet20", {}, (3, 32, 32), 128, 128),
    "resnet56": ("sntfx:resnet56", {}, (3, 32, 32), 128, 128),
    "vgg11": ("sntfx:vgg11", {}, (3, 32, 32), 128, 128),
    "mobilenetv2": ("sntfx:mobilenetv2", {}, (3, 32, 32), 128, 128),
    "vit": ("sntfx:vit", {}, (3, 32, 32), 128, 128),
    "resnet18": ("torchvision:resnet18", {}, (3, 224, 224), 32, 256),
}


def variant_names(styles: list[str] | None = None, explicit: bool = True,
                  cost_models: list[int] | None = None) -> list[str]:
    """Adam, SAM, and each style (all registered ones by default) explicit and, where it trains online, online;
    with ``cost_models``, each online style once per budget cost model (``snt linear online cm2``)."""
    names = ["adam", "sam"]
    for style in styles or style_names():
        online = get_style(style).trains_online
        if explicit or not online:
            names.append(f"snt {style} explicit")
        if online:
            names += [f"snt {style} online cm{k}" for k in cost_models] if cost_models else [f"snt {style} online"]
    return names


def build(model_name: str, variant: str, device: torch.device, batch: int = 128, budget="default",
          memory_budget="default"):
    spec, kwargs, shape, _, _ = MODELS[model_name]
    torch.manual_seed(0)
    base = sntfx.build_model(spec, **kwargs)
    x = torch.zeros(2, *shape)
    if variant.startswith("snt "):
        _, style, form, *cost_model = variant.split(" ")
        extra = {} if budget == "default" else {"budget": budget}
        extra |= {} if memory_budget == "default" else {"memory_budget": memory_budget}
        extra |= {"cost_model": int(cost_model[0][2:])} if cost_model else {}  # else the snt pass's default
        model = sntfx.transform(base, x, style=style, batch_size=batch, **extra)
        set_online_fold(model, form == "online")
    else:
        model = sntfx.trace(base, x)
    model.to(device).train()
    # the optimizer sntfx's trainer builds (Adam, fused where the parameters allow; SAM wraps it)
    opt = Trainer(TrainConfig(optimizer="sam" if variant == "sam" else "adam", lr=1e-3)).build_optimizer(model)
    return model, opt


def step(model, opt, x, y) -> None:
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)  # SAM runs the closure twice


def batch_for(model_name: str, device: torch.device, batch: int | None):
    _, _, shape, cpu_batch, gpu_batch = MODELS[model_name]
    n = batch or (gpu_batch if device.type == "cuda" else cpu_batch)
    x = torch.randn(n, *shape, device=device)
    y = torch.randint(0, 10 if model_name != "resnet18" else 1000, (n,), device=device)
    return x, y


def time_model(model_name: str, variants: list[str], device, rounds: int, steps: int, batch: int | None,
               budget="default") -> dict:
    """Median ms per step of each variant, and its time relative to Adam's.

    The ratio is paired by round: each round times every variant (in an order
    rotated from round to round), the round's ratio is the variant's median
    step over Adam's median step in that round, and the result is the median
    of those ratios, with their quartiles, so that a slow stretch of the
    machine slows both sides of a ratio alike.
    """
    x, y = batch_for(model_name, device, batch)
    built = {v: build(model_name, v, device, int(x.shape[0]), budget) for v in variants}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for model, opt in built.values():  # warm-up
        for _ in range(2):
            step(model, opt, x, y)
    times: dict[str, list[list[float]]] = {v: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            model, opt = built[v]
            this_round = []
            for _ in range(steps):
                sync()
                t0 = time.perf_counter()
                step(model, opt, x, y)
                sync()
                this_round.append((time.perf_counter() - t0) * 1000)
            times[v].append(this_round)
    out = {"_batch": int(x.shape[0])}
    adam = [statistics.median(ts) for ts in times["adam"]]
    for v, per_round in times.items():
        ratios = sorted(statistics.median(ts) / a for ts, a in zip(per_round, adam))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[v] = {"median_ms": statistics.median(t for ts in per_round for t in ts),
                  "time_vs_adam": statistics.median(ratios), "ratio_quartiles": [quartiles[0], quartiles[2]]}
    return out


def peak_memory(model_name: str, variant: str, device: str, batch: int | None, budget="default",
                memory_budget="default") -> tuple[float, float]:
    """Peak bytes of one training step of ``variant``, measured in a fresh process, and the bytes it holds."""
    argv = [sys.executable, __file__, "--_memory", model_name, variant, "--device", device]
    argv += [] if budget == "default" else ["--budget", str(budget).lower()]
    argv += [] if memory_budget == "default" else ["--memory-budget", str(memory_budget).lower()]
    out = subprocess.run(argv + (["--batch", str(batch)] if batch else []), capture_output=True, text=True, check=True)
    peak, held = out.stdout.strip().splitlines()[-1].split()
    return float(peak), float(held)


def held_bytes(model, opt, x, y) -> float:
    """What a step holds, counted: parameters, gradients, optimizer state, and what autograd keeps for backward."""
    tensors = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None),
               *(t for state in opt.state.values() for t in state.values() if torch.is_tensor(t))]
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    with saved_for_backward(tensors) as saved:
        loss = F.cross_entropy(model(x), y)
    del loss
    return float(sum(held.values()) + sum(saved.values()))


def _measure_memory(model_name: str, variant: str, device: torch.device, batch: int | None, budget="default",
                    memory_budget="default") -> tuple[float, float]:
    x, y = batch_for(model_name, device, batch)
    model, opt = build(model_name, variant, device, int(x.shape[0]), budget, memory_budget)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step(model, opt, x, y)
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated()), held_bytes(model, opt, x, y)
    import gc
    import threading

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()

    gc.collect()
    before = rss()  # the built model's parameters are already resident
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(3):
        step(model, opt, x, y)
    done.set()
    sampler.join()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    # parameters + what a step adds at its peak (gradients, optimizer state, activations, workspaces)
    return float(params + peak[0] - before), held_bytes(model, opt, x, y)


def _budget(text: str):
    if text in ("default", "none"):
        return None if text == "none" else text
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("a budget is a fraction >= 0")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(m for m in MODELS if m != "resnet8"),
                        help=f"comma-separated, from {', '.join(MODELS)} (default: all but resnet8, the research's "
                             "Fashion-MNIST model)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--batch", type=int, default=None, help="override every model's batch size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--styles", default=None, help=f"comma-separated SNT styles (default: all of {', '.join(style_names())})")
    parser.add_argument("--online-only", action="store_true",
                        help="skip the explicit form of styles that train online (it is not what training runs)")
    parser.add_argument("--budget", type=_budget, default="default",
                        help="the snt pass's training-cost budget (a fraction, or 'none'); default: the pass's default")
    parser.add_argument("--memory-budget", type=_budget, default="default",
                        help="the snt pass's training-memory budget (a fraction, or 'none'); default: the pass's")
    parser.add_argument("--cost-models", default=None,
                        help="comma-separated budget cost models (e.g. 2,3): each online style once per model, "
                             "in the same rounds (default: the snt pass's own)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="measure memory alone, no timing")
    parser.add_argument("--out", default="bench-results/train_step.json")
    parser.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args._memory:
        print(*_measure_memory(args._memory[0], args._memory[1], device, args.batch, args.budget,
                               args.memory_budget))
        return
    if args.memory_only and args.no_memory:
        parser.error("--memory-only and --no-memory leave nothing to measure")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    styles = [s.strip() for s in args.styles.split(",") if s.strip()] if args.styles else None
    bad = sorted(set(styles or ()) - set(style_names()))
    if bad:
        parser.error(f"unknown style(s) {bad}; choose from {', '.join(style_names())}")
    cost_models = [int(k) for k in args.cost_models.split(",")] if args.cost_models else None
    if cost_models and not set(cost_models) <= {1, 2, 3, 4}:
        parser.error(f"unknown cost model(s) in {args.cost_models}; the snt pass has 1, 2, 3 and 4")
    variants = variant_names(styles, explicit=not args.online_only, cost_models=cost_models)
    print(f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rounds} interleaved "
          f"rounds x {args.steps} steps; x Adam: median of the per-round ratios (quartiles beside it)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "rounds": args.rounds, "steps": args.steps, "budget": args.budget,
              "memory_budget": args.memory_budget, "memory_only": args.memory_only}
    results = {}
    for m in models:
        if args.memory_only:
            timed = {"_batch": int(batch_for(m, device, args.batch)[0].shape[0])} | {v: {} for v in variants}
        else:
            timed = time_model(m, variants, device, args.rounds, args.steps, args.batch, args.budget)
        batch = timed.pop("_batch")
        mem = {} if args.no_memory else {v: peak_memory(m, v, args.device, args.batch, args.budget,
                                                        args.memory_budget) for v in variants}
        rows = {v: {**timed[v], **({"peak_bytes": mem[v][0], "memory_vs_adam": mem[v][0] / mem["adam"][0],
                                    "held_bytes": mem[v][1], "held_vs_adam": mem[v][1] / mem["adam"][1]}
                                   if mem else {})}
                for v in variants}
        results[m] = {"batch": batch, "variants": rows}
        print(f"\n{m} (batch {batch})\n{'variant':<28}{'ms/step':>10}{'x Adam':>9}{'quartiles':>14}"
              f"{'memory x Adam':>15}{'held x Adam':>13}")
        for v, r in rows.items():
            memory = f"{r['memory_vs_adam']:>15.2f}{r['held_vs_adam']:>13.2f}" if "memory_vs_adam" in r else ""
            timing = (f"{r['median_ms']:>10.1f}{r['time_vs_adam']:>9.2f}"
                      f"{'{:.2f}-{:.2f}'.format(*r['ratio_quartiles']):>14}") if "median_ms" in r else f"{'':>33}"
            print(f"{v:<28}{timing}{memory}", flush=True)
        # after every model, so that a run stopped part-way keeps the models it finished
        _write_json(out, header | {"results": results})
    print(f"\nwrote {out}")


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` as JSON through :func:`sntfx.io.atomic_write` (whole file or nothing; umask)."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2)))


if __name__ == "__main__":
    main()
