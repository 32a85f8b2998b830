"""Fault injection: every file sntfx writes appears whole or not at all.

* SIGKILL at random moments (and right after a temporary file appears) while a
  process rewrites a model file, an ONNX export, a study report or a training
  checkpoint over and over: the target is always complete and is the version
  last written (or the one being written), never a mix; leftovers are hidden
  temporary files beside it.
* A full disk (a small tmpfs; or ENOSPC/EDQUOT/EFBIG injected into the write):
  a DiskFullError (``error: ...`` and exit 2 on the command line), the old
  file untouched, no temporary file left.
* Permissions follow the umask, like any file the user creates.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import sntfx
from sntfx.errors import DiskFullError
from sntfx.io import atomic_write

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "fmnist-study" / "results.json"  # a real study's results, shipped

BIG_MODEL = '''
from torch import nn

def build_model(width: int = 2048, depth: int = 4):
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
'''

# -- SIGKILL while writing -------------------------------------------------------------------------------------------
#
# One "zygote" process per target imports everything and prepares versions A and B once, writes A, then forks a
# writer for each round: the writer rewrites the target B, A, B, ... and reports each completed write on a pipe;
# the zygote SIGKILLs it (after a seeded random delay, or a few ms after a temporary file shows up, so that some
# kills land inside a write), then checks the target and lists what is left beside it. Forking keeps a round at
# the cost of the kill delay instead of a Python + torch start-up (~2 s on 2 cores).

ZYGOTE = r'''
import ctypes, json, os, random, re, shutil, signal, sys, time, traceback
from pathlib import Path

import numpy as np
import torch
from torch import nn

torch.set_num_threads(1)
target_kind, folder = sys.argv[1], Path(sys.argv[2])
rounds, seed, max_delay = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
out = folder / "out"
out.mkdir()
FILL = {"A": 1.0, "B": 2.0}


def filled(model, v):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(FILL[v])
    return model


def setup_save():
    import sntfx

    models = {v: filled(sntfx.trace(str(folder / "bigmodel.py"), torch.zeros(1, 2048)), v) for v in "AB"}
    target = out / "model.pt"

    def write(v):
        sntfx.save(models[v], target, info={"version": v})

    def check():
        gm = sntfx.load(target, trust_source=True)  # checks the digest of recipe and weights
        v = gm.meta["sntfx"]["info"]["version"]
        assert all(bool((p == FILL[v]).all()) for p in gm.parameters()), "weights of another version"
        return v

    return write, check, ["model.pt"]


def setup_onnx():
    import onnx
    import onnxruntime as ort
    from sntfx.exporters import export_onnx

    models = {v: filled(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), v).eval() for v in "AB"}
    expected = {"A": 17.0, "B": 66.0}  # output on zeros: 16 * fill * fill + fill
    target = out / "model.onnx"

    def write(v):
        export_onnx(models[v], target, torch.zeros(2, 16))

    def check():
        proto = onnx.load(str(target))
        onnx.checker.check_model(proto, full_check=True)
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        y = sess.run(None, {sess.get_inputs()[0].name: np.zeros((2, 16), np.float32)})[0]
        for v, e in expected.items():
            if np.allclose(y, e):
                return v
        raise AssertionError(f"outputs {y.ravel()[:4]} are neither version's")

    return write, check, ["model.onnx"]


def setup_report():
    from sntfx.study import write_report

    results = json.loads(Path(sys.argv[6]).read_text())
    versions = {v: dict(results, created=f"2024-01-0{i} (version {v})") for i, v in ((1, "A"), (2, "B"))}
    refs = {}
    for v in "AB":
        ref = folder / f"ref{v}"
        ref.mkdir()
        write_report(versions[v], ref)
        refs[v] = {str(p.relative_to(ref)): p.read_bytes() for p in ref.rglob("*") if p.is_file()}
    assert refs["A"]["report.md"] != refs["B"]["report.md"]
    names = sorted(refs["A"])

    def write(v):
        write_report(versions[v], out)

    def check():
        text = (out / "report.md").read_bytes()
        v = next((v for v in "AB" if refs[v]["report.md"] == text), None)
        assert v is not None, f"report.md is neither version ({len(text)} bytes)"
        for name in names:  # every plot complete (the plots of A and B are the same images)
            data = (out / name).read_bytes()
            assert data in (refs["A"][name], refs["B"][name]), f"{name} is neither version ({len(data)} bytes)"
        return v

    return write, check, [n for n in names] + ["plots"]


def setup_checkpoint():
    from sntfx.train import TrainConfig, TrainResult, Trainer, _load_checkpoint, checkpoint_path

    trainer = Trainer(TrainConfig(epochs=3))
    models = {v: filled(nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 2048)), v) for v in "AB"}
    opts = {v: torch.optim.Adam(models[v].parameters()) for v in "AB"}
    epochs = {"A": 1, "B": 2}
    target = checkpoint_path(out / "model.pt")

    def write(v):
        history = [{"epoch": e + 1} for e in range(epochs[v])]
        trainer._checkpoint(target, models[v], opts[v], epochs[v], 0, TrainResult(history=history), 0)

    def check():
        state = _load_checkpoint(target)
        v = {1: "A", 2: "B"}[state["epoch"]]
        assert len(state["history"]) == epochs[v], "history of another version"
        assert all(bool((t == FILL[v]).all()) for t in state["model"].values()), "weights of another version"
        return v

    return write, check, [target.name]


write, check, expected = globals()[f"setup_{target_kind}"]()
t_write = time.perf_counter()
write("A")
write_s = time.perf_counter() - t_write  # one write's duration on this machine, now
current = check()
assert current == "A"


def listing():
    """Everything in out/ (and out/plots/) that is not one of the target files."""
    found = []
    for d in (out, out / "plots"):
        if d.is_dir():
            for p in d.iterdir():
                rel = str(p.relative_to(out))
                if rel not in expected:
                    found.append(rel)
    return sorted(found)


rng = random.Random(seed)
outcomes = []
for i in range(rounds):
    mode = "random" if i % 2 == 0 else "on-temp"
    delay = rng.uniform(0.05, max(max_delay, 3 * write_s)) if mode == "random" else rng.uniform(0.0, 0.005)
    if i == 0:
        delay = 2.5 * write_s + 0.05  # at least one rewrite completes whatever the machine's load
    other = "B" if current == "A" else "A"
    t0 = time.perf_counter()
    r, w = os.pipe()
    zygote = os.getpid()
    pid = os.fork()
    if pid == 0:  # the writer
        try:
            os.close(r)
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the zygote
            if os.getppid() != zygote:
                os._exit(4)
            n = 0
            while True:
                write(other if n % 2 == 0 else current)
                n += 1
                os.write(w, b".")
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(3)
    os.close(w)
    try:
        if mode == "on-temp":  # wait until a write is under way, then kill a few ms into it
            deadline = time.monotonic() + 30
            while not any(Path(rel).name.startswith(".") for rel in listing()) and time.monotonic() < deadline:
                time.sleep(0.0005)
        time.sleep(delay)
    finally:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    done = b""
    while chunk := os.read(r, 1 << 16):
        done += chunk
    os.close(r)
    outcome = {"mode": mode, "delay": round(delay, 4), "before": current, "completed_writes": len(done),
               "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
               "killed_after_s": round(time.perf_counter() - t0, 3)}
    try:
        outcome["version"] = current = check()
    except Exception as exc:  # noqa: BLE001
        outcome["version"], outcome["error"] = None, f"{type(exc).__name__}: {exc}"[:500]
    outcome["leftovers"] = listing()
    for rel in outcome["leftovers"]:  # so that each round's leftovers are its own
        p = out / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    outcomes.append(outcome)
Path(folder / "outcomes.json").write_text(json.dumps(outcomes, indent=1))
'''

# (rounds, longest random delay in s). Half the rounds kill 0-5 ms after a temporary file appears instead; the slow
# "-many" variants run 5 times as many rounds. A write of model.pt (67 MB) or of the checkpoint (33 MB) takes ~0.2 s,
# an ONNX export (verified on ONNX Runtime) ~1.2 s, the report with its five plots ~1.2 s.
KILL_TARGETS = {"save": (6, 0.6), "onnx": (4, 2.0), "report": (4, 2.0), "checkpoint": (6, 0.5)}
HIDDEN_TEMP = {
    "save": [r"\.model\.pt\..+\.tmp"],
    "onnx": [r"\.sntfx-export-[^/]+"],  # the exporter's temporary folder
    "report": [r"\.report\.md\..+\.tmp", r"plots/\.[^/]+\.png\..+\.tmp"],
    "checkpoint": [r"\.model\.pt\.ckpt\..+\.tmp"],
}


def _kill_rounds(tmp_path: Path, target: str, rounds: int, max_delay: float, seed: int) -> tuple[list[dict], str]:
    (tmp_path / "bigmodel.py").write_text(BIG_MODEL)
    (tmp_path / "zygote.py").write_text(ZYGOTE)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(tmp_path / "zygote.py"), target, str(tmp_path), str(rounds), str(seed),
                           str(max_delay), str(RESULTS)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp_path / "outcomes.json").read_text()), proc.stderr


def _check_kill_outcomes(target: str, outcomes: list[dict], stderr: str) -> None:
    previous = "A"
    for o in outcomes:
        assert o["signal"] == signal.SIGKILL, (o, stderr[-3000:])  # the writer was alive and writing when killed
        assert o["version"] is not None, o  # complete and loadable
        # each round's writer writes the other version first, then alternates: after n completed writes the
        # target holds the version last completed, or the one being written (renamed, not yet reported)
        assert o["before"] == previous, o
        after = lambda n: previous if n % 2 == 0 else {"A": "B", "B": "A"}[previous]  # noqa: E731
        assert o["version"] in (after(o["completed_writes"]), after(o["completed_writes"] + 1)), o
        previous = o["version"]
        for rel in o["leftovers"]:  # only hidden temporary files, never at the target path
            assert any(re.fullmatch(p, rel) for p in HIDDEN_TEMP[target]), o
    assert sum(o["completed_writes"] for o in outcomes) >= 1, outcomes  # the writers did rewrite the target
    assert any(o["leftovers"] for o in outcomes), outcomes  # some kills landed inside a write


@pytest.mark.parametrize("target", [
    "save",
    "onnx",
    "report",
    "checkpoint",
    *[pytest.param(t, id=f"{t}-many", marks=pytest.mark.slow) for t in ("save", "onnx", "report", "checkpoint")],
])
def test_sigkill_while_writing_leaves_the_old_file_or_the_new_one(tmp_path, target, request):
    rounds, max_delay = KILL_TARGETS[target]
    if request.node.callspec.id.endswith("-many"):
        rounds *= 5
    outcomes, stderr = _kill_rounds(tmp_path, target, rounds, max_delay, seed=1234)
    _check_kill_outcomes(target, outcomes, stderr)
    mid_write = sum(bool(o["leftovers"]) for o in outcomes)
    print(f"{target}: {len(outcomes)} kills, {mid_write} inside a write, versions "
          f"{[o['version'] for o in outcomes]}, completed writes {[o['completed_writes'] for o in outcomes]}, "
          f"killed after {[o['killed_after_s'] for o in outcomes]} s")


# -- full disk ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str = "256k"):
    """A tmpfs of ``size`` mounted at ``path`` (root only); skips the test where it cannot be mounted."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _everything(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _file_model(tmp_path: Path, width: int = 512):
    """A traced model built from a model file (so it records its source and sntfx.save accepts it)."""
    model_py = tmp_path / "model_file.py"
    model_py.write_text(BIG_MODEL)
    return sntfx.trace(sntfx.ModelSpec.parse(str(model_py), kwargs={"width": width, "depth": 1}), torch.zeros(1, width))


def test_save_onto_a_full_disk(tmp_path):
    gm = _file_model(tmp_path)  # 1 MB of weights
    with small_disk(tmp_path / "disk") as disk:
        with pytest.raises(Exception) as info:
            sntfx.save(gm, disk / "model.pt")
        assert _everything(disk) == []  # not even a temporary file
    assert isinstance(info.value, DiskFullError), repr(info.value)
    assert "no space left" in str(info.value) and "model.pt" in str(info.value)


def test_onnx_export_onto_a_full_disk(tmp_path):
    from sntfx.exporters import export_onnx

    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).eval()  # ~1 MB of initializers
    with small_disk(tmp_path / "disk") as disk:
        with pytest.raises(Exception) as info:
            export_onnx(model, disk / "model.onnx", torch.zeros(2, 512))
        assert _everything(disk) == []  # the exporter's temporary folder is gone too
    assert isinstance(info.value, DiskFullError), repr(info.value)
    assert "no space left" in str(info.value)


def _png_complete(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        im.load()
    return True


def test_report_onto_a_full_disk(tmp_path):
    from sntfx.study import write_report

    results = json.loads(RESULTS.read_text())
    with small_disk(tmp_path / "disk") as disk:  # the report and its five plots take ~0.5 MB
        with pytest.raises(DiskFullError, match="no space left"):
            write_report(results, disk)
        left = _everything(disk)
        assert "report.md" not in left
        assert not [n for n in left if Path(n).name.startswith(".")], left  # no temporary file
        # plots written before the disk filled up are whole files, not the start of one
        assert all(_png_complete(disk / n) for n in left if n.endswith(".png")), left


def test_cli_reports_a_full_disk_in_one_line(tmp_path):
    from sntfx.cli import cli

    with small_disk(tmp_path / "disk") as disk:
        shutil.copy(RESULTS, disk / "results.json")  # 170 KB of 256 KB: no room for the plots
        res = CliRunner().invoke(cli, ["study", "--report-only", "--out", str(disk)])
        left = _everything(disk)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "no space left" in lines[0], res.output
    assert "Traceback" not in res.output
    assert "report.md" not in left and not [n for n in left if Path(n).name.startswith(".")], left


def test_cli_transform_onto_a_full_disk(tmp_path):
    from sntfx.cli import cli

    with small_disk(tmp_path / "disk") as disk:
        res = CliRunner().invoke(cli, ["transform", "sntfx:cnn", "--kwargs", '{"width": 128}', "--out",
                                       str(disk / "snt.pt")])
        left = _everything(disk)
    assert left == [], left
    assert "Traceback" not in res.output
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "no space left" in lines[0], res.output


# -- full disk, injected: the write fails part-way with ENOSPC / EDQUOT / EFBIG ---------------------------------------

DISK_FULL_ERRNOS = [errno.ENOSPC, errno.EDQUOT, errno.EFBIG]


def _failing_after(data: bytes, code: int):
    """A write callback that writes half of ``data`` into the temporary file, then fails as a full disk does."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data[: len(data) // 2])
        raise OSError(code, os.strerror(code), str(tmp))

    return write


@pytest.mark.parametrize("code", DISK_FULL_ERRNOS, ids=errno.errorcode.get)
def test_atomic_write_failing_part_way(tmp_path, code):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(DiskFullError, match="out.bin"):
        atomic_write(target, _failing_after(b"x" * 100_000, code))
    assert _everything(tmp_path) == ["out.bin"] and target.read_bytes() == b"old"
    with pytest.raises(DiskFullError):  # a new file: nothing appears
        atomic_write(tmp_path / "new.bin", _failing_after(b"x" * 100_000, code))
    assert _everything(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("wrapped", [False, True], ids=["oserror", "torch-runtimeerror"])
def test_save_failing_part_way(tmp_path, monkeypatch, wrapped):
    gm = sntfx.trace("sntfx:cnn", torch.zeros(1, 1, 8, 8))
    target = tmp_path / "m.pt"
    sntfx.save(gm, target)
    before = target.read_bytes()
    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        import io

        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        half = buf.getvalue()[: len(buf.getvalue()) // 2]
        if hasattr(f, "write"):  # sntfx saves into an open file
            f.write(half)
        else:
            with open(f, "wb") as fh:
                fh.write(half)
        err = OSError(errno.ENOSPC, "No space left on device")
        if wrapped:  # what torch raises when it writes into a file object on a full disk
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from err
        raise err

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(DiskFullError, match="m.pt"):
        sntfx.save(gm, target)
    monkeypatch.undo()
    assert _everything(tmp_path) == ["m.pt"] and target.read_bytes() == before
    assert sntfx.load(target).state_dict().keys() == gm.state_dict().keys()


def test_report_failing_part_way(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from sntfx.study import write_report

    calls = []

    def savefig_then_fail(self, fname, *args, **kwargs):
        calls.append(fname)
        with open(fname, "wb") as fh:
            fh.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", savefig_then_fail)
    with pytest.raises(DiskFullError, match="no space left"):
        write_report(json.loads(RESULTS.read_text()), tmp_path)
    assert len(calls) == 1 and _everything(tmp_path) == ["plots"]


def test_onnx_export_failing_part_way(tmp_path, monkeypatch):
    import sntfx.exporters.onnx_export as onnx_export

    def export_then_fail(model, inputs, path, opset, dynamic_batch):
        Path(path).write_bytes(b"\x08\x07" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_export, "_export", export_then_fail)
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(Exception) as info:
        onnx_export.export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 4))
    assert _everything(tmp_path) == []
    assert isinstance(info.value, DiskFullError), repr(info.value)


# -- permissions -------------------------------------------------------------------------------------------------


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=["022", "077", "002"])
def test_files_get_the_mode_the_umask_allows(tmp_path, umask, mask, mode):
    from sntfx.exporters import export_onnx
    from sntfx.train import TrainConfig, TrainResult, Trainer

    gm = sntfx.trace("sntfx:cnn", torch.zeros(1, 1, 8, 8))
    umask(mask)
    written = [sntfx.save(gm, tmp_path / "m.pt"),
               atomic_write(tmp_path / "notes.txt", lambda tmp: tmp.write_text("hello")),
               atomic_write(tmp_path / "notes.txt", lambda tmp: tmp.write_text("again")),  # replacing keeps the rule
               export_onnx(gm.eval(), tmp_path / "m.onnx", torch.zeros(2, 1, 8, 8)).path]
    ckpt = tmp_path / "m.pt.ckpt"
    Trainer(TrainConfig())._checkpoint(ckpt, gm, torch.optim.Adam(gm.parameters()), 1, 0, TrainResult(), 0)
    written.append(ckpt)
    for path in written:
        assert (os.stat(path).st_mode & 0o777) == mode, (path, oct(os.stat(path).st_mode & 0o777))
