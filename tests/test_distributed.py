"""Distributed training: GPU binding per local rank, resume without a shared file system, process-group lifetime."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import sntfx.train as train
from sntfx.data import load_data
from sntfx.errors import SntfxError
from sntfx.train import TrainConfig, Trainer, checkpoint_path, distributed_session, resolve_device, shutdown_distributed

REPO = Path(__file__).resolve().parents[1]

# No BatchNorm: with per-rank batch statistics 2 processes would not match 1 process.
MODEL = '''
import torch
from torch import nn

def build_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))

CONFIG = dict(epochs=3, batch_size=32, limit_batches=4, eval_batches=2, lr=3e-3, seed=5, device="cpu")
'''


def _load_model_module(tmp_path: Path):
    """The driver's model module, written into tmp_path and imported from there."""
    import importlib.util

    path = tmp_path / "tinymodel.py"
    path.write_text(MODEL)
    spec = importlib.util.spec_from_file_location("tinymodel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- resolve_device: each process on the GPU of its local rank ---------------------------------------------------


class FakeCuda:
    """Stands in for torch.cuda on a machine without GPUs; records set_device calls."""

    def __init__(self, monkeypatch, count: int = 2, available: bool = True):
        self.calls: list[int] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: self.calls.append(torch.device(d).index
                                                                                   if not isinstance(d, int) else d))


def _torchrun_env(monkeypatch, rank: int, local_rank: int, world: int = 2) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))


@pytest.mark.parametrize("name", ["cuda", "auto", "cuda:1"])
def test_each_torchrun_process_binds_to_the_gpu_of_its_local_rank(monkeypatch, name):
    cuda = FakeCuda(monkeypatch)
    _torchrun_env(monkeypatch, rank=3, local_rank=1, world=4)  # second process of the second node
    assert resolve_device(name) == torch.device("cuda", 1)
    assert cuda.calls == [1]


def test_an_explicit_gpu_other_than_the_local_rank_is_refused(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    _torchrun_env(monkeypatch, rank=1, local_rank=1)
    with pytest.raises(SntfxError, match=r"'cuda:0' conflicts with this process's LOCAL_RANK 1.*--device cuda"):
        resolve_device("cuda:0")
    assert cuda.calls == []


def test_more_processes_than_gpus_is_refused(monkeypatch):
    FakeCuda(monkeypatch, count=2)
    _torchrun_env(monkeypatch, rank=2, local_rank=2, world=3)
    with pytest.raises(SntfxError, match="only 2 visible GPUs.*--nproc_per_node"):
        resolve_device("cuda")


def test_one_process_takes_the_device_as_given(monkeypatch):
    cuda = FakeCuda(monkeypatch, count=4)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")
    assert cuda.calls == []  # the current device of a single process is the caller's business
    _torchrun_env(monkeypatch, rank=0, local_rank=0, world=2)
    assert resolve_device("cpu") == torch.device("cpu")  # gloo on the CPU: nothing to bind
    assert cuda.calls == []


def test_without_cuda(monkeypatch):
    FakeCuda(monkeypatch, count=0, available=False)
    _torchrun_env(monkeypatch, rank=1, local_rank=1)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(SntfxError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(SntfxError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


class FakeGroup:
    """torch.distributed's process-group calls, recorded instead of made."""

    def __init__(self, monkeypatch, initialized: bool = False):
        self.initialized, self.events, self.prefixes = initialized, [], []
        monkeypatch.setattr(dist, "is_initialized", lambda: self.initialized)
        monkeypatch.setattr(dist, "rendezvous", lambda url: iter([("store", int(os.environ["RANK"]),
                                                                    int(os.environ["WORLD_SIZE"]))]))
        monkeypatch.setattr(dist, "PrefixStore", lambda prefix, store: self.prefixes.append(prefix) or prefix)
        monkeypatch.setattr(dist, "init_process_group", self.init)
        monkeypatch.setattr(dist, "destroy_process_group", self.destroy)
        monkeypatch.setattr(dist, "get_rank", lambda: int(os.environ["RANK"]))
        monkeypatch.setattr(dist, "get_world_size", lambda: int(os.environ["WORLD_SIZE"]))
        monkeypatch.setattr(train, "_OWNED_GROUP", False)

    def init(self, backend=None, *, store=None, rank=None, world_size=None):
        assert store == self.prefixes[-1] and (rank, world_size) == (int(os.environ["RANK"]),
                                                                      int(os.environ["WORLD_SIZE"]))
        self.events.append(("init", backend))
        self.initialized = True

    def destroy(self, *args, **kwargs):
        self.events.append(("destroy",))
        self.initialized = False


def test_nccl_group_forms_after_the_gpu_is_bound_and_is_destroyed_by_its_creator(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    group = FakeGroup(monkeypatch)
    cuda.calls = group.events  # one timeline: set_device calls appear as plain ints
    _torchrun_env(monkeypatch, rank=1, local_rank=1)
    with distributed_session("cuda") as (rank, world, local):
        assert (rank, world, local) == (1, 2, 1)
        assert group.events == [1, 1, ("init", "nccl")]  # resolve_device, then init_distributed, then the group
    assert group.events[-1] == ("destroy",) and not group.initialized
    assert shutdown_distributed() is False  # nothing left to destroy


def test_a_group_the_caller_created_is_left_alone(monkeypatch):
    group = FakeGroup(monkeypatch, initialized=True)
    _torchrun_env(monkeypatch, rank=0, local_rank=0)
    with distributed_session("cpu") as (rank, world, _):
        assert (rank, world) == (0, 2)
    assert shutdown_distributed() is False
    assert group.events == [] and group.initialized


def test_distributed_session_is_a_no_op_on_one_process(monkeypatch):
    group = FakeGroup(monkeypatch)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed_session("auto") as info:
        assert info == (0, 1, 0)
    assert group.events == []


def test_a_group_created_again_does_not_reuse_the_keys_of_the_destroyed_one(monkeypatch):
    """torch names every default group '0': without a prefix of its own a second group would find the addresses
    the first one left in torchrun's store, and its ranks could wait forever on closed sockets."""
    group = FakeGroup(monkeypatch)
    _torchrun_env(monkeypatch, rank=0, local_rank=0)
    for _ in range(3):
        with distributed_session("cpu"):
            pass
    assert group.events == [("init", "gloo"), ("destroy",)] * 3
    assert len(set(group.prefixes)) == 3


def test_the_group_is_destroyed_when_the_block_fails(monkeypatch):
    group = FakeGroup(monkeypatch)
    _torchrun_env(monkeypatch, rank=0, local_rank=0)
    with pytest.raises(RuntimeError, match="boom"):
        with distributed_session("cpu"):
            raise RuntimeError("boom")
    assert group.events == [("init", "gloo"), ("destroy",)] and not group.initialized


def test_fit_leaves_a_group_it_did_not_create(tmp_path, monkeypatch):
    """A real (1-process, gloo) group the caller initialised survives Trainer.fit, which trains under DDP in it."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    mod = _load_model_module(tmp_path)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        config = TrainConfig(**dict(mod.CONFIG, epochs=1, limit_batches=2))
        result = Trainer(config).fit(mod.build_model(0), load_data("digits"), tmp_path / "m.pt")
        assert dist.is_initialized() and (result.rank, result.world_size) == (0, 1)
        assert shutdown_distributed() is False and dist.is_initialized()
    finally:
        dist.destroy_process_group()


# -- two processes, two "nodes" without a shared file system ----------------------------------------------------

DRIVER = r'''
import hashlib, json, os, sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[1])
from tinymodel import CONFIG, build_model
from sntfx.data import load_data
from sntfx.train import TrainConfig, Trainer, distributed_session

rank = int(os.environ["RANK"])
os.chdir(Path(sys.argv[1]) / f"node{rank}")  # this "node's" own disk; outputs are relative paths
Path("pid").write_text(str(os.getpid()))  # for the test to clean up after a hang
config = TrainConfig(**CONFIG)
data = load_data("digits")

def digest(model):
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode()); h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

report = {}
# 1. Trainer.fit creates the process group itself, resumes from rank 0's checkpoint, and destroys the group.
model = build_model(100 + rank)  # different initial weights on each rank: only the checkpoint may decide
result = Trainer(config).fit(model, data, "m.pt", resume=True)
report["resumed"] = {"rank": result.rank, "world": result.world_size, "history": result.history,
                     "digest": digest(model), "group_alive_after_fit": dist.is_initialized()}
torch.save(model.state_dict(), "resumed_weights.pt")

# 2. A session the caller opens: the group outlives fit and is destroyed when the block ends. Rank 0 has no
#    checkpoint for fresh.pt, rank 1 a stale one: every rank starts fresh.
with distributed_session("cpu") as (r, world, _):
    model = build_model(7)
    result = Trainer(config).fit(model, data, "fresh.pt", resume=True)
    alive = dist.is_initialized()
    digests = [None] * world
    dist.all_gather_object(digests, digest(model))
report["fresh"] = {"rank": r, "world": world, "history": result.history, "digest": digest(model),
                   "all_digests": digests, "group_alive_inside": alive, "group_alive_after": dist.is_initialized()}
# 3. Groups come and go within one job (a group formed again must not trip over the destroyed one's keys).
for i in range(4):
    with distributed_session("cpu") as (r, world, _):
        t = torch.tensor([float(r + i)])
        dist.all_reduce(t)
        assert t.item() == 2 * i + 1, t
report["sessions"] = 4
# 4. Rank 0's checkpoint does not fit the settings: every rank fails (none waits for the others), and the group
#    Trainer.fit created is destroyed on the way out.
from sntfx.errors import SntfxError
try:
    Trainer(TrainConfig(**dict(CONFIG, lr=1e-2))).fit(build_model(0), data, "m.pt", resume=True)
    report["mismatch"] = {"error": None}
except SntfxError as exc:
    report["mismatch"] = {"error": str(exc), "group_alive_after": dist.is_initialized()}
torch.save(model.state_dict(), "fresh_weights.pt")
Path("report.json").write_text(json.dumps(report))
'''


def _run_torchrun(driver: Path, tmp_path: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """torchrun with 2 processes; on a hang, kill the launcher and its workers (their own session) and fail."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(driver), str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # ranks out of step wait in a collective until killed
        proc.terminate()  # torchrun stops its workers on SIGTERM ...
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        for pid_file in tmp_path.glob("node*/pid"):  # ... which run in sessions of their own: make sure
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
        pytest.fail(f"the 2-process run hung for {timeout} s (ranks out of step?):\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class StopAfterFirstEpoch(Exception):
    pass


class _Stop:
    def on_epoch_start(self, epoch, steps):
        if epoch == 1:  # epoch 1's checkpoint is on disk by now
            raise StopAfterFirstEpoch

    def on_step(self, *args):
        pass

    def on_epoch_end(self, record):
        pass


def test_two_processes_resume_from_rank_0s_checkpoint_without_a_shared_file_system(tmp_path):
    mod = _load_model_module(tmp_path)
    data = load_data("digits")
    config = TrainConfig(**mod.CONFIG)
    nodes = [tmp_path / "node0", tmp_path / "node1", tmp_path / "ref", tmp_path / "ref_fresh"]
    for d in nodes:
        d.mkdir()
    # Epoch 1 of 3, on "node 0" only (stopped before epoch 2): its checkpoint exists on node 0's disk only.
    with pytest.raises(StopAfterFirstEpoch):
        Trainer(config, _Stop()).fit(mod.build_model(0), data, tmp_path / "node0" / "m.pt")
    ckpt = checkpoint_path(tmp_path / "node0" / "m.pt")
    first = torch.load(ckpt, weights_only=True)
    assert (first["epoch"], first["step_in_epoch"]) == (1, 0)
    assert not checkpoint_path(tmp_path / "node1" / "m.pt").exists()
    # A stale checkpoint of fresh.pt on node 1 only (the same settings, so it would be accepted if it were read).
    shutil.copy(ckpt, checkpoint_path(tmp_path / "node1" / "fresh.pt"))

    # The references, on one process: resumed from the same checkpoint, and fresh.
    shutil.copy(ckpt, checkpoint_path(tmp_path / "ref" / "m.pt"))
    ref_model = mod.build_model(1)
    ref = Trainer(config).fit(ref_model, data, tmp_path / "ref" / "m.pt", resume=True)
    assert [h["epoch"] for h in ref.history] == [1, 2, 3]
    fresh_model = mod.build_model(7)
    Trainer(config).fit(fresh_model, data, tmp_path / "ref_fresh" / "fresh.pt")

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = _run_torchrun(driver, tmp_path, env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "destroy_process_group() was not called" not in proc.stderr
    reports = [json.loads((tmp_path / f"node{r}" / "report.json").read_text()) for r in (0, 1)]

    # 1. Both ranks resumed at epoch 2 from rank 0's checkpoint (rank 1 has none), and ended identical.
    for r, rep in enumerate(reports):
        res = rep["resumed"]
        assert (res["rank"], res["world"]) == (r, 2)
        assert [h["epoch"] for h in res["history"]] == [1, 2, 3]
        assert res["history"][0] == reports[0]["resumed"]["history"][0] == ref.history[0]  # epoch 1: rank 0's file
        assert not res["group_alive_after_fit"]  # Trainer.fit created the group, so it destroyed it
    assert reports[0]["resumed"]["digest"] == reports[1]["resumed"]["digest"]
    assert reports[0]["sessions"] == reports[1]["sessions"] == 4
    # 3. A checkpoint with other settings fails every rank with rank 0's message, and the group is gone.
    assert "different configuration" in reports[0]["mismatch"]["error"]
    assert reports[1]["mismatch"]["error"] == "rank 0: " + reports[0]["mismatch"]["error"]
    assert not reports[0]["mismatch"]["group_alive_after"] and not reports[1]["mismatch"]["group_alive_after"]
    assert not checkpoint_path(tmp_path / "node1" / "m.pt").exists()  # only rank 0 writes
    assert torch.load(checkpoint_path(tmp_path / "node0" / "m.pt"), weights_only=True)["epoch"] == 3
    # ... and equal (float tolerance: a 2-way all-reduce sums in another order) to one process resumed likewise.
    two = torch.load(tmp_path / "node0" / "resumed_weights.pt", weights_only=True)
    for k, v in ref_model.state_dict().items():
        rel = ((two[k] - v).norm() / v.norm()).item()
        assert rel <= 1e-5, (k, rel)

    # 2. Rank 0 had no checkpoint of fresh.pt: every rank started fresh, rank 1 ignoring its stale file.
    stale = json.loads(torch.load(checkpoint_path(tmp_path / "node1" / "fresh.pt"), weights_only=True)["history"])
    for r, rep in enumerate(reports):
        fr = rep["fresh"]
        assert (fr["rank"], fr["world"]) == (r, 2)
        assert [h["epoch"] for h in fr["history"]] == [1, 2, 3]
        assert fr["history"][0]["seconds"] != stale[0]["seconds"]
        assert fr["all_digests"] == [fr["digest"]] * 2
        assert fr["group_alive_inside"] and not fr["group_alive_after"]
    two = torch.load(tmp_path / "node1" / "fresh_weights.pt", weights_only=True)
    for k, v in fresh_model.state_dict().items():
        rel = ((two[k] - v).norm() / v.norm()).item()
        assert rel <= 1e-5, (k, rel)
