"""Training: real-data accuracy, online fold, kill-and-resume equality, DDP equivalence, CLI errors."""

from __future__ import annotations

import copy
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import sntfx
from sntfx.blocks import LinearExpansion
from sntfx.cli import cli
from sntfx.data import load_data
from sntfx.errors import SntfxError
from sntfx.train import TrainConfig, Trainer, checkpoint_path, metrics_path

NO_BN_MODEL = '''
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
'''


def test_config_validation():
    with pytest.raises(SntfxError, match="unknown optimizer 'lamb'"):
        TrainConfig(optimizer="lamb")
    with pytest.raises(SntfxError, match="learning rate must be positive"):
        TrainConfig(lr=-1.0)
    assert TrainConfig(optimizer="sgd").learning_rate == 0.1
    assert TrainConfig(optimizer="sam", sam_base="adam").learning_rate == 1e-3


def test_lr_schedule_warmup_and_cosine():
    tr = Trainer(TrainConfig(lr=1.0, warmup_epochs=1, schedule="cosine"))
    lrs = [tr.lr_at(s, 40, 10) for s in range(40)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] < 0.01
    step = Trainer(TrainConfig(lr=1.0, schedule="step", step_milestones=(0.5,)))
    assert step.lr_at(0, 10, 10) == 1.0 and step.lr_at(6, 10, 10) == pytest.approx(0.1)


@pytest.mark.parametrize("optimizer", ["adam", "sam"])
def test_short_training_on_digits_learns(tmp_path, optimizer):
    torch.manual_seed(0)
    data = load_data("digits")
    gm = sntfx.trace("sntfx:cnn", torch.randn(2, 1, 8, 8))
    result = Trainer(TrainConfig(epochs=6, batch_size=64, optimizer=optimizer, lr=3e-3)).fit(gm, data, tmp_path / "m.pt")
    assert result.final["test_accuracy"] > 0.85, result.history
    lines = metrics_path(tmp_path / "m.pt").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3, 4, 5, 6]
    assert checkpoint_path(tmp_path / "m.pt").exists()


def test_snt_model_trains_with_the_online_fold_by_default(tmp_path):
    data = load_data("synthetic")
    x = torch.randn(2, 3, 16, 16)
    snt = sntfx.transform(sntfx.build_model("sntfx:cnn", in_channels=3, num_classes=4), x, ratio=2)
    Trainer(TrainConfig(epochs=1, batch_size=32, limit_batches=2)).fit(snt, data, tmp_path / "a.pt")
    assert all(m.online for m in snt.modules() if isinstance(m, LinearExpansion))
    Trainer(TrainConfig(epochs=1, batch_size=32, limit_batches=2, online_fold=False)).fit(snt, data, tmp_path / "b.pt")
    assert not any(m.online for m in snt.modules() if isinstance(m, LinearExpansion))


def test_bf16_autocast_runs(tmp_path):
    data = load_data("synthetic")
    gm = sntfx.trace(sntfx.build_model("sntfx:cnn", in_channels=3, num_classes=4), torch.randn(2, 3, 16, 16))
    result = Trainer(TrainConfig(epochs=1, batch_size=32, limit_batches=3, amp=True, optimizer="sam")).fit(
        gm, data, tmp_path / "m.pt")
    assert 0.0 <= result.final["test_accuracy"] <= 1.0


DRIVER = """
import os, signal, sys, torch, sntfx
from sntfx.data import load_data
from sntfx.train import Trainer, TrainConfig

snt_file, out, kill_epoch, kill_step, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"

class KillAt:
    # SIGKILL this very process in the middle of an epoch, as a crash would.
    def on_epoch_start(self, epoch, steps): pass
    def on_epoch_end(self, record): pass
    def on_step(self, epoch, step, loss, rate):
        if (epoch, step) == (kill_epoch, kill_step):
            os.kill(os.getpid(), signal.SIGKILL)

model = sntfx.load(snt_file)
config = TrainConfig(epochs=3, batch_size=16, limit_batches=8, checkpoint_every=3, seed=3, deterministic=True,
                     optimizer="sam", sam_base="sgd", lr=0.05)
Trainer(config, KillAt()).fit(model, load_data("synthetic", seed=3), out, resume=resume)
torch.save(model.state_dict(), out)
"""


@pytest.mark.parametrize("kill_at", [(1, 5), (0, 7)])
def test_killed_run_resumes_to_the_same_weights(tmp_path, kill_at):
    """SIGKILL mid-epoch, resume from the last checkpoint: same final weights as an uninterrupted run."""
    snt = tmp_path / "snt.pt"
    x = torch.randn(2, 3, 16, 16)
    model = sntfx.transform(sntfx.trace(sntfx.build_model("sntfx:cnn", in_channels=3, num_classes=4), x), x,
                            style="branch")
    sntfx.save(model, snt, source=sntfx.ModelSpec.parse("sntfx:cnn", kwargs={"in_channels": 3, "num_classes": 4}))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)

    def run(out, kill, resume):
        return subprocess.run([sys.executable, str(driver), str(snt), str(out), str(kill[0]), str(kill[1]),
                               "1" if resume else "0"], capture_output=True, text=True, timeout=600)

    ref = run(tmp_path / "ref.pt", (-1, -1), False)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed.pt"
    killed = run(out, kill_at, False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = torch.load(checkpoint_path(out), weights_only=True)
    # The last checkpoint is mid-epoch (every 3 steps), before the kill.
    assert state["epoch"] == kill_at[0] and 0 < state["step_in_epoch"] < kill_at[1]
    resumed = run(out, (-1, -1), True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = torch.load(tmp_path / "ref.pt", weights_only=True), torch.load(out, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    history = [json.loads(l) for l in metrics_path(out).read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_two_process_ddp_matches_one_process(tmp_path, optimizer):
    model = tmp_path / "model.py"
    model.write_text(NO_BN_MODEL)
    common = ["train", str(model), "--data", "synthetic", "--epochs", "2", "--batch-size", "32", "--limit-batches", "5",
              "--optimizer", optimizer, "--lr", "0.01", "--deterministic"]
    single = subprocess.run([sys.executable, "-m", "sntfx", *common, "--out", str(tmp_path / "one.pt")],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "sntfx", *common,
                          "--out", str(tmp_path / "two.pt")], capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = sntfx.load(tmp_path / "one.pt").state_dict(), sntfx.load(tmp_path / "two.pt").state_dict()
    for k in a:
        rel = ((a[k] - b[k]).norm() / a[k].norm()).item()
        assert rel <= 1e-5, (k, rel)
    info = sntfx.read_recipe(tmp_path / "two.pt")["info"]
    assert len(info["history"]) == 2


def test_cli_train_errors(tmp_path):
    runner = CliRunner()
    out = tmp_path / "m.pt"
    res = runner.invoke(cli, ["train", "sntfx:cnn", "--data", "mnist-ish", "--out", str(out), "--epochs", "1"])
    assert res.exit_code == 2 and "unknown dataset 'mnist-ish'" in res.output and not out.exists()
    snt = tmp_path / "snt.pt"
    assert runner.invoke(cli, ["transform", "sntfx:cnn", "--out", str(snt)]).exit_code == 0  # 10 classes, 1 channel
    res = runner.invoke(cli, ["train", str(snt), "--data", "synthetic", "--out", str(out), "--epochs", "1"])
    assert res.exit_code == 2 and "does not accept synthetic images" in res.output and not out.exists()
    res = runner.invoke(cli, ["train", str(snt), "--data", "digits", "--out", str(snt), "--epochs", "1"])
    assert res.exit_code == 2 and "is the input file" in res.output


def test_cli_train_with_a_validation_split_reports_on_it_and_never_reads_the_test_split(tmp_path, test_split_reads):
    """--val-images N: per-epoch accuracy on N held-out training images, recorded as such; no test image is read."""
    reads = test_split_reads
    runner, out, report = CliRunner(), tmp_path / "m.pt", tmp_path / "r.json"
    res = runner.invoke(cli, ["train", "sntfx:cnn", "--data", "digits", "--out", str(out), "--epochs", "2",
                              "--batch-size", "64", "--val-images", "300", "--json", str(report)])
    assert res.exit_code == 0, res.output
    assert reads["test"] == 0 and "validation accuracy" in res.output and "val acc" in res.output
    info = sntfx.read_recipe(out)["info"]
    assert info["curve_split"] == "validation" and info["val_images"] == 300 and len(info["history"]) == 2
    assert json.loads(report.read_text())["result"]["curve_split"] == "validation"
    # without it the curve is the test split's, and says so
    res = runner.invoke(cli, ["train", "sntfx:cnn", "--data", "digits", "--out", str(tmp_path / "t.pt"), "--epochs", "1",
                              "--limit-batches", "2"])
    assert res.exit_code == 0 and reads["test"] > 0 and "test accuracy" in res.output
    assert sntfx.read_recipe(tmp_path / "t.pt")["info"]["curve_split"] == "test"
    res = runner.invoke(cli, ["train", "sntfx:cnn", "--data", "digits", "--out", str(tmp_path / "v.pt"), "--epochs", "1",
                              "--val-images", "5000"])
    assert res.exit_code == 2 and "validation split must hold between 1 and" in res.output
    assert not (tmp_path / "v.pt").exists()


def test_cli_train_then_sharpness(tmp_path):
    runner = CliRunner()
    out = tmp_path / "m.pt"
    res = runner.invoke(cli, ["train", "sntfx:cnn", "--data", "digits", "--out", str(out), "--epochs", "2",
                              "--batch-size", "64"])
    assert res.exit_code == 0, res.output
    recipe = sntfx.read_recipe(out)
    assert recipe["info"]["training"]["optimizer"] == "adam" and len(recipe["info"]["history"]) == 2
    res = runner.invoke(cli, ["sharpness", str(out), "--data", "digits", "--batches", "1", "--batch-size", "32",
                              "--iters", "5", "--trace-samples", "2", "--out", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    payload = json.loads((tmp_path / "s.json").read_text())
    assert payload["results"]["m"]["top_eigenvalue"] > 0
    assert Path(payload["plots"][0]).read_bytes()[:4] == b"\x89PNG"


def test_adamw_is_decoupled_weight_decay_and_sam_can_wrap_it(tmp_path):
    """adamw decays weights by lr * wd outside the adaptive step (torch.optim.AdamW); SAM wraps it like the others."""
    from sntfx.sam import SAM
    from sntfx.train import TrainConfig, Trainer

    model = torch.nn.Linear(4, 3)
    opt = Trainer(TrainConfig(optimizer="adamw", lr=1e-2, weight_decay=0.1)).build_optimizer(model)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.1
    before = model.weight.detach().clone()
    model.weight.grad = torch.zeros_like(model.weight)  # no gradient: only the decay moves the weights
    model.bias.grad = torch.zeros_like(model.bias)
    opt.step()
    assert torch.allclose(model.weight, before * (1 - 1e-2 * 0.1))
    sam = Trainer(TrainConfig(optimizer="sam", sam_base="adamw")).build_optimizer(model)
    assert isinstance(sam, SAM) and isinstance(sam.base, torch.optim.AdamW)
    assert TrainConfig(optimizer="adamw").learning_rate == 1e-3


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "sam"])
def test_trainer_optimizer_is_fused_and_updates_like_torchs_loop(name):
    """The trainer's optimizer runs fused on CPU floats, and its updates equal torch's per-tensor loop to rounding."""
    from sntfx.sam import SAM
    from sntfx.train import TrainConfig, Trainer

    config = TrainConfig(optimizer=name, lr=1e-2, weight_decay=1e-3)
    torch.manual_seed(0)
    fused_model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    loop_model = copy.deepcopy(fused_model)
    start = copy.deepcopy(fused_model)
    opt = Trainer(config).build_optimizer(fused_model)
    base = opt.base if isinstance(opt, SAM) else opt
    assert base.defaults["fused"] is True
    assert isinstance(opt, SAM) == (name == "sam") and (not isinstance(opt, SAM) or opt.model is fused_model)
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[config.base_optimizer]
    extra = {"momentum": 0.9, "nesterov": True} if kind is torch.optim.SGD else {}
    reference = kind(loop_model.parameters(), lr=1e-2, weight_decay=1e-3, foreach=False, **extra)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(fused_model.parameters(), loop_model.parameters()):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        base.step()  # the base update alone (SAM's perturbation is tested in test_sam_*)
        reference.step()
    for a, b, s in zip(fused_model.parameters(), loop_model.parameters(), start.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert (a - s).abs().min() > 1e-4  # every weight moved


def test_trainer_optimizer_falls_back_where_fused_kernels_do_not_run():
    """Parameters on a device without fused kernels (here 'meta') get torch's default implementation."""
    from sntfx.train import TrainConfig, Trainer

    model = torch.nn.Linear(4, 3, device="meta")
    opt = Trainer(TrainConfig()).build_optimizer(model)
    assert not opt.defaults["fused"]
