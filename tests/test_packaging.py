"""Packaging: passes/ and exporters/ install as sntfx.passes and sntfx.exporters only; torch is a range, not a pin."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _clean_source(tmp_path: Path) -> Path:
    """The source tree without build outputs: a stale build/ or egg-info would hide a package missing from
    pyproject.toml (setuptools reuses build/lib)."""
    import shutil

    dest = tmp_path / "src"
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "demo-results",
        "bench-results", "results"))
    return dest


def _expected_files() -> set[str]:
    """Every module of the source tree, as the wheel must name it."""
    names = {f"sntfx/{f.relative_to(ROOT / 'sntfx').as_posix()}" for f in (ROOT / "sntfx").rglob("*.py")}
    for folder in ("passes", "exporters"):
        names |= {f"sntfx/{folder}/{f.name}" for f in (ROOT / folder).glob("*.py")}
    return names


def test_wheel_contains_only_the_sntfx_package(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "w"),
         str(_clean_source(tmp_path))],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr
    wheel = next((tmp_path / "w").glob("sntfx-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    missing = sorted(_expected_files() - set(names))
    assert not missing, f"modules left out of the wheel (add their package to pyproject.toml): {missing}"
    top = {n.split("/")[0] for n in names}
    assert top <= {"sntfx", next(n.split("/")[0] for n in names if ".dist-info/" in n)}, top
    assert "sntfx/passes/snt_expand.py" in names and "sntfx/passes/snt_fold.py" in names
    assert "sntfx/exporters/__init__.py" in names
    assert "sntfx/schemas/study-results.schema.json" in names  # the study validates results.json against it
    assert not any(n.startswith(("passes/", "exporters/", "tests/")) for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    _check_ranges(requires)


TESTED = {"torch": "2.14.1", "torchvision": "0.29.1"}  # what `make install` puts in .venv (TESTED_PINS)


def _check_ranges(requirements: list[str]) -> dict:
    """torch and torchvision are required as ranges holding the tested versions, never pinned."""
    from packaging.requirements import Requirement

    found = {r.name: r for r in map(Requirement, requirements) if r.name in TESTED}
    assert set(found) == set(TESTED), requirements
    for name, req in found.items():
        ops = {spec.operator for spec in req.specifier}
        assert not ops & {"==", "===", "~="}, f"{name} is pinned ({req}): installing sntfx would replace the user's {name}"
        assert ">=" in ops and "<" in ops, f"{name} needs a lower and an upper bound: {req}"
        assert req.specifier.contains(TESTED[name]), f"{req} excludes the tested {name} {TESTED[name]}"
    return found


def test_torch_is_a_range_and_the_makefile_pins_the_tested_versions():
    import re
    import tomllib

    _check_ranges(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    makefile = (ROOT / "Makefile").read_text()
    pins = re.search(r"^TESTED_PINS\s*:=\s*(.*)$", makefile, flags=re.M)
    assert pins and dict(p.split("==") for p in pins.group(1).split()) == TESTED, pins
    install = re.search(r"^\$\(STAMP\):(.*)\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert install and "Makefile" in install.group(1), "the .venv must be rebuilt when the pins change"
    assert re.search(r"pip install .*-e '\.\[dev\]' \$\(TESTED_PINS\)", install.group(2)), install.group(2)


def test_installed_import_names(tmp_path):
    code = (
        "import importlib.util as u, sntfx, sntfx.passes, sntfx.exporters;"
        "assert u.find_spec('passes') is None and u.find_spec('exporters') is None;"
        "print(sntfx.passes.SNTExpand.name)"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "snt"


def test_normal_install_imports_from_site_packages(tmp_path):
    """A non-editable install of the wheel works on its own (no source tree needed)."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir),
         str(_clean_source(tmp_path))],
        check=True, capture_output=True, timeout=600,
    )
    wheel = next(wheel_dir.glob("sntfx-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    code = (
        "import sntfx, sntfx.passes, sntfx.exporters, sntfx.blocks.linear, sntfx.cli.study, torch;"
        f"assert sntfx.__file__.startswith({str(target)!r}), sntfx.__file__;"
        f"assert sntfx.passes.__file__.startswith({str(target)!r});"
        "gm = sntfx.transform('sntfx:cnn'); print(len(list(gm.modules())));"
        "import sntfx.study as st; assert st.SCHEMA_PATH.is_file()"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
