"""Packaging: passes/ and exporters/ install as sntfx.passes and sntfx.exporters only."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_only_the_sntfx_package(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr
    wheel = next(tmp_path.glob("sntfx-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top <= {"sntfx", next(n.split("/")[0] for n in names if ".dist-info/" in n)}, top
    assert "sntfx/passes/snt_expand.py" in names and "sntfx/passes/snt_fold.py" in names
    assert "sntfx/exporters/__init__.py" in names
    assert not any(n.startswith(("passes/", "exporters/", "tests/")) for n in names)


def test_installed_import_names(tmp_path):
    code = (
        "import importlib.util as u, sntfx, sntfx.passes, sntfx.exporters;"
        "assert u.find_spec('passes') is None and u.find_spec('exporters') is None;"
        "print(sntfx.passes.SNTExpand.name)"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "snt"
