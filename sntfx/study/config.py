"""Study settings: the training methods, :class:`StudyConfig`, presets and config files."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..blocks import get_style, style_names
from ..errors import SntfxError
from ..pipelines import DEFAULT_BUDGET, DEFAULT_MEMORY_BUDGET

__all__ = ["Method", "parse_methods", "parse_seeds", "StudyConfig", "PRESETS", "preset_config", "read_config_file",
           "slug"]

log = logging.getLogger(__name__)

# -- methods -------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One training method: optimizer (Adam or SAM on Adam/SGD) and optional SNT expansion."""

    name: str
    style: str | None = None
    ratio: int | None = None
    init: str = "preserve"  # preserve | fresh
    sam: bool = False

    @property
    def snt(self) -> bool:
        return self.style is not None

    @property
    def step_cost(self) -> float:
        base = 1.0 if self.style is None else get_style(self.style).step_cost  # the style's declared estimate
        return base * (2.0 if self.sam else 1.0)

    @classmethod
    def parse(cls, text: str) -> Method:
        raw = text.strip().lower()
        base, plus, extra = raw.partition("+")
        sam = False
        if plus:
            if extra != "sam":
                raise SntfxError(f"method '{text}': only '+sam' can be combined (e.g. snt-linear+sam)")
            sam = True
        if base == "adam":
            if sam:
                raise SntfxError("method 'adam+sam' is just 'sam'")
            return cls("adam")
        if base == "sam":
            if sam:
                raise SntfxError(f"method '{text}' names SAM twice")
            return cls("sam", sam=True)
        if not base.startswith("snt-"):
            raise SntfxError(f"unknown method '{text}'; use adam, sam, or snt-STYLE[-xRATIO][-fresh][+sam] with STYLE "
                             f"one of {', '.join(style_names())} (e.g. snt-linear, snt-branch+sam, snt-linear-x2)")
        rest = base[4:]
        style = next((s for s in sorted(style_names(), key=len, reverse=True)
                      if rest == s or rest.startswith(s + "-")), None)
        if style is None:
            raise SntfxError(f"method '{text}': unknown SNT style; choose one of {', '.join(style_names())}")
        ratio, init = None, "preserve"
        for token in filter(None, rest[len(style):].split("-")):
            if re.fullmatch(r"x\d+", token) and int(token[1:]) >= 1:
                if "ratio" not in get_style(style).options:
                    raise SntfxError(f"method '{text}': the '{style}' style has no expansion ratio (-x{token[1:]})")
                ratio = int(token[1:])
            elif token in ("fresh", "preserve"):
                init = token
            else:
                raise SntfxError(f"method '{text}': unknown option '{token}' (use -xRATIO, e.g. -x2, or -fresh)")
        return cls(raw, style, ratio, init, sam)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_methods(text: str | Sequence[str]) -> list[Method]:
    items = text.split(",") if isinstance(text, str) else list(text)
    methods = [Method.parse(t) for t in items if t.strip()]
    if not methods:
        raise SntfxError("no methods given; e.g. --methods adam,sam,snt-linear")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise SntfxError(f"a method is listed twice in {', '.join(names)}")
    if "adam" not in names:
        methods.insert(0, Method("adam"))
        log.info("added the Adam baseline: every gain is measured against it")
    return methods


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()] if isinstance(text, str) else [int(s) for s in text]
    except ValueError:
        raise SntfxError(f"seeds must be integers separated by commas, e.g. 0,1,2 (got '{text}')") from None
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise SntfxError(f"seeds must be distinct non-negative integers, e.g. 0,1,2 (got '{text}')")
    return seeds


# -- configuration ---------------------------------------------------------------


@dataclass
class StudyConfig:
    """Everything that defines a study; stored in ``results.json`` and per run."""

    models: list[str] = field(default_factory=lambda: ["sntfx:smallvgg"])
    data: str = "fashion-mnist"
    data_dir: str | None = None
    methods: list[str] = field(default_factory=lambda: ["adam", "sam", "snt-lin-branch", "snt-qa-branch"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "adam"  # the base optimizer: adam | adamw | sgd (SAM wraps it)
    lr: float | None = None
    weight_decay: float = 0.0
    rho: float = 0.05
    ratio: int = 4  # SNT expansion ratio unless the method names one
    # the snt pass's training-cost budget at batch_size (a fraction; "none" or None: expand every eligible layer)
    budget: float | str | None = DEFAULT_BUDGET
    # the snt pass's training-memory budget at batch_size (applies with budget; "none": no memory limit)
    memory_budget: float | str | None = DEFAULT_MEMORY_BUDGET
    limit_batches: int | None = None  # training batches per epoch (tiny studies)
    eval_images: int | None = None  # test images for the sweeps and ORT accuracy (None: all)
    sparsities: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.8, 0.9])
    channel_sparsities: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5])
    bits: list[int] = field(default_factory=lambda: [8, 6, 5, 4, 3])
    act_bits: list[list[int]] = field(default_factory=lambda: [[8, 8], [6, 6], [4, 8], [4, 4]])
    wanda_sparsities: list[float] = field(default_factory=lambda: [0.5, 0.7])  # activation-aware, per output row
    nm_patterns: list[str] = field(default_factory=lambda: ["2:4"])  # activation-aware N:M
    # weight-only settings like bits, with per-channel ranges chosen by rounding error (MSE; clips outliers) instead
    # of min-max: whether a model's heavy-tailed weights cost it accuracy or only range
    mse_bits: list[int] = field(default_factory=list)
    recalibrate_bn: bool = True  # re-estimate BatchNorm statistics after activation-aware pruning
    val_images: int = 0  # training images held out as a validation split (stratified, the same for every run)
    evaluate_on: str = "test"  # val | test: the split every accuracy after training is measured on
    # with evaluate_on = val: also measure every run on the test split, into files the report does not read (sealed
    # until the same folder is run with evaluate_on = test, which then only collects them)
    seal_test: bool = False
    exclude: list[str] = field(default_factory=list)  # glob patterns over module names: left dense and in float
    sharpness_batches: int = 4
    sharpness_batch_size: int = 128
    sharpness_iters: int = 30
    trace_samples: int = 10
    landscape_steps: int = 21
    onnx: bool = True
    bench_batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    bench_iters: int = 30
    provider: str = "auto"  # ONNX Runtime: auto (the hardware present: CUDA, with TensorRT when installed, on a GPU machine; else the CPU) | tensorrt | cuda | cpu
    device: str = "auto"  # training device; the evaluation stages compute there too
    num_workers: int = 0  # data-loader worker processes (training and evaluation); memory is pinned on a GPU
    preset: str | None = None

    def __post_init__(self) -> None:
        _check_field_types(self)
        if not self.models:
            raise SntfxError("a study needs at least one model (--model)")
        self.methods = [m.name for m in parse_methods(self.methods)]
        self.seeds = parse_seeds(self.seeds)
        if self.epochs < 1 or self.batch_size < 1:
            raise SntfxError("--epochs and --batch-size must be at least 1")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise SntfxError(f"--optimizer must be adam, adamw or sgd (SAM is a method), not '{self.optimizer}'")
        from ..compress import check_sweep_settings

        check_sweep_settings(sparsities=self.sparsities, channel_sparsities=self.channel_sparsities, bits=self.bits,
                             act_bits=self.act_bits, wanda_sparsities=self.wanda_sparsities,
                             nm_patterns=self.nm_patterns, mse_bits=self.mse_bits)
        if self.val_images < 0:
            raise SntfxError(f"val_images must be 0 (no validation split) or a number of training images, "
                             f"got {self.val_images}")
        if not isinstance(self.exclude, list) or not all(isinstance(p, str) and p.strip() for p in self.exclude):
            raise SntfxError(f"exclude must be a list of glob patterns over module names, e.g. [\"features.0\"], "
                             f"got {self.exclude!r}")
        if self.evaluate_on not in ("val", "test"):
            raise SntfxError(f"evaluate_on must be val or test, not '{self.evaluate_on}'")
        if self.evaluate_on == "val" and not self.val_images:
            raise SntfxError("evaluate_on = val needs a validation split: set val_images (e.g. --val-images 10000)")
        if self.seal_test and self.evaluate_on != "val":
            raise SntfxError("seal_test measures the test split besides the validation split: it needs "
                             "evaluate_on = val (the test split is then read by running evaluate_on = test)")
        for name, value, low_open in (("lr", self.lr, True), ("weight_decay", self.weight_decay, False),
                                      ("rho", self.rho, True)):
            if value is None and name == "lr":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or (value <= 0 if low_open else value < 0):
                raise SntfxError(f"study setting {name} must be a {'positive' if low_open else 'non-negative'} "
                                 f"finite number, got {value!r}")
        if self.provider not in ("auto", "tensorrt", "cuda", "cpu"):
            raise SntfxError(f"--provider must be auto, tensorrt, cuda or cpu, not '{self.provider}'")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise SntfxError(f"num_workers must be a non-negative integer, got {self.num_workers!r}")
        if self.ratio < 1:
            raise SntfxError(f"--ratio must be at least 1, got {self.ratio}")
        # counts a config file can set to nonsense the command line's own ranges would refuse (0 training batches,
        # 0 evaluation images, a landscape of one point): refused here, before any run trains
        for name, least in (("limit_batches", 1), ("eval_images", 1), ("sharpness_batches", 1),
                            ("sharpness_batch_size", 1), ("sharpness_iters", 1), ("trace_samples", 1),
                            ("landscape_steps", 2), ("bench_iters", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                unset = " (or leave it out)" if name in ("limit_batches", "eval_images") else ""
                raise SntfxError(f"study setting {name} must be at least {least}{unset}, got {value}")
        if (self.onnx and not self.bench_batch_sizes) or any(b < 1 for b in self.bench_batch_sizes):
            raise SntfxError(f"bench_batch_sizes must list batch sizes of at least 1, e.g. [1, 32], "
                             f"got {self.bench_batch_sizes}")
        self.budget = _fraction_or_none("budget", self.budget)
        # budget none sets no limit of either kind; the memory budget applies with a budget
        self.memory_budget = None if self.budget is None else _fraction_or_none("memory_budget", self.memory_budget)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @property
    def method_objects(self) -> list[Method]:
        return parse_methods(self.methods)

    @property
    def sweep_settings(self) -> int:
        """Accuracy measurements in one run's sweep (float + every compression setting)."""
        return 1 + len(self.sparsities) + len(self.channel_sparsities) + len(self.bits) + len(self.act_bits) + \
            len(self.wanda_sparsities) + len(self.nm_patterns) + len(self.mse_bits)


_SCALARS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _type_ok(value: Any, annotation: str) -> bool:
    """Whether ``value`` (from a config file or the command line) fits a StudyConfig annotation."""
    options = [a.strip() for a in annotation.split("|")]
    for option in options:
        if option == "None" and value is None:
            return True
        if option in _SCALARS:
            if isinstance(value, bool) and option != "bool":
                continue
            if isinstance(value, _SCALARS[option]) and not (option == "float" and not math.isfinite(value)):
                return True
        if option.startswith("list[") and isinstance(value, list):
            inner = option[5:-1]
            if all(_type_ok(v, inner) for v in value):
                return True
    return False


def _check_field_types(config: StudyConfig) -> None:
    textual = {"methods", "seeds"}  # also given as comma-separated text
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in textual and isinstance(value, str):
            continue
        if not _type_ok(value, str(f.type)):
            raise SntfxError(f"study setting {f.name} = {value!r} has the wrong type: expected {f.type} "
                             f"(e.g. {f.name} = {json.dumps(_example(f))})")


def _example(f) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def quick_data() -> str:
    """The quick preset's data: ``"fashion-mnist"`` where it is installed, else ``"digits"`` (always present)."""
    from ..data import FASHION_MNIST_DIRS, _find

    installed = any(_find(Path(folder), "train-images-idx3-ubyte") for folder in FASHION_MNIST_DIRS)
    return "fashion-mnist" if installed else "digits"


PRESETS: dict[str, dict[str, Any]] = {
    # Under 10 minutes on 2 CPU cores: Fashion-MNIST when installed, else digits.
    "quick": {
        "fashion-mnist": {"models": ["sntfx:smallvgg"], "methods": ["adam", "sam", "snt-lin-branch", "snt-qa-branch"],
                          "seeds": [0, 1], "epochs": 1, "lr": 2e-3, "eval_images": 2000, "sharpness_batches": 2,
                          "sharpness_iters": 20, "trace_samples": 5, "bench_iters": 20,
                          "sparsities": [0.3, 0.5, 0.7, 0.9], "channel_sparsities": [0.1, 0.3]},
        "digits": {"models": ["sntfx:smallvgg"], "methods": ["adam", "sam", "snt-lin-branch", "snt-qa-branch"],
                   "seeds": [0, 1, 2], "epochs": 15, "batch_size": 64, "lr": 3e-3, "sharpness_batches": 2,
                   "sharpness_iters": 20, "trace_samples": 5, "bench_iters": 20,
                   "sparsities": [0.5, 0.7, 0.8, 0.9], "channel_sparsities": [0.2, 0.4]},
    },
    # The full protocol (CIFAR-10 from a local directory, GPUs, torchrun); see the README for its cost.
    "paper": {
        "cifar10": {"models": ["sntfx:resnet20", "sntfx:resnet56", "sntfx:vgg16", "sntfx:mobilenetv2", "sntfx:vit"],
                    "methods": ["adam", "sam", "snt-lin-branch", "snt-qa-branch", "snt-linear", "snt-qa-branch+sam"],
                    "seeds": [0, 1, 2], "epochs": 200, "batch_size": 128, "lr": 1e-3, "weight_decay": 5e-4,
                    "sharpness_batches": 8, "sharpness_iters": 50, "trace_samples": 20, "bench_iters": 100},
    },
}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Study settings from a TOML or JSON file (keys are :class:`StudyConfig` fields)."""
    import tomllib

    path = Path(path)
    try:
        values = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SntfxError(f"cannot read study settings from '{path}': {exc}") from exc
    if not isinstance(values, dict):
        raise SntfxError(f"'{path}' must hold a table of study settings")
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SntfxError(f"unknown study setting(s) {', '.join(unknown)} in '{path}'; known: {', '.join(sorted(known))}")
    return values


def preset_config(name: str | None, overrides: dict[str, Any]) -> StudyConfig:
    """A :class:`StudyConfig` from a preset (or the defaults) with ``overrides`` on top (``None`` = keep)."""
    values: dict[str, Any] = {}
    given = {k: v for k, v in overrides.items() if v is not None}
    if name is not None:
        if name not in PRESETS:
            raise SntfxError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
        table = PRESETS[name]
        data = given.get("data") or (quick_data() if name == "quick" else next(iter(table)))
        values = dict(table.get(data) or next(iter(table.values())))
        values["data"] = data
        values["preset"] = name
    values.update(given)
    return StudyConfig(**values)


# -- paths --------------------------------------------------------------------------


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text.replace(":", "-")).strip("_")


def _fraction_or_none(name: str, value: Any) -> float | None:
    """A budget as the config file or the command line gives it: a fraction >= 0, or "none" (None)."""
    if value is None or isinstance(value, str) and value.strip().lower() == "none":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise SntfxError(f"{name} must be a fraction >= 0 (e.g. 0.1) or \"none\", got {value!r}")
    return float(value)
