"""Training: Adam / SGD / SAM, for plain and SNT-expanded models, on one process or many.

``Trainer(config).fit(model, data, out)`` trains, writes a checkpoint
atomically every epoch (and every ``checkpoint_every`` steps), evaluates on
the test set every epoch, and returns a :class:`TrainResult`. With
``resume=True`` it continues from the checkpoint beside ``out``.

Determinism. The data order of epoch ``e`` is a permutation seeded by
``(seed, e)``; augmentation is seeded per sample; the global RNG is reseeded
at every step from ``(seed, step, rank)``. A run killed at any point and
resumed from its last checkpoint therefore ends with the same weights as an
uninterrupted run (on the CPU with ``deterministic=True``).

Distributed. Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
DistributedDataParallel (gloo on CPU, NCCL on GPU); every global batch of
``batch_size`` samples is split evenly across ranks, so a run on N processes
computes the same gradients as one process with the same global batch
(BatchNorm batch statistics aside: they are per rank unless ``sync_bn``).
Rank 0 alone logs, evaluates and writes files. On a GPU each process is
bound to the GPU of its ``LOCAL_RANK`` (:func:`resolve_device`). A resumed
run reads the checkpoint on rank 0 only and broadcasts it, so every rank
starts from the same state even without a shared file system. The process
group is destroyed when training ends or fails if sntfx created it
(:func:`distributed_session`, :func:`shutdown_distributed`); a group the
caller initialised is left alone.

SNT. Blocks whose style trains online (the style registry says which; today
``linear``) train with the online fold by default: the block composes its
effective kernel and runs one convolution per step (same outputs and
gradients as the explicit chain).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler

from .blocks import SNTBlock
from .data import Data
from .errors import SntfxError
from .graph_utils import mode
from .io import atomic_torch_save, atomic_write
from .sam import SAM

__all__ = ["TrainConfig", "TrainResult", "Trainer", "TrainCallback", "evaluate", "checkpoint_path", "metrics_path",
           "init_distributed", "shutdown_distributed", "distributed_session", "resolve_device"]

log = logging.getLogger(__name__)

BASE_OPTIMIZERS = ("adam", "adamw", "sgd")  # what SAM can wrap; adamw: decoupled weight decay (timm's default)
OPTIMIZERS = (*BASE_OPTIMIZERS, "sam")
SCHEDULES = ("cosine", "step", "constant")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored with the result)."""

    epochs: int = 10
    batch_size: int = 128  # global batch, split across ranks
    optimizer: str = "adam"  # adam | adamw | sgd | sam
    sam_base: str = "adam"  # the optimizer SAM wraps: adam | adamw | sgd
    lr: float | None = None  # default: 1e-3 for adam and adamw, 0.1 for sgd
    momentum: float = 0.9
    weight_decay: float = 0.0
    rho: float = 0.05
    adaptive: bool = False
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    step_milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of training, for schedule=step
    label_smoothing: float = 0.0
    seed: int = 0
    amp: bool = False  # bf16 autocast
    online_fold: bool = True
    checkpoint_every: int = 0  # steps; 0: at the end of each epoch only
    limit_batches: int | None = None  # per epoch, for quick runs
    eval_batches: int | None = None
    deterministic: bool = False
    sync_bn: bool = False
    num_workers: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise SntfxError(f"unknown optimizer '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}")
        if self.sam_base not in BASE_OPTIMIZERS:
            raise SntfxError(f"SAM wraps {', '.join(BASE_OPTIMIZERS)}, not '{self.sam_base}'")
        if self.schedule not in SCHEDULES:
            raise SntfxError(f"unknown schedule '{self.schedule}'; choose one of {', '.join(SCHEDULES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise SntfxError("epochs and batch size must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise SntfxError(f"learning rate must be positive, got {self.lr}")
        self.step_milestones = tuple(self.step_milestones)

    @property
    def base_optimizer(self) -> str:
        return self.sam_base if self.optimizer == "sam" else self.optimizer

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (0.1 if self.base_optimizer == "sgd" else 1e-3)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["step_milestones"] = list(self.step_milestones)
        d["lr"] = self.learning_rate
        return d


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    rank: int = 0  # this process's rank in the run (0 when not distributed); only rank 0 should write files
    world_size: int = 1

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


class TrainCallback(Protocol):
    """Progress hooks; the CLI draws its progress bar with them."""

    def on_epoch_start(self, epoch: int, steps: int) -> None: ...

    def on_step(self, epoch: int, step: int, loss: float, samples_per_s: float) -> None: ...

    def on_epoch_end(self, record: dict[str, Any]) -> None: ...


class _Silent:
    def on_epoch_start(self, epoch, steps):
        pass

    def on_step(self, epoch, step, loss, samples_per_s):
        pass

    def on_epoch_end(self, record):
        pass


def checkpoint_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def metrics_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".metrics.jsonl")


class _EpochSampler(Sampler):
    """This rank's share of each global batch of a seeded per-epoch permutation."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int, world: int, limit: int | None):
        if global_batch % world:
            raise SntfxError(f"batch size {global_batch} is not divisible by the {world} processes")
        self.n, self.global_batch, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self.steps = n // global_batch if n >= global_batch else 1
        if limit:
            self.steps = min(self.steps, limit)
        self.epoch, self.start = 0, 0

    def set(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch)))
        local = self.global_batch // self.world
        for step in range(self.start, self.steps):
            batch = perm[step * self.global_batch:(step + 1) * self.global_batch]
            yield batch[self.rank * local:(self.rank + 1) * local].tolist()

    def __len__(self) -> int:
        return self.steps - self.start


def _mix(*values: int) -> int:
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFF)) * 1099511628211) & 0x7FFF_FFFF_FFFF_FFFF
    return h


def _dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process; (0, 1, 0) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


_OWNED_GROUP = False  # True while the default process group is one init_distributed created
_GENERATION = 0  # process groups init_distributed has created in this process (the same count on every rank)


def init_distributed(device: str) -> bool:
    """Initialise the process group when launched by torchrun; True if distributed.

    Does nothing (and returns whether a group exists) when ``WORLD_SIZE`` is 1
    or the caller already initialised one. A group created here is remembered:
    :func:`shutdown_distributed` destroys it, and only it.
    """
    global _OWNED_GROUP
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _initialized():
        return _initialized()
    if not dist.is_available():
        raise SntfxError("this PyTorch build has no torch.distributed; run on one process (without torchrun)")
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        # NCCL must see each process on its own GPU before the group forms.
        torch.cuda.set_device(dev.index if dev.index is not None else int(os.environ.get("LOCAL_RANK", 0)))
    # torchrun's rendezvous (env://), with the keys of each group sntfx creates under their own prefix: a group
    # created again after shutdown_distributed (a second Trainer.fit in the same job) must not find the
    # addresses the destroyed group left in the store, or the ranks can wait forever on sockets long closed.
    global _GENERATION
    store, rank, world = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"sntfx/{_GENERATION}", store)
    _GENERATION += 1
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
    _OWNED_GROUP = True
    return True


def shutdown_distributed() -> bool:
    """Destroy the default process group if :func:`init_distributed` created it; True if it did.

    A group the caller initialised itself is left alone. Safe to call twice,
    or without any group.
    """
    global _OWNED_GROUP
    owned, _OWNED_GROUP = _OWNED_GROUP, False
    if owned and _initialized():
        dist.destroy_process_group()
        return True
    return False


@contextmanager
def distributed_session(device: str = "auto") -> Iterator[tuple[int, int, int]]:
    """Join the torchrun process group for the duration of a ``with`` block; yields (rank, world, local rank).

    Resolves ``device`` first (binding each process to the GPU of its
    ``LOCAL_RANK``), initialises the group if this block is the one that
    creates it, and destroys that group on the way out, also on an error.
    Without torchrun it is a no-op yielding ``(0, 1, 0)``. Use it around
    ``Trainer.fit`` and whatever must know the rank afterwards (who saves)::

        with distributed_session(config.device) as (rank, world, _):
            result = Trainer(config).fit(model, data, out)
            if rank == 0:
                sntfx.save(model, out)
    """
    created = not _initialized() and init_distributed(str(resolve_device(device)))
    try:
        yield _dist_info()
    finally:
        if created:
            shutdown_distributed()


def _world_size_env() -> int:
    if _initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(name: str) -> torch.device:
    """The torch device for a ``--device`` value (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ...).

    Under a multi-process run (torchrun, ``WORLD_SIZE > 1``) a CUDA device is
    always ``cuda:LOCAL_RANK`` and that GPU becomes this process's current
    device (``torch.cuda.set_device``), also for a plain ``cuda``; an explicit
    index other than ``LOCAL_RANK`` is an error (two processes must not share
    a GPU). On one process ``auto`` means ``cuda:LOCAL_RANK`` (``cuda:0``) when
    CUDA is available and any other name is taken as given.
    """
    local = int(os.environ.get("LOCAL_RANK", "0"))
    # torchrun-style multi-process run: LOCAL_RANK says which GPU is this process's (a group initialised by the
    # caller without LOCAL_RANK keeps the old behaviour: the device as given)
    multi = _world_size_env() > 1 and "LOCAL_RANK" in os.environ
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = torch.device("cuda", local)
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError) as exc:
            raise SntfxError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from exc
        if device.type != "cuda":
            return device
        if not torch.cuda.is_available():
            raise SntfxError(f"device '{name}' asked for, but CUDA is not available here; use --device cpu (or auto)")
        if not multi:
            return device
        if device.index is not None and device.index != local:
            raise SntfxError(
                f"device '{name}' conflicts with this process's LOCAL_RANK {local}: under torchrun every process uses "
                f"the GPU of its local rank (cuda:{local} here). Pass --device cuda (or auto), and choose the GPUs "
                "with CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", local)
    if multi:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise SntfxError(
                f"LOCAL_RANK {local} needs cuda:{local}, but this node has only {count} visible GPU"
                f"{'s' if count != 1 else ''}; start at most {count} processes per node (--nproc_per_node)")
        torch.cuda.set_device(device.index)
    return device


def set_online_fold(model: nn.Module, online: bool) -> int:
    """Switch every block whose style trains online to (or from) the online fold; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, SNTBlock) and m.trains_online:
            m.online = online
            n += 1
    return n


@torch.no_grad()
def evaluate(model: nn.Module, data_loader, device, *, limit: int | None = None, amp: bool = False) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy over a loader (eval mode)."""
    correct = total = 0
    loss_sum = 0.0
    with mode(model, training=False):
        for i, (x, y) in enumerate(data_loader):
            if limit is not None and i >= limit:
                break
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(x)
            out = out.float()
            loss_sum += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            total += y.numel()
    return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1), "samples": total}


_FUSED_DEVICES = ("cpu", "cuda")


def _fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether the optimizer can run fused: one kernel per parameter instead of a Python loop of small ops.

    Same update rule (equal to float rounding). It matters for SNT: an
    expanded model has more, and smaller, parameter tensors than the plain
    one, and the unfused CPU optimizer's per-tensor overhead is then a
    visible part of a step (measured on ResNet-20's ``linear`` expansion:
    37 ms unfused vs 6 ms fused per optimizer step on one CPU thread).
    """
    return bool(params) and all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params)


class Trainer:
    """Train a model on a dataset; see the module docstring for the guarantees."""

    def __init__(self, config: TrainConfig, callback: TrainCallback | None = None):
        self.config = config
        self.callback = callback or _Silent()

    # -- pieces ----------------------------------------------------------------
    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer :meth:`fit` trains ``model`` with (fused where every parameter allows; SAM knows the model)."""
        c = self.config
        params = [p for p in model.parameters() if p.requires_grad]
        fused = {"fused": True} if _fused_supported(params) else {}
        if c.base_optimizer == "adam":
            base = torch.optim.Adam(params, lr=c.learning_rate, weight_decay=c.weight_decay, **fused)
        elif c.base_optimizer == "adamw":
            base = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay, **fused)
        else:
            base = torch.optim.SGD(params, lr=c.learning_rate, momentum=c.momentum, weight_decay=c.weight_decay,
                                   nesterov=c.momentum > 0, **fused)
        if c.optimizer == "sam":
            return SAM(params, base, rho=c.rho, adaptive=c.adaptive, model=model)
        return base

    def step_seconds(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 2,
                     warmup: int = 1) -> float:
        """Median seconds of one training step of ``model`` on the batch ``(x, y)``, as :meth:`fit` runs it.

        Same optimizer (SAM's two passes included), online fold on, on
        ``x``'s device; the model's weights change. A quick measurement (a few
        steps): the study's time-left estimate uses it, and
        ``benchmarks/bench_train_step.py`` is the careful one.
        """
        import statistics

        set_online_fold(model, self.config.online_fold)
        model.to(x.device).train()
        opt = self.build_optimizer(model)
        criterion = nn.CrossEntropyLoss()

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            return loss

        sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
        times = []
        for i in range(warmup + steps):
            sync()
            t0 = time.perf_counter()
            opt.step(closure)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def lr_at(self, step: int, total: int, steps_per_epoch: int) -> float:
        c = self.config
        warm = c.warmup_epochs * steps_per_epoch
        if warm and step < warm:
            return c.learning_rate * (step + 1) / warm
        if c.schedule == "constant":
            return c.learning_rate
        progress = (step - warm) / max(total - warm, 1)
        if c.schedule == "cosine":
            return c.learning_rate * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return c.learning_rate * 0.1 ** sum(progress >= m for m in c.step_milestones)

    # -- the loop ----------------------------------------------------------------
    def fit(self, model: nn.Module, data: Data, out: str | Path, *, resume: bool = False) -> TrainResult:
        """Train ``model`` in place on ``data``; files go beside ``out`` (checkpoint, metrics).

        Under torchrun the process group is joined here unless the caller did
        so already; a group created here is destroyed before returning (or on
        an error), so read the rank from ``result.rank``, or wrap the call in
        :func:`distributed_session` to keep the group for what comes after.
        """
        c = self.config
        device = resolve_device(c.device)
        created = not _initialized()
        distributed = init_distributed(str(device))
        created = created and distributed
        try:
            return self._fit(model, data, out, resume, device, distributed)
        finally:
            if created:
                shutdown_distributed()

    def _fit(self, model: nn.Module, data: Data, out: str | Path, resume: bool, device: torch.device,
             distributed: bool) -> TrainResult:
        c = self.config
        rank, world, _ = _dist_info()
        if c.deterministic:
            torch.use_deterministic_algorithms(True)
        online = set_online_fold(model, c.online_fold)
        if online:
            log.info("%d SNT blocks train with the online fold: %s", online, c.online_fold)
        if c.sync_bn and distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(device)
        torch.manual_seed(c.seed)
        sampler = _EpochSampler(len(data.train), c.batch_size, c.seed, rank, world, c.limit_batches)
        pin = device.type == "cuda"  # page-locked host memory: faster, asynchronous copies to the GPU
        loader = DataLoader(data.train, batch_sampler=sampler, num_workers=c.num_workers, pin_memory=pin)
        test_loader = DataLoader(data.test, batch_size=max(c.batch_size // world, 1), shuffle=False,
                                 num_workers=c.num_workers, pin_memory=pin)
        opt = self.build_optimizer(model)
        criterion = nn.CrossEntropyLoss(label_smoothing=c.label_smoothing)
        result = TrainResult(rank=rank, world_size=world)
        start_epoch, start_step = 0, 0
        ckpt = checkpoint_path(out)
        # Rank 0 reads the checkpoint and every rank gets its content from rank 0 (no shared file system needed),
        # before DDP wraps the model: all ranks start from rank 0's weights, optimizer state and position.
        state = self._resume_state(ckpt, rank, distributed) if resume else None
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start_epoch, start_step = state["epoch"], state["step_in_epoch"]
            result.history = state["history"]
            result.seconds = state["seconds"]
            if rank == 0:
                log.info("resuming from %s at epoch %d, step %d", ckpt, start_epoch + 1, start_step)
            else:
                log.debug("rank %d: resuming from rank 0's checkpoint at epoch %d, step %d", rank, start_epoch + 1,
                          start_step)
        elif resume and ckpt.exists():  # rank 0 has none: the whole run starts over, this rank too
            log.warning("rank %d: ignoring %s: rank 0 has no checkpoint to resume from, so every rank starts fresh",
                        rank, ckpt)
        elif rank == 0 and ckpt.exists():
            log.warning("ignoring existing checkpoint %s (pass --resume to continue it)", ckpt)
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" and device.index is not None else None) \
            if distributed else model
        if isinstance(opt, SAM):
            opt.model = ddp  # buffers restored after the perturbed pass; no_sync() for the first backward

        steps_per_epoch, total = sampler.steps, sampler.steps * c.epochs
        for epoch in range(start_epoch, c.epochs):
            if hasattr(data.train, "set_epoch"):
                data.train.set_epoch(epoch)
            sampler.set(epoch, start_step)
            ddp.train()
            self.callback.on_epoch_start(epoch, steps_per_epoch)
            t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
            step = start_step
            for x, y in loader:
                global_step = epoch * steps_per_epoch + step
                torch.manual_seed(_mix(c.seed, global_step, rank))
                for group in opt.param_groups:
                    group["lr"] = self.lr_at(global_step, total, steps_per_epoch)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = None

                def loss_fn():
                    nonlocal logits
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.amp):
                        out_ = ddp(x)
                    if logits is None:
                        logits = out_.detach()
                    return criterion(out_.float(), y)

                def closure():
                    opt.zero_grad(set_to_none=True)
                    loss_ = loss_fn()
                    loss_.backward()
                    return loss_

                loss = opt.step(closure).detach()  # SAM calls the closure twice, at w and at w + e
                if not torch.isfinite(loss):
                    raise SntfxError(f"training diverged at epoch {epoch + 1}, step {step + 1} (loss {loss.item()}); "
                                     "lower the learning rate")
                step += 1
                seen += y.numel()
                loss_sum += loss.item() * y.numel()
                correct += (logits.float().argmax(1) == y).sum().item()
                elapsed = time.perf_counter() - t0
                self.callback.on_step(epoch, step, loss.item(), seen * world / max(elapsed, 1e-9))
                if c.checkpoint_every and step % c.checkpoint_every == 0 and step < steps_per_epoch:
                    self._checkpoint(ckpt, model, opt, epoch, step, result, rank)
            start_step = 0
            epoch_seconds = time.perf_counter() - t0
            record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                      "lr": opt.param_groups[0]["lr"], "seconds": epoch_seconds,
                      "samples_per_s": seen * world / max(epoch_seconds, 1e-9)}
            if rank == 0:
                ev = evaluate(model, test_loader, device, limit=c.eval_batches, amp=c.amp)
                record.update(test_accuracy=ev["accuracy"], test_loss=ev["loss"])
            result.history.append(record)
            result.seconds += epoch_seconds
            self.callback.on_epoch_end(record)
            self._checkpoint(ckpt, model, opt, epoch + 1, 0, result, rank)
            if rank == 0:
                _write_metrics(metrics_path(out), result.history)
        if distributed:
            dist.barrier()
        return result

    def _resume_state(self, ckpt: Path, rank: int, distributed: bool) -> dict | None:
        """The checkpoint to resume from, as rank 0 reads it, on every rank; None to start fresh.

        Rank 0 alone opens the file (a stale file on another rank's disk is
        never read). Its verdict, the state or an error message, is broadcast
        so that all ranks resume, start fresh or fail together.
        """
        payload: tuple[str, Any] | None = None
        error: SntfxError | None = None
        if rank == 0 and ckpt.exists():
            try:
                state = _load_checkpoint(ckpt)
                if state["config"] != _comparable(self.config):
                    raise SntfxError(f"checkpoint '{ckpt}' was written with a different configuration; remove it or "
                                     "train without --resume")
                payload = ("state", state)
            except SntfxError as exc:
                error, payload = exc, ("error", str(exc))
        if distributed:
            box = [payload]
            dist.broadcast_object_list(box, src=0)  # CPU tensors, pickled; NCCL sends them via this rank's GPU
            payload = box[0]
        if error is not None:
            raise error
        if payload is None:
            return None
        kind, value = payload
        if kind == "error":
            raise SntfxError(f"rank 0: {value}")
        return value

    def _checkpoint(self, path: Path, model, opt, epoch: int, step: int, result: TrainResult, rank: int) -> None:
        if rank != 0:
            return
        state = {
            "format": "sntfx-checkpoint",
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(),
            "epoch": epoch,
            "step_in_epoch": step,
            "history": json.dumps(result.history),
            "seconds": result.seconds,
            "config": json.dumps(_comparable(self.config), sort_keys=True),
        }
        atomic_torch_save(state, path)


def _comparable(c: TrainConfig) -> dict:
    """The settings a resumed run must share with the checkpoint."""
    d = c.to_dict()
    for key in ("num_workers", "device", "checkpoint_every"):
        d.pop(key)
    return json.loads(json.dumps(d, sort_keys=True))


def _load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise SntfxError(f"cannot read checkpoint '{path}' ({type(exc).__name__}); remove it to start over") from exc
    if not isinstance(state, dict) or state.get("format") != "sntfx-checkpoint":
        raise SntfxError(f"'{path}' is not an sntfx training checkpoint")
    state["history"] = json.loads(state["history"])
    state["config"] = json.loads(state["config"])
    return state


def _write_metrics(path: Path, history: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in history)
    atomic_write(path, lambda tmp: tmp.write_text(text))
