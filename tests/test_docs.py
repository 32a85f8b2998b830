"""The README's Python examples and the example scripts run as documented."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("script", ["compose_passes.py"])
def test_example_scripts(script):
    res = subprocess.run([sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr


def test_train_and_fold_example_runs(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "train_and_fold.py"), "--epochs", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "fold verified" in res.stdout
    assert (tmp_path / "snt_folded.pt").exists() and (tmp_path / "adam.pt").exists()


def test_example_model_and_policy_with_the_cli(tmp_path):
    out = tmp_path / "snt.pt"
    res = subprocess.run(
        [sys.executable, "-m", "sntfx", "transform", str(ROOT / "examples" / "model.py"), "--out", str(out),
         "--policy", str(ROOT / "examples" / "policy.toml")],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr
    assert "skip: first layer: 1" in res.stdout and "expanded: qa-branch: 1" in res.stdout


def test_transform_data_builds_a_model_file_for_the_dataset(tmp_path):
    """examples/model.py names num_classes and in_channels: --data sets them (digits: 1 channel, 10 classes)."""
    import sntfx

    out = tmp_path / "snt.pt"
    res = subprocess.run([sys.executable, "-m", "sntfx", "transform", str(ROOT / "examples" / "model.py"), "--data",
                          "digits", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    gm = sntfx.load(out)
    assert gm.meta["sntfx"]["source"]["kwargs"] == {"num_classes": 10, "in_channels": 1}
    import torch

    assert gm.eval()(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_make_demo_runs_the_quick_study(tmp_path):
    """`make demo` runs: its own recipe, on this environment, cut to a few batches, writes a study report.

    The README's first block names ``make demo`` and ``make test``. The recipe is run through make itself
    (with this test's Python environment as the venv, its install step marked done) on digits with tiny
    settings appended through ``DEMO_ARGS``, so a broken recipe, a renamed option or a failing study fails here.
    """
    readme = (ROOT / "README.md").read_text()
    first_block = readme[readme.index("```bash"):].split("```")[1]
    assert first_block.split("\n")[1].startswith("make demo") and "make test" in first_block
    venv = Path(sys.prefix)
    out = tmp_path / "demo"
    tiny = "--data digits --seeds 0 --methods adam,snt-linear --epochs 1 --limit-batches 3 --eval-images 64 --no-onnx"
    res = subprocess.run(["make", "-C", str(ROOT), "-o", str(venv / ".installed-stamp"), "demo", f"VENV={venv}",
                          f"DEMO_OUT={out}", f"DEMO_ARGS={tiny}"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"report: {out}/report.md" in res.stdout
    report = (out / "report.md").read_text()
    assert "snt-linear" in report and "adam" in report
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results["runs"]} == {"adam", "snt-linear"}
    assert all("sweep" in r and "evaluate" in r for r in results["runs"])




def test_the_readme_walkthrough_runs_literally(tmp_path):
    """The README's end-to-end command sequence, line by line as written, in a fresh folder."""
    import os
    import shlex

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- walkthrough: run as written by tests/test_docs.py -->\n```bash\n(.*?)```", readme,
                      flags=re.S)
    assert block, "the README lost its walkthrough block"
    lines = [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert [shlex.split(ln)[1] for ln in lines] == ["transform", "train", "fold", "prune", "quantize", "export",
                                                    "bench"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for line in lines:
        res = subprocess.run(shlex.split(line), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{line}\n{res.stdout}\n{res.stderr}"
    for name in ("snt.pt", "snt_trained.pt", "folded.pt", "folded.safetensors", "pruned.pt", "int8.pt", "int8.json",
                 "int8.onnx"):
        assert (tmp_path / name).is_file(), name
