"""Study statistics: per-run metrics, means over seeds, paired gains over Adam, and the results schema."""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import SntfxError
from .config import StudyConfig

__all__ = ["metrics_of", "summarize", "resummarize", "validate_results", "read_validation_results",
           "confidence_interval", "mean_interval", "PRIMARY_SCORES", "SCHEMA_PATH", "SCHEMA_VERSION"]

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "study-results.schema.json"
SCHEMA_VERSION = 1


# -- statistics ----------------------------------------------------------------------


def metrics_of(record: dict[str, Any]) -> dict[str, float]:
    """One run's numbers as a flat ``name -> value`` map (accuracies in [0, 1])."""
    m: dict[str, float] = {}
    ev, sw, tr, ox = (record.get(k) or {} for k in ("evaluate", "sweep", "train", "onnx"))
    if ev:
        m["float"] = ev["float_accuracy"]
        for k in ("top_eigenvalue", "hessian_trace", "sam_sharpness", "loss"):
            m[f"sharpness:{k}"] = ev["sharpness"][k]
        for k, v in (ev.get("weights") or {}).items():
            m[f"weights:{k}"] = v
    if sw:
        m["sweep:float"] = sw["float"]
        for s, acc in sw["sparsity"].items():
            m[f"sparsity:{s}"] = acc
        for s, v in sw["channel_sparsity"].items():
            m[f"channels:{s}"] = v["accuracy"]
        for b, acc in sw["bits"].items():
            m[f"W{b}"] = acc
        for b, acc in sw.get("bits_mse", {}).items():
            m[f"W{b}:mse"] = acc
        for name, acc in sw["act_bits"].items():
            m[name] = acc
        for setting, acc in sw.get("wanda", {}).items():
            m[f"wanda:{setting}"] = acc
    if tr:
        m["epoch_seconds"] = tr["epoch_seconds_median"]
    for kind in ("fp32", "int8"):
        part = ox.get(kind) or {}
        if "bench" in part:
            for b, lat in part["bench"]["latency"].items():
                m[f"ort:{kind}:ms:b{b}"] = lat["p50_ms"]
            m[f"ort:{kind}:accuracy"] = part["accuracy"]
            m[f"ort:{kind}:mb"] = part["size_bytes"] / 1e6
    for setting, d in (ox.get("deployed") or {}).items():  # the sweep's W/A settings, deployed on ORT
        m[f"deployed:{setting}:simulated"] = d["simulated"]
        m[f"deployed:{setting}:onnxruntime"] = d["onnxruntime"]
    return m


def mean_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation, n and the 95% confidence interval of the mean (t, n - 1 dof; n >= 2)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "ci95": None}
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals), "ci95": confidence_interval(mean, std, len(vals))}


def confidence_interval(mean: float, std: float, n: int, level: float = 0.95) -> list[float] | None:
    """Two-sided ``level`` interval of a mean from ``n`` paired samples: ``mean +- t(n-1) std / sqrt(n)``."""
    if n < 2:
        return None
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return [mean - half, mean + half]


#: The pre-registered primary scores: chosen before any SNT result was looked at, and never changed after.
#: Each is a method's accuracy gain over Adam (paired by seed), averaged over these settings.
PRIMARY_SCORES: dict[str, tuple[str, ...]] = {
    "pruning score": ("wanda:0.5", "wanda:0.7", "wanda:2:4"),
    "quantization score": ("W4A8", "W6A6", "W4", "W3"),
}


def summarize(records: Sequence[dict[str, Any]], config: StudyConfig) -> dict[str, Any]:
    """Per model and method: mean/std/n of every metric over seeds, and paired gains over Adam.

    Gains are paired by seed (each method and Adam share the initial weights
    and the data order), so the spread is that of the per-seed differences.
    ``mechanism_vs_adam`` pairs the mechanism measurements (sharpness and the
    folded weights' statistics) the same way: method minus Adam, per seed.
    """
    return _summarize(records, config.models)


def resummarize(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` with its summary recomputed from its runs by this version's statistics.

    A results file keeps the summary of the version that wrote it; the runs'
    stage results are what was measured. Recomputing lets a report of an older
    study show what was added since (intervals, the mechanism's paired
    differences) without measuring anything again.
    """
    models = results.get("config", {}).get("models") or list(results.get("summary", {}))
    return {**results, "summary": _summarize(results["runs"], models)}


def _summarize(records: Sequence[dict[str, Any]], models: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in models:
        per_method: dict[str, dict[int, dict[str, float]]] = {}
        for rec in records:
            if rec["model"] == model:
                per_method.setdefault(rec["method"], {})[rec["seed"]] = metrics_of(rec)
        adam = per_method.get("adam", {})
        metrics, gains, groups, primary, mechanism = {}, {}, {}, {}, {}
        for method, by_seed in per_method.items():
            names = sorted({k for m in by_seed.values() for k in m})
            metrics[method] = {k: mean_interval([m.get(k) for m in by_seed.values()]) for k in names}
            rel_time = [by_seed[s]["epoch_seconds"] / adam[s]["epoch_seconds"] for s in by_seed
                        if s in adam and "epoch_seconds" in by_seed[s] and "epoch_seconds" in adam[s]]
            metrics[method]["epoch_time_vs_adam"] = mean_interval(rel_time)
            if method == "adam":
                continue
            acc_keys = [k for k in names if _is_accuracy(k)]
            gains[method] = {k: mean_interval(_paired(by_seed, adam, k)) for k in acc_keys}
            groups[method] = {g: mean_interval(_group_gain(by_seed, adam, keys)) for g, keys in _groups(acc_keys).items()}
            primary[method] = {name: mean_interval(_group_gain(by_seed, adam, list(keys)))
                               for name, keys in PRIMARY_SCORES.items()}
            mechanism[method] = {k: mean_interval(_paired(by_seed, adam, k)) for k in names if k.startswith(MECHANISM)}
        out[model] = {"metrics": metrics, "gains_over_adam": gains, "group_gains_over_adam": groups,
                      "primary_scores": primary, "mechanism_vs_adam": mechanism}
    return out


#: Metric prefixes of the mechanism measurements (sharpness of the training loss; the folded weights' statistics).
MECHANISM = ("sharpness:", "weights:")


def _paired(by_seed, adam, key: str) -> list[float]:
    """``method - adam`` for ``key``, over the seeds both have."""
    return [by_seed[s][key] - adam[s][key] for s in by_seed if s in adam and key in by_seed[s] and key in adam[s]]


def _is_accuracy(key: str) -> bool:
    return key == "float" or key.startswith(("sparsity:", "channels:", "wanda:", "W", "ort:")) and (
        not key.startswith("ort:") or key.endswith(":accuracy"))


def _groups(keys: Sequence[str]) -> dict[str, list[str]]:
    """The settings averaged in the verdict: unstructured pruning, channel pruning, low-bit quantization."""
    return {
        "unstructured pruning": [k for k in keys if k.startswith("sparsity:")],
        "activation-aware pruning": [k for k in keys if k.startswith("wanda:")],
        "channel pruning": [k for k in keys if k.startswith("channels:")],
        "quantization (<= 6 bits)": [k for k in keys if re.fullmatch(r"W[2-6]", k) or re.fullmatch(r"W[2-6]A\d+", k)],
    }


def _group_gain(by_seed, adam, keys) -> list[float]:
    """Per seed: the method's accuracy minus Adam's, averaged over ``keys``."""
    out = []
    for s, m in by_seed.items():
        if s in adam and keys and all(k in m and k in adam[s] for k in keys):
            out.append(statistics.fmean(m[k] - adam[s][k] for k in keys))
    return out


# -- reading and checking results ------------------------------------------------------


def read_validation_results(path: str | Path, choosing: str) -> dict[str, Any]:
    """A study's ``results.json`` that was evaluated on its validation split, for a script that chooses something.

    Raises :class:`SntfxError` for results read on the test split: ``choosing`` (e.g. "the default style") is
    made on validation, and test accuracy is read once, for what was chosen.
    """
    results = json.loads(Path(path).read_text())
    split = results.get("config", {}).get("evaluate_on", "test")
    if split != "val":
        raise SntfxError(f"{path}: evaluated on the {split} split; {choosing} is chosen on validation "
                         "(a study with val_images and evaluate_on = \"val\")")
    return results


def validate_results(results: dict[str, Any]) -> None:
    """Raise :class:`SntfxError` if ``results`` does not follow the published schema."""
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(results), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.path) or "(top level)"
        raise SntfxError(f"study results do not match the schema at {where}: {first.message}")
