"""``sntfx study``: the SNT experiment end to end, in one resumable command.

For every model, method and seed the study

1. builds the model with ``torch.manual_seed(seed)`` (so every method starts
   from the same initial weights; SNT methods expand that same model, by
   default preserving its function exactly) and trains it with the same data
   order (the sampler and the augmentation are seeded by ``seed`` alone);
2. folds SNT models back into the original architecture and measures the
   fold error on held-out images (the validation split when there is one);
3. measures float accuracy, sharpness (top Hessian eigenvalue, Hessian trace,
   SAM sharpness) and a 1-D loss landscape on the same fixed training
   batches, and the folded weights' distribution (kurtosis, crest factor);
4. sweeps compression without fine-tuning (:func:`sntfx.compress.sweep`):
   global magnitude pruning, activation-aware (Wanda) pruning and N:M with
   BatchNorm re-estimation, structured channel pruning, simulated weight
   quantization W8..W3 and W8A8/W6A6/W4A8/W4A4;
5. exports the float model and a static int8 (QDQ) model to ONNX, verifies
   both against torch and benchmarks them on ONNX Runtime (latency, size,
   accuracy).

With ``val_images`` the training split loses that many images to a
validation split, training reports its curve on it, and ``evaluate_on``
says which split steps 3-5 measure: ``val`` for every choice, ``test`` once
for the chosen configurations (switching keeps the trained runs). With
``seal_test`` a validation study also measures the test split, into files
its report never reads (``STAGE.json``, beside ``STAGE.val.json``); running
the same folder with ``evaluate_on = "test"`` then only collects them, so
the test split is read once even where trained weights do not outlive the
machine that made them.

Every stage of every run writes its result as JSON under
``OUT/runs/MODEL/METHOD/seedN/`` (training keeps a checkpoint as it goes), so
an interrupted study continues where it stopped; a run whose measurements
are all stored is complete without its weights (``model.pt``), so a results
folder can be kept without them. Processes started with the
same command on the same folder share it run by run (a lock file per run;
the last to finish writes the report). Under ``torchrun`` every
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
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import SntfxError
from ..graph_utils import count_parameters
from ..io import atomic_write, try_lock
from .config import Method, StudyConfig, slug
from .report import write_report
from .stats import SCHEMA_VERSION, summarize, validate_results

__all__ = ["Run", "Study", "StudyProgress", "environment"]

log = logging.getLogger(__name__)

STAGES = ("train", "evaluate", "sweep", "onnx")
LOCK = ".lock"  # in a run's folder: held by the process computing that run (several may share a study folder)
SPLIT_KEYS = ("val_images", "evaluate_on")
TRAIN_KEYS = ("data", "data_dir", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "rho", "ratio",
              "limit_batches", "val_images", "budget", "memory_budget")
STAGE_KEYS = {
    "evaluate": ("rho", "sharpness_batches", "sharpness_batch_size", "sharpness_iters", "trace_samples",
                 "landscape_steps", *SPLIT_KEYS),
    "sweep": ("sparsities", "channel_sparsities", "bits", "act_bits", "eval_images", "wanda_sparsities",
              "nm_patterns", "mse_bits", "recalibrate_bn", "exclude", *SPLIT_KEYS),
    "onnx": ("bench_batch_sizes", "bench_iters", "provider", "eval_images", "act_bits", "exclude", *SPLIT_KEYS),
}
# Settings added after studies were first written, and the value that means what those studies did: left out of a
# run's recorded settings at that value, so that a study written before them still resumes.
ABSENT = {"val_images": 0, "evaluate_on": "test", "exclude": [], "budget": None, "memory_budget": None,
          "mse_bits": []}


# What a stage computes, when it grows: a stored result of an older version is redone on resume.
STAGE_VERSION = {"evaluate": 2,  # 2: weight statistics (kurtosis, crest factor, zeros at W4)
                 "sweep": 2,  # 2: W/A settings with the quantize pass's qdq placement (BatchNorms folded first)
                 "onnx": 2}  # 2: int8 = the simulated W8A8 model as QDQ; every W/A setting deployed on ORT


def _recorded(config: dict[str, Any], keys) -> dict[str, Any]:
    return {k: config[k] for k in keys if not (k in ABSENT and config[k] == ABSENT[k])}

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
        self.held: list[Run] = []  # after run(): the runs other processes were still computing (no report yet)
        self._split: str | None = None  # the split the measurement stages read now (seal_test: test, after val)

    # -- plan ------------------------------------------------------------------------
    def runs(self) -> list[Run]:
        c = self.config
        return [Run(model, method, seed, self.out / "runs" / slug(model) / slug(method.name) / f"seed{seed}")
                for model in c.models for method in c.method_objects for seed in c.seeds]

    def _schedule(self, runs: list[Run]) -> list[tuple[int, Run]]:
        """The order runs are computed in (with their index in ``runs``): per model, seed by seed, every method of
        a seed before the next seed. A study stopped part-way then holds complete paired comparisons over the seeds
        it reached, not every seed of the first methods and none of the last."""
        c = self.config
        return sorted(enumerate(runs), key=lambda ir: (c.models.index(ir[1].model), c.seeds.index(ir[1].seed), ir[0]))

    def run_config(self, run: Run) -> dict[str, Any]:
        """The settings a run's training depends on (a resumed study must match them)."""
        c = self.config.to_dict()
        return {"model": run.model, "method": run.method.to_dict(), "seed": run.seed,
                "study": _recorded(c, TRAIN_KEYS)}

    @property
    def splits(self) -> list[str]:
        """The splits the measurement stages run on: ``evaluate_on``, and the sealed test split with ``seal_test``."""
        return [self.config.evaluate_on] + (["test"] if self.config.seal_test else [])

    @property
    def split(self) -> str:
        """The split the measurement stages read now."""
        return self._split or self.config.evaluate_on

    @contextmanager
    def _measuring(self, split: str | None):
        previous, self._split = self._split, split
        try:
            yield
        finally:
            self._split = previous

    def result_path(self, run: Run, stage: str, split: str | None = None) -> Path:
        """Where a stage's result is stored: ``train.json``; a measurement's as ``STAGE.json`` for the test split
        and ``STAGE.val.json`` for the validation split, so that both can sit in one run's folder."""
        split = split or self.split
        return run.path / (f"{stage}.json" if stage == "train" or split == "test" else f"{stage}.{split}.json")

    def stage_settings(self, stage: str, split: str | None = None) -> dict[str, Any]:
        """The settings a stage's result depends on beyond training; a change redoes that stage only."""
        c = self.config.to_dict()
        c["evaluate_on"] = split or self.split
        settings = _recorded(c, STAGE_KEYS.get(stage, ()))
        if stage in STAGE_VERSION:
            settings["stage_version"] = STAGE_VERSION[stage]
        return settings

    def train_config(self, run: Run):
        from ..train import TrainConfig

        c = self.config
        return TrainConfig(epochs=c.epochs, batch_size=c.batch_size, optimizer="sam" if run.method.sam else c.optimizer,
                           sam_base=c.optimizer, lr=c.lr, weight_decay=c.weight_decay, rho=c.rho, seed=run.seed,
                           limit_batches=c.limit_batches, device=c.device, online_fold=True,
                           num_workers=c.num_workers)

    @property
    def eval_device(self) -> torch.device:
        """Where the evaluation stages compute (accuracies, Hessian, landscape): the training device."""
        from ..train import resolve_device

        return resolve_device(self.config.device)

    @property
    def data(self):
        """The dataset, with ``val_images`` training images held out as ``data.val`` (the same for every run)."""
        if self._data is None:
            from ..data import hold_out, load_data

            data = load_data(self.config.data, data_dir=self.config.data_dir, seed=0)
            self._data = hold_out(data, self.config.val_images) if self.config.val_images else data
        return self._data

    @property
    def eval_data(self):
        """The data the measurement stages read: its ``test`` is the split they measure (``evaluate_on``, or the
        sealed test split)."""
        return self.data.evaluated_on(self.split)

    @property
    def curve_data(self):
        """What training reports its per-epoch accuracy on: the validation split when there is one, never the
        test split it would otherwise read before any choice is made."""
        d = self.data
        return d if d.val is None else d.evaluated_on("val")

    def _steps_per_epoch(self) -> int:
        n = len(self.data.train) // self.config.batch_size
        return max(1, min(n, self.config.limit_batches or n))

    def _done(self, run: Run, stage: str, split: str | None = None) -> bool:
        """Whether ``stage`` of ``run`` has a stored result with the current settings (resume keeps it).

        Training counts as done only while its model is there for what is left to measure: a folder whose
        trained weights were not kept (a results folder committed without them) keeps its finished runs, and
        trains again the runs it has not measured yet.
        """
        path = self.result_path(run, stage, split)
        if not path.exists() or json.loads(path.read_text()).get("settings", {}) != self.stage_settings(stage, split):
            return False
        if stage != "train" or (run.path / "model.pt").exists():
            return True
        return all(self._done(run, st, sp) for st in self.measurement_stages for sp in self.splits)

    @property
    def measurement_stages(self) -> list[str]:
        return [st for st in STAGES[1:] if st != "onnx" or self.config.onnx]

    def measure_step_costs(self, runs: list[Run]) -> dict[tuple[str, str], float]:
        """Each method's training-step time relative to Adam's, measured on every model that still trains.

        A few steps of each, on one training batch, on the training device, as
        the trainer runs them (optimizer, online fold): the time-left estimate
        then follows this model and machine rather than the styles' declared
        ResNet-20 figures. Returns ``{(model, method): ratio}``.
        """
        from ..train import Trainer

        todo = [r for r in runs if not self._done(r, "train")]
        costs: dict[tuple[str, str], float] = {}
        device = self.eval_device
        for model in dict.fromkeys(r.model for r in todo):
            need = {r.method.name: r for r in todo if r.model == model and r.method.name != "adam"}
            if not need:
                continue
            adam = next(r for r in runs if r.model == model and r.method.name == "adam")
            n = min(self.config.batch_size, len(self.data.train))
            items = [self.data.train[i] for i in range(n)]
            x = torch.stack([item[0] for item in items]).to(device)
            y = torch.as_tensor([int(item[1]) for item in items]).to(device)
            seconds = {name: Trainer(self.train_config(run)).step_seconds(self._build(run), x, y)
                       for name, run in {"adam": adam, **need}.items()}
            for name in need:
                costs[(model, name)] = seconds[name] / seconds["adam"]
                log.info("%s: a %s training step costs %.2fx Adam's (measured)", model, name, costs[(model, name)])
        return costs

    def _weights(self, run: Run, measured: dict[tuple[str, str], float] | None = None) -> dict[str, float]:
        """Work per stage in Adam-step units, for the time-left estimate (``measured`` step costs where given)."""
        c = self.config
        steps = self._steps_per_epoch() * c.epochs
        n_split = len(self.eval_data.test)
        n_eval = min(n_split, c.eval_images or n_split)
        eval_steps = n_eval / c.batch_size / 3  # a forward pass is about a third of a training step
        cost = (measured or {}).get((run.model, run.method.name), run.method.step_cost)
        splits = len(self.splits)
        return {"train": steps * cost,
                "evaluate": splits * (eval_steps + c.sharpness_batches * (2 * c.sharpness_iters + 2 * c.trace_samples
                                                                         + c.landscape_steps / 3)),
                "sweep": splits * c.sweep_settings * eval_steps * 1.5,
                "onnx": splits * (2 * eval_steps + 20) if c.onnx else 0.0}

    # -- run -------------------------------------------------------------------------
    def check(self) -> None:
        """Fail early, before anything is written: the data loads and every model takes it."""
        from ..workflow import model_for_data

        info = self.data.info
        for model in self.config.models:
            model_for_data(model, info, trust_source=self.trust_source)
        for run in self.runs():
            self._check_run_dir(run, create=False)

    def run(self) -> dict[str, Any] | None:
        """Run (or resume) every stage of every run, then write the report; returns ``results.json``'s content.

        Several processes may run the same study in the same folder at once
        (the same command, started more than once): each computes the runs no
        other one holds, and the last to finish writes the report. The others
        return None, with the runs still being computed elsewhere in ``held``.
        """
        from ..train import distributed_session

        with distributed_session(self.config.device) as (rank, world, _):  # under torchrun: join the group, then leave
            return self._run(rank, world)

    def _run(self, rank: int, world: int) -> dict[str, Any] | None:
        runs = self.runs()
        _ = self.data  # a missing dataset fails here, before anything is written
        if rank == 0 and world == 1:
            self._check_sharers(runs)
        if rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "runs").mkdir(exist_ok=True)
            atomic_write(self.out / "study.json", lambda tmp: tmp.write_text(json.dumps(
                {"format": "sntfx-study", "config": self.config.to_dict()}, indent=1)))
        for run in runs:
            self._check_run_dir(run, create=rank == 0)
        measured = self.measure_step_costs(runs) if rank == 0 else {}
        weights = {run: self._weights(run, measured) for run in runs}
        self.progress.begin(sum(sum(w.values()) for w in weights.values()), len(runs))
        stages = self.measurement_stages
        todo = self._schedule(runs)
        while todo:
            # One process measures each run as soon as it is trained, so a run is complete (and can be kept
            # without its weights) before the next one starts. Under torchrun every rank trains each run
            # (phase 1) and rank 0 alone measures them after (phase 2). A run that another process sharing this
            # folder is computing is skipped, and tried again after.
            held: list[tuple[int, Run]] = []
            phases = [["train", *stages]] if world == 1 else [["train"], stages if rank == 0 else []]
            for phase in phases:
                for i, run in todo:
                    if (i, run) in held:
                        continue
                    with self._claim(run, world) as mine:
                        if not mine:
                            log.info("%s: another process is computing it; going on with the next run", run.label)
                            held.append((i, run))
                            continue
                        for stage in phase:
                            splits = [None] if stage == "train" else self.splits  # measurements: once per split
                            for split in splits:
                                with self._measuring(split):
                                    self._stage(i, run, stage, weights[run][stage] / len(splits),
                                                getattr(self, f"_{stage}"))
            if rank != 0:
                return {}
            if held and not any(self._claimable(run) for _, run in held):
                self.held = [run for _, run in held]  # still at work elsewhere: the last process to finish reports
                return None
            todo = held  # some were let go meanwhile: another pass over all of them
        results = self.collect(runs)
        validate_results(results)
        atomic_write(self.out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
        write_report(results, self.out)
        return results

    def train_run(self, run: Run) -> dict[str, Any]:
        """Train ``run`` alone (resuming its checkpoint), without its measurement stages; returns ``train.json``.

        The study's own train stage: the same data, seed, trainer, fold check
        and files as ``run()`` gives it, for tools that need a run's training
        and not its measurements (``benchmarks/bench_study_epoch.py`` times the
        study's epochs this way). A run already trained is not trained again.
        Another process computing the same run makes this fail rather than wait.
        """
        runs = self.runs()
        if run not in runs:
            raise SntfxError(f"{run.label} is not a run of this study; pick one of study.runs()")
        self._check_run_dir(run, create=True)
        with self._claim(run, 1) as mine:
            if not mine:
                raise SntfxError(f"{run.label}: another process is computing this run; wait for it to finish")
            self._stage(runs.index(run), run, "train", 1.0, self._train)
        return json.loads(self.result_path(run, "train").read_text())

    def _check_sharers(self, runs: list[Run]) -> None:
        """Refuse to join processes at work on this folder with other measurement settings: each would redo the
        other's stages over and over.

        Training settings are checked per run already (``config.json``), and
        models, methods and seeds may differ (processes share the runs they
        have in common); the device and data-loader workers may differ too.
        """
        path = self.out / "study.json"
        if not path.is_file():
            return
        keys = sorted({k for stage_keys in STAGE_KEYS.values() for k in stage_keys})
        stored = json.loads(path.read_text()).get("config")
        if not stored:
            return
        diff = _diff(_recorded({k: stored.get(k, ABSENT.get(k)) for k in keys}, keys),
                     _recorded(self.config.to_dict(), keys))
        if diff and any(r.path.is_dir() and not self._claimable(r) for r in runs):
            raise SntfxError(f"another process is running the study in '{self.out}' with other settings ({diff}); "
                             "start it with the same command to share the work, or use another --out folder")

    def _claim(self, run: Run, world: int):
        """Hold ``run``'s lock while computing its stages (yields whether this process holds it).

        Processes started with the same command on the same folder share the
        study this way, run by run. Under torchrun every rank computes each
        run together, so nothing is locked there.
        """
        return try_lock(run.path / LOCK) if world == 1 else nullcontext(True)

    def _claimable(self, run: Run) -> bool:
        with try_lock(run.path / LOCK) as free:
            return free

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
            if create:
                for stage in self.measurement_stages:
                    self._migrate(run, stage)
        elif create:
            run.path.mkdir(parents=True, exist_ok=True)
            atomic_write(cfg_path, lambda tmp: tmp.write_text(json.dumps(expected, indent=1, sort_keys=True)))

    def _stage(self, index: int, run: Run, stage: str, weight: float, fn: Callable[[Run, Callable], dict]) -> None:
        path = self.result_path(run, stage)
        self.progress.stage(index, run.label, stage if stage == "train" or self.split == self.config.evaluate_on
                            else f"{stage} (sealed {self.split})")
        settings = self.stage_settings(stage)
        if self._done(run, stage):
            self.progress.advance(weight)
            return
        if stage == "train" and path.exists() and not (run.path / "model.pt").exists():
            log.info("%s: its trained weights are not here and some measurements are missing; training it again",
                     run.label)
        elif path.exists():
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

    def _migrate(self, run: Run, stage: str) -> None:
        """Move a validation result that an older sntfx stored as ``STAGE.json`` to ``STAGE.val.json`` (once per
        run, when a process starts on the folder)."""
        old, new = run.path / f"{stage}.json", self.result_path(run, stage, "val")
        try:
            recorded = json.loads(old.read_text()).get("settings", {})
        except FileNotFoundError:
            return
        if recorded.get("evaluate_on") == "val" and not new.exists():
            try:
                os.replace(old, new)
            except FileNotFoundError:  # another process sharing the folder moved it first
                pass

    # -- stages ----------------------------------------------------------------------
    def _build(self, run: Run):
        import sntfx

        from ..workflow import model_for_data

        torch.manual_seed(run.seed)
        gm = model_for_data(run.model, self.data.info, trust_source=self.trust_source)
        if run.method.snt:
            x = torch.zeros(self.data.info.input_shape(2))
            gm = sntfx.transform(gm, x, style=run.method.style, ratio=run.method.ratio or self.config.ratio,
                                 budget=self.config.budget, memory_budget=self.config.memory_budget,
                                 batch_size=self.config.batch_size,
                                 preserve=run.method.init == "preserve", seed=run.seed, inplace=True)
        return gm

    def _train(self, run: Run, tick: Callable[[float], None]) -> dict | None:
        import sntfx

        from ..train import Trainer, _dist_info
        from ..tracing import compare_outputs

        gm = self._build(run)
        expanded_params = count_parameters(gm)
        data = self.curve_data
        if hasattr(data.train, "seed"):
            data.train.seed = run.seed  # augmentation follows the run's seed, like the sampler
        split = "validation" if data.val is not None else "test"
        trainer = Trainer(self.train_config(run), _TrainTicker(tick, self.config.epochs, split))
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
                # the split the history's per-epoch "test_accuracy" was read on: validation where one is held out
                "curve_split": split,
                "params_trained": expanded_params, "params_deployed": count_parameters(gm),
                "fold": fold}

    def _load(self, run: Run):
        from ..models import ModelSpec
        from ..serialization import load
        from ..workflow import is_model_file

        # The study's own command names run.model: a stored file that rebuilds from that same source is trusted;
        # any other source goes through sntfx.load's usual trust rule (signed here, or --trust-source).
        named = None if is_model_file(run.model) else ModelSpec.parse(run.model)

        def named_by_command(stored: ModelSpec) -> bool:
            return self.trust_source or named is not None and (stored.kind, stored.name, stored.entry) == (
                named.kind, named.name, named.entry)

        gm = load(run.path / "model.pt", trust_source=named_by_command)
        gm.eval()
        return gm

    def _eval_batches(self) -> int | None:
        return None if self.config.eval_images is None else max(1, math.ceil(self.config.eval_images / 256))

    def _sharpness_batches(self):
        from ..data import fixed_batches

        c = self.config
        return fixed_batches(self.data.train, batches=c.sharpness_batches, batch_size=c.sharpness_batch_size, seed=0)

    def _evaluate(self, run: Run, tick) -> dict:
        from ..compress import accuracy
        from ..sharpness import batch_loss_fn, landscape, measure
        from ..weight_stats import weight_statistics

        c = self.config
        gm = self._load(run)
        acc = accuracy(gm, self.eval_data, device=self.eval_device, num_workers=c.num_workers)
        tick(0.1)
        batches = self._sharpness_batches()
        gm.to(self.eval_device)  # the batches follow the model (sharpness.batch_loss_fn)
        sharp = measure(gm, batches, rho=c.rho, iters=c.sharpness_iters, trace_samples=c.trace_samples, seed=0)
        tick(0.8)
        curve = landscape(gm, batch_loss_fn(gm, batches[:2]), steps=c.landscape_steps, span=1.0, seed=0)
        gm.to("cpu")
        return {"float_accuracy": acc, "test_images": len(self.eval_data.test), "split": self.split,
                "sharpness": sharp, "landscape": curve, "weights": weight_statistics(gm)}

    def _sweep(self, run: Run, tick) -> dict:
        from ..compress import sweep

        c = self.config
        gm = self._load(run)
        n = c.sweep_settings
        result = sweep(gm, self.eval_data, sparsities=c.sparsities, channel_sparsities=c.channel_sparsities,
                       bits=c.bits, wanda_sparsities=c.wanda_sparsities, nm_patterns=c.nm_patterns, mse_bits=c.mse_bits,
                       recalibrate_bn=c.recalibrate_bn,
                       act_bits=[tuple(p) for p in c.act_bits], limit=self._eval_batches(), exclude=c.exclude,
                       device=self.eval_device, num_workers=c.num_workers,
                       progress=lambda label: tick(1.0 / n))
        result["test_images"] = min(len(self.eval_data.test), 256 * (self._eval_batches() or 10**9))
        result["split"] = self.split
        return result

    def _onnx(self, run: Run, tick) -> dict:
        from torch.utils.data import DataLoader, Subset

        from ..exporters import bench_onnx, export_int8, export_onnx, onnx_accuracy
        from ..train import evaluate

        c = self.config
        gm = self._load(run)
        data = self.eval_data
        verify = (torch.stack([data.test[i][0] for i in range(min(64, len(data.test)))]),)
        fp32 = run.path / "model.onnx"
        report = export_onnx(gm, fp32, (torch.zeros(data.info.input_shape(1)),), dynamic_batch=True,
                             verify_inputs=verify)
        tick(0.2)
        out: dict[str, Any] = {"fp32": {"export": report.to_dict()}}
        int8 = run.path / "model.int8.onnx"
        provider = c.provider  # auto: the hardware present (exporters.resolve_providers), as in `sntfx bench`
        out["deployed"] = {}
        settings = [tuple(p) for p in c.act_bits]
        for wb, ab in [(8, 8)] + [p for p in settings if p != (8, 8)]:
            # Each W/A setting of the sweep, deployed: the same quantize pass, exported as QDQ, run on ORT.
            key, path = f"W{wb}A{ab}", int8 if (wb, ab) == (8, 8) else run.path / f"model.w{wb}a{ab}.onnx"
            try:
                info = export_int8(gm, path, data, verify, wbits=wb, abits=ab, exclude=tuple(c.exclude))
            except Exception as exc:  # noqa: BLE001 - a failed deployment is a result, not a crash
                log.warning("%s: %s deployment failed: %s", run.label, key, exc)
                if (wb, ab) == (8, 8):
                    out["int8"] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            if (wb, ab) == (8, 8):
                out["int8"] = {"verification": info["verification"], "integer_ops": info["integer_ops"],
                               "qdq_weights": info["qdq_weights"]}
            if (wb, ab) in settings:
                n = len(data.test) if c.eval_images is None else min(c.eval_images, len(data.test))
                subset = Subset(data.test, range(n))
                out["deployed"][key] = {
                    "simulated": evaluate(info["model"].to(self.eval_device), DataLoader(subset, batch_size=256),
                                          self.eval_device)["accuracy"],
                    "onnxruntime": onnx_accuracy(path, subset, provider=provider), "images": n,
                    "integer_ops": info["integer_ops"], "qdq_weights": info["qdq_weights"]}
                if path != int8:
                    path.unlink()
        tick(0.3)
        limit = c.eval_images
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
        from .. import __version__

        records = []
        for run in runs:
            rec: dict[str, Any] = {"model": run.model, "method": run.method.name, "seed": run.seed,
                                   "path": str(run.path.relative_to(self.out))}
            for stage in STAGES:
                p = self.result_path(run, stage, self.config.evaluate_on)
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
                        "test_images": len(self.data.test), "val_images": 0 if self.data.val is None else len(self.data.val),
                        "evaluated_on": self.config.evaluate_on},
            "environment": environment(),
            "runs": records,
            "summary": summarize(records, self.config),
        }


class _TrainTicker:
    """Trainer callback that turns steps into study progress."""

    def __init__(self, tick: Callable[[float], None], epochs: int, split: str = "test"):
        self.tick, self.epochs, self.steps, self.split = tick, epochs, 1, split

    def on_epoch_start(self, epoch, steps):
        self.steps = max(steps, 1)

    def on_step(self, epoch, step, loss, samples_per_s):
        self.tick(1.0 / (self.steps * self.epochs))

    def on_epoch_end(self, record):
        log.info("epoch %d: loss %.4f, %s accuracy %.4f", record["epoch"], record["train_loss"], self.split,
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
