"""The study report: ``report.md`` and PNG plots from ``results.json``.

The first screen of ``report.md`` answers the study's question: per method,
float accuracy, the average accuracy gained (or lost) over Adam under
unstructured pruning, channel pruning and low-bit quantization, with the
spread over seeds, and what the training cost. The detailed tables and the
plots follow. Everything here reads ``results.json`` only, so a report can be
redrawn (``sntfx study --report-only``) without touching the runs.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from ..io import atomic_write
from ..plotting import pyplot, save_png
from .config import slug
from .stats import PRIMARY_SCORES, confidence_interval

__all__ = ["write_report", "verdict", "short_verdict"]

log = logging.getLogger(__name__)

PLOTS = ("accuracy_vs_sparsity", "accuracy_vs_bits", "sharpness", "landscape", "training_curves")


def _pct(s: dict | None, signed: bool = False) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    mean, std = 100 * s["mean"], 100 * (s["std"] or 0.0)
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return f"{text} ± {std:.2f}" if s["n"] > 1 else text


def _num(s: dict | None, spec: str = ".3g", unit: str = "") -> str:
    """``mean ± std`` over seeds in ``spec`` (see `_fixed`); one value for one seed; ``n/a`` when not measured."""
    if not s or s.get("mean") is None:
        return "n/a"
    text = _fixed(s["mean"], spec)
    return f"{text} ± {_fixed(s['std'], spec)}{unit}" if s["n"] > 1 else f"{text}{unit}"


def interval(gain: dict) -> list[float] | None:
    """The 95% confidence interval of a paired gain (from the results, or recomputed for files without it)."""
    if gain.get("ci95") is not None:
        return gain["ci95"]
    return confidence_interval(gain["mean"], gain["std"] or 0.0, gain["n"])


def _word(gain: dict) -> str:
    """helps / hurts only when the 95% interval of the paired gain excludes zero; ``~`` otherwise."""
    ci = interval(gain)
    if ci is None:
        return "~"
    return "helps" if ci[0] > 0 else "hurts" if ci[1] < 0 else "~"


#: The mechanism table's columns: metric key, header, and the number format of its value.
MECHANISM_COLUMNS = (("sharpness:top_eigenvalue", "top eigenvalue", ".4g"),
                     ("sharpness:hessian_trace", "Hessian trace", ".4g"),
                     ("sharpness:sam_sharpness", "SAM sharpness (ρ)", ".4g"),
                     ("sharpness:loss", "loss", ".4g"),
                     ("weights:kurtosis", "weight kurtosis", ".3g"),
                     ("weights:crest_factor", "crest factor", ".3g"),
                     ("weights:zero_at_w4", "zero at W4", ".3f"),
                     ("weights:centre_max_share", "max at centre tap", ".3f"))


def _fixed(value: float, spec: str, sign: str = "") -> str:
    """``value`` in ``spec`` (``.3g``, ``.2f``, ...), large values without exponent notation: 1364.2 in ``.3g``
    as ``1364``, not ``1.36e+03``. ``sign`` is a format sign option (``"+"``)."""
    digits = re.fullmatch(r"\.(\d+)g", spec)
    if digits and abs(value) >= 10 ** int(digits.group(1)):
        spec = ".0f"
    return format(value, sign + spec)


def _difference(d: dict | None, spec: str = ".3g") -> str:
    """``+1.2 [+0.4, +2.0] *`` (the star: the 95% interval excludes zero); ``+1.2 (1 seed)``; ``n/a``."""
    if not d or d.get("mean") is None:
        return "n/a"
    ci = interval(d)
    if ci is None:
        return f"{_fixed(d['mean'], spec, '+')} (1 seed)"
    return (f"{_fixed(d['mean'], spec, '+')} [{_fixed(ci[0], spec, '+')}, {_fixed(ci[1], spec, '+')}]"
            + (" *" if ci[0] > 0 or ci[1] < 0 else ""))


def _mechanism_table(metrics: dict, methods: list[str]) -> list[str]:
    """Each method's sharpness and folded-weight statistics: mean ± std over seeds."""
    rows = [[m] + [_num(metrics[m].get(k), spec) for k, _, spec in MECHANISM_COLUMNS] for m in methods]
    return _table(["method"] + [name for _, name, _ in MECHANISM_COLUMNS], rows)


def _mechanism_differences(mechanism: dict, methods: list[str]) -> list[str]:
    """The mechanism table's paired differences from Adam, with intervals (results written before them: none)."""
    rows = [[m] + [_difference(mechanism[m].get(k), spec) for k, _, spec in MECHANISM_COLUMNS]
            for m in methods if m != "adam" and mechanism.get(m)]
    if not rows:
        return []
    return (["Paired difference from Adam (method minus Adam, per seed): mean [95% CI over seeds]; `*` where the "
             "interval excludes zero.", ""]
            + _table(["method"] + [name for _, name, _ in MECHANISM_COLUMNS], rows))


def _ci_text(gain: dict) -> str:
    lo, hi = (100 * v for v in interval(gain))
    return f"{100 * gain['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def verdict(gain: dict | None) -> str:
    """Plain words for a paired gain: helps / hurts only when its 95% confidence interval excludes zero."""
    if not gain or gain.get("mean") is None:
        return "not measured"
    if gain["n"] < 2:
        return f"{100 * gain['mean']:+.2f} points on one seed (no interval: run more seeds)"
    word = {"helps": "helps", "hurts": "hurts", "~": "no clear difference"}[_word(gain)]
    return f"{word} ({_ci_text(gain)} points, 95% CI, {gain['n']} seeds)"


def short_verdict(gain: dict | None) -> str:
    """``+1.20 [+0.40, +2.00] helps`` / ``-0.10 [-0.90, +0.70] ~`` / ``+0.5 (1 seed)``: for terminal tables."""
    if not gain or gain.get("mean") is None:
        return "n/a"
    if gain["n"] < 2:
        return f"{100 * gain['mean']:+.2f} (1 seed)"
    return f"{_ci_text(gain)} {_word(gain)}"


def _methods(summary: dict) -> list[str]:
    return list(summary["metrics"])


def _settings(metrics: dict, prefix: str) -> list[str]:
    keys = {k for m in metrics.values() for k in m if k.startswith(prefix)}
    return sorted(keys, key=lambda k: float(k.split(":")[1]))


def _wanda_keys(metrics: dict) -> list[str]:
    keys = {k for m in metrics.values() for k in m if k.startswith("wanda:")}
    return sorted(keys, key=lambda k: (":" in k[6:], k))


def _quant_keys(metrics: dict, pattern: str) -> list[str]:
    """The metric keys that match ``pattern`` (``W4``, ``W4A8``, ``W4:mse``, ...): weight-only settings first,
    then by weight bits, widest first."""
    keys = {k for m in metrics.values() for k in m if re.fullmatch(pattern, k)}
    return sorted(keys, key=lambda k: ("A" in k, -int(re.match(r"W(\d+)", k).group(1))))


def _bit_keys(metrics: dict) -> list[str]:
    return _quant_keys(metrics, r"W\d+(A\d+)?")


def _mse_keys(metrics: dict) -> list[str]:
    return _quant_keys(metrics, r"W\d+:mse")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _in_short(groups: dict[str, dict], kinds) -> str:
    """One sentence per score: the best method and whether its 95% interval clears zero."""
    parts = []
    for kind in kinds:
        scored = [(m, g[kind]) for m, g in groups.items() if g.get(kind, {}).get("mean") is not None]
        if not scored:
            continue
        best, stats = max(scored, key=lambda item: item[1]["mean"])
        if stats["n"] < 2:
            parts.append(f"on the {kind}, the best is {best} ({100 * stats['mean']:+.2f} points, one seed)")
        elif _word(stats) == "helps":
            parts.append(f"on the {kind}, **{best}** keeps more accuracy than Adam ({_ci_text(stats)} points)")
        elif _word(stats) == "hurts":
            parts.append(f"on the {kind}, every method keeps less accuracy than Adam (closest: {best}, "
                         f"{_ci_text(stats)})")
        else:
            parts.append(f"on the {kind}, no method's gain over Adam excludes zero (best: {best}, {_ci_text(stats)})")
    return ("**In short:** " + "; ".join(parts) + ".") if parts else ""


def _primary_section(summary: dict) -> list[str]:
    """The pre-registered primary scores, first: mean gain over Adam with its 95% interval, and the verdict."""
    primary = summary.get("primary_scores") or {}
    if not any(s.get("mean") is not None for scores in primary.values() for s in scores.values()):
        return []
    names = list(PRIMARY_SCORES)
    lines = ["### Primary scores (pre-registered)", "",
             "Chosen before any SNT result was looked at: the " + "; the ".join(
                 f"**{n}** is the mean accuracy gain over Adam across {', '.join(PRIMARY_SCORES[n])}"
                 for n in names) + " (activation-aware pruning with BatchNorm re-estimation where configured, "
             "no fine-tuning). Paired by seed; [95% confidence interval]; a method helps or hurts only where the "
             "interval excludes zero.", ""]
    rows = [[f"**{m}**", *(short_verdict(scores.get(n)) for n in names)] for m, scores in primary.items()]
    lines += _table(["method", *names], rows)
    return lines + [_in_short(primary, names), ""]


def _model_section(model: str, summary: dict, results: dict, out: Path, plots: dict[str, str]) -> list[str]:
    metrics, gains, groups = summary["metrics"], summary["gains_over_adam"], summary["group_gains_over_adam"]
    methods = _methods(summary)
    runs = [r for r in results["runs"] if r["model"] == model]
    lines = [f"## {model}", ""]

    # -- the answer --------------------------------------------------------------
    lines += _primary_section(summary)
    kinds = [k for k in ("unstructured pruning", "activation-aware pruning", "channel pruning",
                         "quantization (<= 6 bits)")
             if any(g.get(k, {}).get("n") for g in groups.values()) or not groups]
    header = ["method", "float acc (%)", *(f"Δ {k.replace('(<= 6 bits)', '≤ 6 bit')}" for k in kinds),
              "time / epoch vs Adam", "top Hessian eigenvalue"]
    rows = []
    for m in methods:
        g = groups.get(m, {})
        rows.append([f"**{m}**", _pct(metrics[m].get("float")),
                     *(("—",) * len(kinds) if m == "adam" else (_pct(g.get(k), signed=True) for k in kinds)),
                     _num(metrics[m].get("epoch_time_vs_adam"), ".2f", "×"),
                     _num(metrics[m].get("sharpness:top_eigenvalue"), ".4g")])
    lines += _table(header, rows)
    lines += [_in_short(groups, kinds), ""]
    lines += ["Δ: accuracy points gained over Adam, averaged over the settings of each kind (the sections below "
              "list every setting), mean ± std over seeds of the per-seed difference.", ""]
    for m in methods:
        if m == "adam":
            continue
        g = groups.get(m, {})
        lines.append(f"- **{m}** vs Adam: float {verdict(gains.get(m, {}).get('float'))}; "
                     + "; ".join(f"{k} {verdict(g.get(k))}" for k in kinds) + ".")
    lines += ["", "_A method \"helps\" (or \"hurts\") only where the 95% confidence interval of its paired gain "
              "(t over seeds) lies above (below) zero; anything else is reported as no clear difference._", ""]

    # -- details -------------------------------------------------------------------
    def setting_table(title: str, keys: list[str], label) -> None:
        if not keys:
            return
        nonlocal lines
        lines += [f"### {title}", ""]
        rows = [[label(k)] + [_pct(metrics[m].get(k)) for m in methods] for k in keys]
        lines += _table(["setting"] + methods, rows)
        others = [m for m in methods if m != "adam"]
        if others:
            rows = [[label(k)] + [_pct(gains.get(m, {}).get(k), signed=True) for m in others] for k in keys]
            lines += ["Gain over Adam (points, paired by seed):", ""] + _table(["setting"] + others, rows)

    setting_table("Accuracy (%) under unstructured magnitude pruning (global, no fine-tuning)",
                  _settings(metrics, "sparsity:"), lambda k: f"{float(k.split(':')[1]):.0%} of weights")
    setting_table("Accuracy (%) under activation-aware pruning (Wanda: |W| x input norm per output row, or N:M; "
                  "no fine-tuning)", _wanda_keys(metrics),
                  lambda k: k.split(":", 1)[1] if ":" in k.split(":", 1)[1] else f"{float(k.split(':')[1]):.0%} of weights")
    setting_table("Accuracy (%) under structured channel pruning (torch-pruning, no fine-tuning)",
                  _settings(metrics, "channels:"), lambda k: f"{float(k.split(':')[1]):.0%} of channels")
    setting_table("Accuracy (%) under post-training quantization (per-channel weights, min-max activations)",
                  _bit_keys(metrics), lambda k: k)
    setting_table("Accuracy (%) under weight-only quantization with MSE-chosen ranges (per channel: the clipping "
                  "that minimises the rounding error, against min-max above)", _mse_keys(metrics),
                  lambda k: k.replace(":mse", " (MSE)"))

    lines += ["### Mechanism: sharpness and weight distribution of the folded models", ""]
    lines += _mechanism_table(metrics, methods)
    lines += ["Sharpness: of the training loss on fixed training batches. Weights: BatchNorm folded into the layers "
              "(the deployed form); excess kurtosis per layer and per-channel crest factor (max |w| / rms), averaged; "
              "zero at W4: fraction of weights that per-channel 4-bit rounding sets to zero; max at centre tap: "
              "fraction of the odd-kernel convs' output channels whose largest weight is the centre tap's (1/9 for "
              "3x3 when no tap is special; n/a in results written before it was measured).", ""]
    lines += _mechanism_differences(summary.get("mechanism_vs_adam") or {}, methods)

    lines += ["### Training cost", ""]
    rows = []
    for m in methods:
        mr = [r for r in runs if r["method"] == m and "train" in r]
        params = f"{mr[0]['train']['params_trained']:,} → {mr[0]['train']['params_deployed']:,}" if mr else "n/a"
        fold = max((r["train"]["fold"]["rel_error"] for r in mr if r["train"].get("fold")), default=None)
        rows.append([m, _num(metrics[m].get("epoch_seconds"), ".1f", " s"),
                     _num(metrics[m].get("epoch_time_vs_adam"), ".2f", "×"), params,
                     "exact (no fold)" if fold is None else f"{fold:.1e}"])
    lines += _table(["method", "time / epoch (median)", "vs Adam", "parameters trained → deployed",
                     "fold error (max rel.)"], rows)
    lines += ["Epoch times come from the runs themselves; runs that shared the machine with other work make them "
              "noisy (`benchmarks/bench_train_step.py` measures step-time ratios side by side).", ""]

    ort_rows = []
    for m in methods:
        mm = metrics[m]
        if "ort:fp32:accuracy" not in mm:
            continue
        b1f, b1q = mm.get("ort:fp32:ms:b1"), mm.get("ort:int8:ms:b1")
        speed = (f"{b1f['mean'] / b1q['mean']:.2f}×" if b1f and b1q and b1f.get("mean") and b1q.get("mean")
                 else "n/a")
        ort_rows.append([m, _num(b1f, ".3f"), _num(b1q, ".3f"), speed,
                         _num(mm.get("ort:fp32:mb"), ".3f"), _num(mm.get("ort:int8:mb"), ".3f"),
                         _pct(mm.get("ort:fp32:accuracy")), _pct(mm.get("ort:int8:accuracy"))])
    if ort_rows:
        provider = next((r["onnx"]["fp32"]["bench"]["provider"] for r in runs if "onnx" in r), "?")
        lines += [f"### Deployment: ONNX Runtime ({provider})", ""]
        lines += _table(["method", "fp32 ms (batch 1, p50)", "int8 ms", "int8 speed-up", "fp32 MB", "int8 MB",
                         "fp32 acc (%)", "int8 acc (%)"], ort_rows)
        lines += ["The int8 model is the sweep's W8A8 model (the same `quantize` pass, per-channel int8 weights, "
                  "uint8 activations), exported as QDQ ONNX.", ""]
    settings = sorted({k.split(":")[1] for m in methods for k in metrics[m] if k.startswith("deployed:")})
    if settings:
        lines += ["### Simulated vs deployed quantization", "",
                  "Each W/A setting of the sweep exported as QDQ ONNX and run on ONNX Runtime, on the same images: "
                  "accuracy of the simulated model / of the deployed file (%), mean over seeds. Below 8 bits ONNX "
                  "Runtime has no integer kernel; the file still computes the simulated grid.", ""]
        rows = []
        for m in methods:
            mm = metrics[m]
            rows.append([m] + [f"{_pct(mm.get(f'deployed:{s}:simulated'))} / {_pct(mm.get(f'deployed:{s}:onnxruntime'))}"
                               for s in settings])
        lines += _table(["method", *settings], rows)

    lines += ["### Plots", ""]
    for name, rel in plots.items():
        lines.append(f"![{name.replace('_', ' ')}]({rel})")
    return lines + [""]


def _split_sentence(cfg: dict, data: dict) -> str:
    """Which images the accuracies are on: the validation split (held out of training) or the test split."""
    on_val = data.get("evaluated_on") == "val"
    total = data["val_images"] if on_val else data["test_images"]
    where = (f"validation images (held out of the {data['train_images'] + total:,} training images; the test split "
             "was not read)") if on_val else "test images"
    held = (f" Training reported its per-epoch accuracy on {data['val_images']:,} held-out validation images."
            if data.get("val_images") and not on_val else "")
    swept = min(total, cfg.get("eval_images") or total)
    float_on = f"; float accuracy on all {total:,}" if swept < total else ""
    return (f"Accuracies are top-1 on {swept:,} {where}{float_on}, in %; ± is the standard deviation over seeds, "
            f"[a, b] a 95% confidence interval.{held}")


def write_report(results: dict[str, Any], out: str | Path) -> Path:
    """Write ``report.md`` and the plots for ``results`` into ``out``."""
    out = Path(out)
    cfg, data = results["config"], results["dataset"]
    plot_dir = out / "plots"
    plot_dir.mkdir(exist_ok=True)
    seeds = cfg["seeds"]
    lines = [f"# sntfx study: {', '.join(cfg['models'])} on {data['name']}", ""]
    fold_errors = [r["train"]["fold"]["rel_error"] for r in results["runs"] if r.get("train", {}).get("fold")]
    lines += [
        f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}) × {len(cfg['methods'])} "
        f"methods, {cfg['epochs']} epoch{'s' if cfg['epochs'] > 1 else ''} of {cfg['optimizer']} "
        f"(batch {cfg['batch_size']}{', ' + str(cfg['limit_batches']) + ' batches per epoch' if cfg.get('limit_batches') else ''})"
        f" on {data['train_images']:,} training images. Every method starts from the same initial weights and sees "
        "the same data order; SNT models are folded back into the original architecture before anything is "
        "measured" + (f" (largest relative fold error {max(fold_errors):.1e})" if fold_errors else "") + ". "
        + _split_sentence(cfg, data), ""]
    for model, summary in results["summary"].items():
        plots = draw_plots(model, summary, results, plot_dir)
        lines += _model_section(model, summary, results, out, {k: str(Path(v).relative_to(out)) for k, v in plots.items()})
    env = results["environment"]
    pk = env["packages"]
    lines += ["## Configuration", "",
              f"sntfx {results['sntfx_version']}, torch {pk.get('torch')}, ONNX Runtime "
              f"{pk.get('onnxruntime-gpu') or pk.get('onnxruntime')}, Python {env['python']} on {env['platform']} "
              f"({env['cpu_count']} CPUs{', ' + env['cuda'] if env.get('cuda') else ''}); written {results['created']}. "
              "Every number, setting and per-run result is in `results.json`; each run's files (checkpoint, "
              "folded model, ONNX models, stage results) are under `runs/`.", ""]
    text = "\n".join(lines)
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(text))
    return out / "report.md"


# -- plots --------------------------------------------------------------------------


def _band(ax, xs, stats_list, label, **kw):
    import numpy as np

    mean = np.array([100 * s["mean"] if s and s.get("mean") is not None else np.nan for s in stats_list])
    std = np.array([100 * (s["std"] or 0) if s and s.get("mean") is not None else np.nan for s in stats_list])
    line, = ax.plot(xs, mean, marker="o", ms=3, label=label, **kw)
    ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.18, lw=0)


def _seed_band(ax, xs, arr, i: int, label: str, **kw) -> None:
    """Mean over seeds (rows of ``arr``) as a line, their range as a band."""
    ax.plot(xs, arr.mean(0), color=f"C{i}", label=label, **kw)
    if len(arr) > 1:
        ax.fill_between(xs, arr.min(0), arr.max(0), color=f"C{i}", alpha=0.15, lw=0)


def _uncompressed(m: dict):
    """The float accuracy the sweeps start from (measured on the sweep's images when there is one)."""
    return m.get("sweep:float") or m.get("float")


def draw_plots(model: str, summary: dict, results: dict, plot_dir: Path) -> dict[str, Path]:
    plt = pyplot()
    metrics = summary["metrics"]
    methods = _methods(summary)
    prefix = slug(model)
    paths: dict[str, Path] = {}
    data = results["dataset"]
    measured = "validation" if data.get("evaluated_on") == "val" else "test"
    curve = "validation" if data.get("val_images") else "test"

    def emit(name: str, fig) -> None:
        fig.tight_layout()
        paths[name] = plot_dir / f"{prefix}-{name}.png"
        save_png(fig, paths[name])

    # accuracy vs sparsity: unstructured and channel side by side
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for ax, key, title in ((axes[0], "sparsity:", "unstructured magnitude pruning"),
                           (axes[1], "channels:", "structured channel pruning")):
        keys = _settings(metrics, key)
        xs = [0.0] + [float(k.split(":")[1]) for k in keys]
        for m in methods:
            _band(ax, xs, [_uncompressed(metrics[m])] + [metrics[m].get(k) for k in keys], m)
        ax.set_xlabel("sparsity")
        ax.set_ylabel(f"{measured} accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{model}: accuracy under pruning (mean ± std over seeds)")
    emit("accuracy_vs_sparsity", fig)

    # accuracy vs weight bits (float drawn at 32)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    bit_keys = [k for k in _bit_keys(metrics) if "A" not in k]
    xs = [32] + [int(k[1:]) for k in bit_keys]
    for m in methods:
        _band(ax, xs, [_uncompressed(metrics[m])] + [metrics[m].get(k) for k in bit_keys], m)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels(["fp32"] + [str(x) for x in xs[1:]])
    ax.invert_xaxis()
    ax.set_xlabel("weight bits (per-channel PTQ)")
    ax.set_ylabel(f"{measured} accuracy (%)")
    ax.set_title(f"{model}: accuracy under quantization")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    emit("accuracy_vs_bits", fig)

    # sharpness bars
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    for ax, key, title in ((axes[0], "sharpness:top_eigenvalue", "top Hessian eigenvalue"),
                           (axes[1], "sharpness:hessian_trace", "Hessian trace")):
        vals = [metrics[m].get(key) or {} for m in methods]
        means = [v.get("mean") or 0.0 for v in vals]
        errs = [v.get("std") or 0.0 for v in vals]
        ax.bar(range(len(methods)), means, yerr=errs, capsize=3, color=[f"C{i}" for i in range(len(methods))])
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
        if all(v > 0 for v in means):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{model}: sharpness of the folded models (lower is flatter)")
    emit("sharpness", fig)

    runs = [r for r in results["runs"] if r["model"] == model]

    # 1-D loss landscapes: mean over seeds per method
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for i, m in enumerate(methods):
        curves = [r["evaluate"]["landscape"] for r in runs if r["method"] == m and "evaluate" in r]
        if not curves:
            continue
        _seed_band(ax, curves[0]["alphas"], np.array([c["losses"] for c in curves]), i, m)
    ax.set_yscale("log")
    ax.set_xlabel("step along a filter-normalised random direction")
    ax.set_ylabel("training loss")
    ax.set_title(f"{model}: 1-D loss landscape (band: seeds' range)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    emit("landscape", fig)

    # training curves: train loss and held-out accuracy per epoch (validation when there is a validation split)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for i, m in enumerate(methods):
        hist = [r["train"]["history"] for r in runs if r["method"] == m and "train" in r]
        if not hist:
            continue
        epochs = [h["epoch"] for h in hist[0]]
        n = min(len(h) for h in hist)
        loss = np.array([[e["train_loss"] for e in h[:n]] for h in hist])
        acc = np.array([[100 * e["test_accuracy"] for e in h[:n]] for h in hist])
        for ax, arr in ((axes[0], loss), (axes[1], acc)):
            _seed_band(ax, epochs[:n], arr, i, m, marker="o", ms=3)
    from matplotlib.ticker import MaxNLocator

    axes[0].set_ylabel("training loss")
    axes[1].set_ylabel(f"{curve} accuracy (%)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{model}: training curves (expanded models during training; band: seeds' range)")
    emit("training_curves", fig)
    return paths
