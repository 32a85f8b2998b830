"""``sntfx study``: the SNT experiment end to end, in one resumable command.

For every model, method and seed the study

1. builds the model with ``torch.manual_seed(seed)`` (so every method starts
   from the same initial weights; SNT methods expand that same model, by
   default preserving its function exactly) and trains it with the same data
   order (the sampler and the augmentation are seeded by ``seed`` alone);
2. folds SNT models back into the original architecture and measures the
   fold error on real test images;
3. measures float accuracy, sharpness (top Hessian eigenvalue, Hessian trace,
   SAM sharpness) and a 1-D loss landscape, all on the folded model and the
   same fixed training batches;
4. sweeps compression without fine-tuning (:func:`sntfx.compress.sweep`):
   global magnitude pruning, structured channel pruning, simulated weight
   quantization W8..W3, W8A8 and W4A8;
5. exports the float model and a static int8 (QDQ) model to ONNX, verifies
   both against torch and benchmarks them on ONNX Runtime (latency, size,
   accuracy).

Every stage of every run writes its result as JSON under
``OUT/runs/MODEL/METHOD/seedN/`` (training keeps a checkpoint as it goes), so
an interrupted study continues where it stopped. Under ``torchrun`` every
rank trains each run (DistributedDataParallel) and rank 0 alone does the
rest. At the end the study writes ``results.json`` (validated against
``sntfx/schemas/study-results.schema.json``), ``report.md`` and PNG plots.

Methods are named ``adam``, ``sam``, ``snt-STYLE`` with optional ``-xRATIO``
and ``-fresh`` (new random blocks instead of the exact expansion of the
initial model), and ``+sam`` to train an SNT model with SAM:
``snt-linear``, ``snt-linear-x2``, ``snt-branch``, ``snt-qa-branch-fresh``,
``snt-linear+sam``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .blocks import get_style, style_names
from .errors import SntfxError
from .io import atomic_write

__all__ = [
    "Method",
    "StudyConfig",
    "Study",
    "StudyProgress",
    "PRESETS",
    "preset_config",
    "read_config_file",
    "SCHEMA_PATH",
    "validate_results",
]

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).with_name("schemas") / "study-results.schema.json"
SCHEMA_VERSION = 1
STAGES = ("train", "evaluate", "sweep", "onnx")
TRAIN_KEYS = ("data", "data_dir", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "rho", "ratio",
              "limit_batches")
STAGE_KEYS = {
    "evaluate": ("rho", "sharpness_batches", "sharpness_batch_size", "sharpness_iters", "trace_samples",
                 "landscape_steps"),
    "sweep": ("sparsities", "channel_sparsities", "bits", "act_bits", "eval_images"),
    "onnx": ("bench_batch_sizes", "bench_iters", "provider", "eval_images"),
}

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
    methods: list[str] = field(default_factory=lambda: ["adam", "sam", "snt-qa-branch", "snt-linear"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "adam"  # the base optimizer: adam | sgd (SAM wraps it)
    lr: float | None = None
    weight_decay: float = 0.0
    rho: float = 0.05
    ratio: int = 4  # SNT expansion ratio unless the method names one
    limit_batches: int | None = None  # training batches per epoch (tiny studies)
    eval_images: int | None = None  # test images for the sweeps and ORT accuracy (None: all)
    sparsities: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.8, 0.9])
    channel_sparsities: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5])
    bits: list[int] = field(default_factory=lambda: [8, 6, 5, 4, 3])
    act_bits: list[list[int]] = field(default_factory=lambda: [[8, 8], [4, 8]])
    sharpness_batches: int = 4
    sharpness_batch_size: int = 128
    sharpness_iters: int = 30
    trace_samples: int = 10
    landscape_steps: int = 21
    onnx: bool = True
    bench_batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    bench_iters: int = 30
    provider: str = "auto"  # ONNX Runtime: auto (CUDA when torch sees a GPU, else CPU) | tensorrt | cuda | cpu
    device: str = "auto"
    preset: str | None = None

    def __post_init__(self) -> None:
        _check_field_types(self)
        if not self.models:
            raise SntfxError("a study needs at least one model (--model)")
        self.methods = [m.name for m in parse_methods(self.methods)]
        self.seeds = parse_seeds(self.seeds)
        if self.epochs < 1 or self.batch_size < 1:
            raise SntfxError("--epochs and --batch-size must be at least 1")
        if self.optimizer not in ("adam", "sgd"):
            raise SntfxError(f"--optimizer must be adam or sgd (SAM is a method), not '{self.optimizer}'")
        from .compress import check_sweep_settings

        check_sweep_settings(sparsities=self.sparsities, channel_sparsities=self.channel_sparsities, bits=self.bits,
                             act_bits=self.act_bits)
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
        if self.ratio < 1:
            raise SntfxError(f"--ratio must be at least 1, got {self.ratio}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @property
    def method_objects(self) -> list[Method]:
        return parse_methods(self.methods)

    @property
    def sweep_settings(self) -> int:
        """Accuracy measurements in one run's sweep (float + every compression setting)."""
        return 1 + len(self.sparsities) + len(self.channel_sparsities) + len(self.bits) + len(self.act_bits)


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
    import dataclasses

    textual = {"methods", "seeds"}  # also given as comma-separated text
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in textual and isinstance(value, str):
            continue
        if not _type_ok(value, str(f.type)):
            raise SntfxError(f"study setting {f.name} = {value!r} has the wrong type: expected {f.type} "
                             f"(e.g. {f.name} = {json.dumps(_example(f))})")


def _example(f) -> Any:
    import dataclasses

    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _quick_data() -> str:
    from .data import FASHION_MNIST_DIRS, _find

    installed = any(_find(Path(folder), "train-images-idx3-ubyte") for folder in FASHION_MNIST_DIRS)
    return "fashion-mnist" if installed else "digits"


PRESETS: dict[str, dict[str, Any]] = {
    # Under 10 minutes on 2 CPU cores: Fashion-MNIST when installed, else digits.
    "quick": {
        "fashion-mnist": {"models": ["sntfx:smallvgg"], "methods": ["adam", "sam", "snt-qa-branch", "snt-linear"],
                          "seeds": [0, 1], "epochs": 1, "lr": 2e-3, "eval_images": 2000, "sharpness_batches": 2,
                          "sharpness_iters": 20, "trace_samples": 5, "bench_iters": 20,
                          "sparsities": [0.3, 0.5, 0.7, 0.9], "channel_sparsities": [0.1, 0.3]},
        "digits": {"models": ["sntfx:smallvgg"], "methods": ["adam", "sam", "snt-qa-branch", "snt-linear"],
                   "seeds": [0, 1, 2], "epochs": 15, "batch_size": 64, "lr": 3e-3, "sharpness_batches": 2,
                   "sharpness_iters": 20, "trace_samples": 5, "bench_iters": 20,
                   "sparsities": [0.5, 0.7, 0.8, 0.9], "channel_sparsities": [0.2, 0.4]},
    },
    # The full protocol (CIFAR-10 from a local directory, GPUs, torchrun); see the README for its cost.
    "paper": {
        "cifar10": {"models": ["sntfx:resnet20", "sntfx:resnet56", "sntfx:vgg16", "sntfx:mobilenetv2", "sntfx:vit"],
                    "methods": ["adam", "sam", "snt-qa-branch", "snt-branch", "snt-linear", "snt-qa-branch+sam"],
                    "seeds": [0, 1, 2], "epochs": 200, "batch_size": 128, "lr": 1e-3, "weight_decay": 5e-4,
                    "sharpness_batches": 8, "sharpness_iters": 50, "trace_samples": 20, "bench_iters": 100},
    },
}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Study settings from a TOML or JSON file (keys are :class:`StudyConfig` fields)."""
    import dataclasses
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
        data = given.get("data") or (_quick_data() if name == "quick" else next(iter(table)))
        values = dict(table.get(data) or next(iter(table.values())))
        values["data"] = data
        values["preset"] = name
    values.update(given)
    return StudyConfig(**values)


# -- progress --------------------------------------------------------------------


class StudyProgress(Protocol):
    """Progress hooks; the CLI draws one bar across the whole study with them."""

    def begin(self, total: float, runs: int) -> None: ...

    def stage(self, index: int, run: str, stage: str) -> None: ...

    def advance(self, amount: float) -> None: ...


class _NoProgress:
    def begin(self, total, runs):
        pass

    def stage(self, index, run, stage):
        pass

    def advance(self, amount):
        pass


# -- runs --------------------------------------------------------------------------


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text.replace(":", "-")).strip("_")


@dataclass(frozen=True)
class Run:
    model: str
    method: Method
    seed: int
    path: Path

    @property
    def label(self) -> str:
        return f"{self.model} {self.method.name} seed {self.seed}"


class Study:
    """Plan, run and report a study into ``out``; see the module docstring.

    ``progress`` receives the study's progress (the CLI draws a bar with it);
    ``stop_after(run, stage)`` returning True interrupts the study right after
    that stage is stored (for tests and for splitting a study across jobs).
    """

    def __init__(self, config: StudyConfig, out: str | Path, *, progress: StudyProgress | None = None,
                 stop_after: Callable[[Run, str], bool] | None = None, trust_source: bool = False):
        self.config = config
        self.trust_source = trust_source  # for --model files saved elsewhere that name Python code (sntfx.load)
        self.out = Path(out)
        self.progress = progress or _NoProgress()
        self.executed: list[tuple[str, str]] = []  # (run label, stage) actually computed in this call
        self._data = None
        self._stop_after = stop_after

    # -- plan ------------------------------------------------------------------------
    def runs(self) -> list[Run]:
        c = self.config
        return [Run(model, method, seed, self.out / "runs" / slug(model) / slug(method.name) / f"seed{seed}")
                for model in c.models for method in c.method_objects for seed in c.seeds]

    def run_config(self, run: Run) -> dict[str, Any]:
        """The settings a run's training depends on (a resumed study must match them)."""
        c = self.config.to_dict()
        return {"model": run.model, "method": run.method.to_dict(), "seed": run.seed,
                "study": {k: c[k] for k in TRAIN_KEYS}}

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """The settings a stage's result depends on beyond training; a change redoes that stage only."""
        c = self.config.to_dict()
        return {k: c[k] for k in STAGE_KEYS.get(stage, ())}

    def train_config(self, run: Run):
        from .train import TrainConfig

        c = self.config
        return TrainConfig(epochs=c.epochs, batch_size=c.batch_size, optimizer="sam" if run.method.sam else c.optimizer,
                           sam_base=c.optimizer, lr=c.lr, weight_decay=c.weight_decay, rho=c.rho, seed=run.seed,
                           limit_batches=c.limit_batches, device=c.device, online_fold=True)

    @property
    def data(self):
        if self._data is None:
            from .data import load_data

            self._data = load_data(self.config.data, data_dir=self.config.data_dir, seed=0)
        return self._data

    def _steps_per_epoch(self) -> int:
        n = len(self.data.train) // self.config.batch_size
        return max(1, min(n, self.config.limit_batches or n))

    def _weights(self, run: Run) -> dict[str, float]:
        """Work per stage in Adam-step units, for the time-left estimate."""
        c = self.config
        steps = self._steps_per_epoch() * c.epochs
        n_eval = min(len(self.data.test), c.eval_images or len(self.data.test))
        eval_steps = n_eval / c.batch_size / 3  # a forward pass is about a third of a training step
        return {"train": steps * run.method.step_cost,
                "evaluate": eval_steps + c.sharpness_batches * (2 * c.sharpness_iters + 2 * c.trace_samples
                                                               + c.landscape_steps / 3),
                "sweep": c.sweep_settings * eval_steps * 1.5,
                "onnx": (2 * eval_steps + 20) if c.onnx else 0.0}

    # -- run -------------------------------------------------------------------------
    def check(self) -> None:
        """Fail early, before anything is written: the data loads and every model takes it."""
        from .workflow import model_for_data

        info = self.data.info
        for model in self.config.models:
            model_for_data(model, info, trust_source=self.trust_source)
        for run in self.runs():
            self._check_run_dir(run, create=False)

    def run(self) -> dict[str, Any]:
        """Run (or resume) every stage of every run, then write the report; returns ``results.json``'s content."""
        from .train import distributed_session

        with distributed_session(self.config.device) as (rank, _, _):  # under torchrun: join the group, then leave
            return self._run(rank)

    def _run(self, rank: int) -> dict[str, Any]:
        runs = self.runs()
        _ = self.data  # a missing dataset fails here, before anything is written
        if rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "runs").mkdir(exist_ok=True)
            atomic_write(self.out / "study.json", lambda tmp: tmp.write_text(json.dumps(
                {"format": "sntfx-study", "config": self.config.to_dict()}, indent=1)))
        for run in runs:
            self._check_run_dir(run, create=rank == 0)
        weights = {run: self._weights(run) for run in runs}
        self.progress.begin(sum(sum(w.values()) for w in weights.values()), len(runs))
        # Phase 1: training (every rank under torchrun). Phase 2: everything else, rank 0 only.
        for i, run in enumerate(runs):
            self._stage(i, run, "train", weights[run]["train"], self._train)
        if rank != 0:
            return {}
        for i, run in enumerate(runs):
            for stage in STAGES[1:]:
                if stage == "onnx" and not self.config.onnx:
                    continue
                self._stage(i, run, stage, weights[run][stage], getattr(self, f"_{stage}"))
        from .report import write_report

        results = self.collect(runs)
        validate_results(results)
        atomic_write(self.out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
        write_report(results, self.out)
        return results

    def _check_run_dir(self, run: Run, create: bool) -> None:
        cfg_path = run.path / "config.json"
        expected = self.run_config(run)
        if cfg_path.exists():
            stored = json.loads(cfg_path.read_text())
            if stored != expected:
                diff = _diff(stored, expected)
                raise SntfxError(
                    f"'{run.path}' holds results of a run with different settings ({diff}); use another --out "
                    "folder, or delete that run's folder to redo it")
        elif create:
            run.path.mkdir(parents=True, exist_ok=True)
            atomic_write(cfg_path, lambda tmp: tmp.write_text(json.dumps(expected, indent=1, sort_keys=True)))

    def _stage(self, index: int, run: Run, stage: str, weight: float, fn: Callable[[Run, Callable], dict]) -> None:
        path = run.path / f"{stage}.json"
        self.progress.stage(index, run.label, stage)
        settings = self.stage_settings(stage)
        if path.exists():
            if json.loads(path.read_text()).get("settings", {}) == settings:
                self.progress.advance(weight)
                return
            log.info("%s: %s settings changed since it ran; redoing that stage", run.label, stage)
        done = 0.0

        def tick(fraction_of_stage: float) -> None:
            nonlocal done
            step = max(0.0, min(weight * fraction_of_stage, weight - done))
            done += step
            self.progress.advance(step)

        start = time.perf_counter()
        result = fn(run, tick)
        if result is None:  # a non-zero rank: nothing to record
            return
        result["stage_seconds"] = time.perf_counter() - start
        result["settings"] = settings
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
        self.executed.append((run.label, stage))
        self.progress.advance(weight - done)
        if self._stop_after is not None and self._stop_after(run, stage):
            raise KeyboardInterrupt(f"stopped after {stage} of {run.label}")

    # -- stages ----------------------------------------------------------------------
    def _build(self, run: Run):
        import sntfx

        from .workflow import model_for_data

        torch.manual_seed(run.seed)
        gm = model_for_data(run.model, self.data.info, trust_source=self.trust_source)
        if run.method.snt:
            x = torch.zeros(self.data.info.input_shape(2))
            gm = sntfx.transform(gm, x, style=run.method.style, ratio=run.method.ratio or self.config.ratio,
                                 preserve=run.method.init == "preserve", seed=run.seed, inplace=True)
        return gm

    def _train(self, run: Run, tick: Callable[[float], None]) -> dict | None:
        import sntfx

        from .train import Trainer, _dist_info
        from .tracing import compare_outputs

        gm = self._build(run)
        expanded_params = sum(p.numel() for p in gm.parameters())
        data = self.data
        if hasattr(data.train, "seed"):
            data.train.seed = run.seed  # augmentation follows the run's seed, like the sampler
        trainer = Trainer(self.train_config(run), _TrainTicker(tick, self.config.epochs))
        result = trainer.fit(gm, data, run.path / "train", resume=True)
        if _dist_info()[0] != 0:
            return None
        gm.eval()
        x = torch.stack([data.test[i][0] for i in range(min(256, len(data.test)))])
        fold = None
        if run.method.snt:
            with torch.no_grad():
                expanded_out = gm(x)
            folded = sntfx.fold(gm, x[:64], inplace=True)
            folded.eval()
            with torch.no_grad():
                fold = {"rel_error": compare_outputs(expanded_out, folded(x)), "images": len(x)}
            if not fold["rel_error"] <= 1e-4:
                raise SntfxError(f"{run.label}: the folded model differs from the trained one by {fold['rel_error']:.2e} "
                                 "(relative); this is a bug in the fold, please report it")
            gm = folded
        sntfx.save(gm, run.path / "model.pt", info={"method": run.method.to_dict(), "seed": run.seed,
                                                  "history": result.history})
        epoch_seconds = [r["seconds"] for r in result.history]
        return {"history": result.history, "seconds": result.seconds,
                "epoch_seconds_median": statistics.median(epoch_seconds),
                "samples_per_s_median": statistics.median(r["samples_per_s"] for r in result.history),
                "final_test_accuracy": result.history[-1].get("test_accuracy"),
                "params_trained": expanded_params, "params_deployed": sum(p.numel() for p in gm.parameters()),
                "fold": fold}

    def _load(self, run: Run):
        from .models import ModelSpec
        from .serialization import load, read_recipe
        from .workflow import is_model_file

        # The study's own command names run.model; a stored file that rebuilds from that same source is trusted,
        # any other source goes through sntfx.load's usual trust rule.
        path = run.path / "model.pt"
        stored = ModelSpec.from_dict(read_recipe(path)["source"])
        named = ModelSpec.parse(run.model) if not is_model_file(run.model) else None
        same = named is not None and (stored.kind, stored.name, stored.entry) == (named.kind, named.name, named.entry)
        gm = load(path, trust_source=same or self.trust_source)
        gm.eval()
        return gm

    def _eval_batches(self) -> int | None:
        return None if self.config.eval_images is None else max(1, math.ceil(self.config.eval_images / 256))

    def _sharpness_batches(self):
        from .data import fixed_batches

        c = self.config
        return fixed_batches(self.data.train, batches=c.sharpness_batches, batch_size=c.sharpness_batch_size, seed=0)

    def _evaluate(self, run: Run, tick) -> dict:
        from .compress import accuracy
        from .sharpness import batch_loss_fn, landscape, measure

        c = self.config
        gm = self._load(run)
        acc = accuracy(gm, self.data)
        tick(0.1)
        batches = self._sharpness_batches()
        sharp = measure(gm, batches, rho=c.rho, iters=c.sharpness_iters, trace_samples=c.trace_samples, seed=0)
        tick(0.8)
        curve = landscape(gm, batch_loss_fn(gm, batches[:2]), steps=c.landscape_steps, span=1.0, seed=0)
        return {"float_accuracy": acc, "test_images": len(self.data.test), "sharpness": sharp,
                "landscape": curve}

    def _sweep(self, run: Run, tick) -> dict:
        from .compress import sweep

        c = self.config
        gm = self._load(run)
        n = c.sweep_settings
        result = sweep(gm, self.data, sparsities=c.sparsities, channel_sparsities=c.channel_sparsities, bits=c.bits,
                       act_bits=[tuple(p) for p in c.act_bits], limit=self._eval_batches(),
                       progress=lambda label: tick(1.0 / n))
        result["test_images"] = min(len(self.data.test), 256 * (self._eval_batches() or 10**9))
        return result

    def _onnx(self, run: Run, tick) -> dict:
        import tempfile

        import onnxruntime as ort

        from .calibration import CalibrationReader
        from .exporters import bench_onnx, export_onnx, onnx_accuracy, quantize_int8, verify_onnx

        c = self.config
        gm = self._load(run)
        data = self.data
        verify = (torch.stack([data.test[i][0] for i in range(min(64, len(data.test)))]),)
        fp32 = run.path / "model.onnx"
        report = export_onnx(gm, fp32, (torch.zeros(data.info.input_shape(1)),), dynamic_batch=True,
                             verify_inputs=verify)
        tick(0.2)
        out: dict[str, Any] = {"fp32": {"export": report.to_dict()}}
        int8 = run.path / "model.int8.onnx"
        input_name = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()[0].name
        try:
            reader = CalibrationReader(data.train, input_name, batches=16, batch_size=32)
            with tempfile.TemporaryDirectory(dir=run.path, prefix=".sntfx-int8-") as tmp:
                tmp_int8 = Path(tmp) / int8.name
                quantize_int8(fp32, tmp_int8, reader)
                check = verify_onnx(tmp_int8, gm, verify, rtol=float("inf"), min_top1=0.0)
                os.replace(tmp_int8, int8)
            out["int8"] = {"verification": check}
        except Exception as exc:  # noqa: BLE001 - an int8 failure is a result, not a crash
            log.warning("%s: int8 quantization failed: %s", run.label, exc)
            out["int8"] = {"error": f"{type(exc).__name__}: {exc}"}
        tick(0.3)
        limit = c.eval_images
        provider = c.provider if c.provider != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        for kind, path in (("fp32", fp32), ("int8", int8)):
            if "error" in out[kind]:
                continue
            bench = bench_onnx(path, provider=provider, batch_sizes=tuple(c.bench_batch_sizes), warmup=5,
                               iters=c.bench_iters)
            out[kind]["bench"] = bench.to_dict()
            out[kind]["accuracy"] = onnx_accuracy(path, data.test, provider=provider, limit=limit)
            out[kind]["size_bytes"] = bench.size_bytes
            tick(0.25)
        return out

    # -- results -----------------------------------------------------------------------
    def collect(self, runs: Sequence[Run]) -> dict[str, Any]:
        """Gather every run's stage results and the summary statistics into one document."""
        from . import __version__

        records = []
        for run in runs:
            rec: dict[str, Any] = {"model": run.model, "method": run.method.name, "seed": run.seed,
                                   "path": str(run.path.relative_to(self.out))}
            for stage in STAGES:
                p = run.path / f"{stage}.json"
                if p.exists():
                    rec[stage] = json.loads(p.read_text())
            records.append(rec)
        return {
            "schema": "sntfx-study-results",
            "schema_version": SCHEMA_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sntfx_version": __version__,
            "config": self.config.to_dict(),
            "dataset": {**self.data.info.to_dict(), "train_images": len(self.data.train),
                        "test_images": len(self.data.test)},
            "environment": environment(),
            "runs": records,
            "summary": summarize(records, self.config),
        }


class _TrainTicker:
    """Trainer callback that turns steps into study progress."""

    def __init__(self, tick: Callable[[float], None], epochs: int):
        self.tick, self.epochs, self.steps = tick, epochs, 1

    def on_epoch_start(self, epoch, steps):
        self.steps = max(steps, 1)

    def on_step(self, epoch, step, loss, samples_per_s):
        self.tick(1.0 / (self.steps * self.epochs))

    def on_epoch_end(self, record):
        log.info("epoch %d: loss %.4f, test accuracy %.4f", record["epoch"], record["train_loss"],
                 record.get("test_accuracy", float("nan")))


def _diff(a: dict, b: dict, prefix: str = "") -> str:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            sub = _diff(va, vb, f"{prefix}{k}.")
            if sub:
                out.append(sub)
        elif va != vb:
            out.append(f"{prefix}{k}: stored {va!r}, now {vb!r}")
    return "; ".join(out)


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "torchvision", "timm", "torch-pruning", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
           "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "packages": versions,
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import onnxruntime as ort

        env["onnxruntime_providers"] = ort.get_available_providers()
    except Exception:  # noqa: BLE001
        env["onnxruntime_providers"] = []
    return env


# -- statistics ----------------------------------------------------------------------


def metrics_of(record: dict[str, Any]) -> dict[str, float]:
    """One run's numbers as a flat ``name -> value`` map (accuracies in [0, 1])."""
    m: dict[str, float] = {}
    ev, sw, tr, ox = (record.get(k) or {} for k in ("evaluate", "sweep", "train", "onnx"))
    if ev:
        m["float"] = ev["float_accuracy"]
        for k in ("top_eigenvalue", "hessian_trace", "sam_sharpness", "loss"):
            m[f"sharpness:{k}"] = ev["sharpness"][k]
    if sw:
        m["sweep:float"] = sw["float"]
        for s, acc in sw["sparsity"].items():
            m[f"sparsity:{s}"] = acc
        for s, v in sw["channel_sparsity"].items():
            m[f"channels:{s}"] = v["accuracy"]
        for b, acc in sw["bits"].items():
            m[f"W{b}"] = acc
        for name, acc in sw["act_bits"].items():
            m[name] = acc
    if tr:
        m["epoch_seconds"] = tr["epoch_seconds_median"]
    for kind in ("fp32", "int8"):
        part = ox.get(kind) or {}
        if "bench" in part:
            for b, lat in part["bench"]["latency"].items():
                m[f"ort:{kind}:ms:b{b}"] = lat["p50_ms"]
            m[f"ort:{kind}:accuracy"] = part["accuracy"]
            m[f"ort:{kind}:mb"] = part["size_bytes"] / 1e6
    return m


def _stats(values: Sequence[float]) -> dict[str, float]:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def summarize(records: Sequence[dict[str, Any]], config: StudyConfig) -> dict[str, Any]:
    """Per model and method: mean/std/n of every metric over seeds, and paired gains over Adam.

    Gains are paired by seed (each method and Adam share the initial weights
    and the data order), so the spread is that of the per-seed differences.
    """
    out: dict[str, Any] = {}
    for model in config.models:
        per_method: dict[str, dict[int, dict[str, float]]] = {}
        for rec in records:
            if rec["model"] == model:
                per_method.setdefault(rec["method"], {})[rec["seed"]] = metrics_of(rec)
        adam = per_method.get("adam", {})
        metrics, gains, groups = {}, {}, {}
        for method, by_seed in per_method.items():
            names = sorted({k for m in by_seed.values() for k in m})
            metrics[method] = {k: _stats([m.get(k) for m in by_seed.values()]) for k in names}
            rel_time = [by_seed[s]["epoch_seconds"] / adam[s]["epoch_seconds"] for s in by_seed
                        if s in adam and "epoch_seconds" in by_seed[s] and "epoch_seconds" in adam[s]]
            metrics[method]["epoch_time_vs_adam"] = _stats(rel_time)
            if method == "adam":
                continue
            acc_keys = [k for k in names if _is_accuracy(k)]
            gains[method] = {k: _stats([by_seed[s][k] - adam[s][k] for s in by_seed
                                        if s in adam and k in by_seed[s] and k in adam[s]]) for k in acc_keys}
            groups[method] = {g: _stats(_group_gain(by_seed, adam, keys)) for g, keys in _groups(acc_keys).items()}
        out[model] = {"metrics": metrics, "gains_over_adam": gains, "group_gains_over_adam": groups}
    return out


def _is_accuracy(key: str) -> bool:
    return key == "float" or key.startswith(("sparsity:", "channels:", "W", "ort:")) and (
        not key.startswith("ort:") or key.endswith(":accuracy"))


def _groups(keys: Sequence[str]) -> dict[str, list[str]]:
    """The settings averaged in the verdict: unstructured pruning, channel pruning, low-bit quantization."""
    return {
        "unstructured pruning": [k for k in keys if k.startswith("sparsity:")],
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


# -- schema ----------------------------------------------------------------------------


def validate_results(results: dict[str, Any]) -> None:
    """Raise :class:`SntfxError` if ``results`` does not follow the published schema."""
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(results), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.path) or "(top level)"
        raise SntfxError(f"study results do not match the schema at {where}: {first.message}")
