"""The trust boundary: a model file never makes sntfx import or run code the user has not trusted."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import sntfx
from sntfx import signing
from sntfx.cli import cli
from sntfx.errors import ModelSpecError, UntrustedSourceError
from sntfx.serialization import _digest

MODEL_PY = '''
import pathlib
import torch
from torch import nn

pathlib.Path({marker!r}).write_text("imported")  # the side effect that must not happen untrusted


def build_model():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


def example_inputs():
    return torch.randn(2, 1, 8, 8)
'''


def _rewrite(path: Path, *, source: dict | None = None, keep_signature: bool = False, signature=None) -> None:
    """Edit a saved file as an attacker can: new recipe source, digest recomputed, our signature dropped."""
    payload = torch.load(path, weights_only=True)
    recipe = json.loads(payload["recipe"])
    if source is not None:
        recipe["source"] = source
    payload["recipe"] = json.dumps(recipe, sort_keys=True)
    payload["digest"] = _digest(payload["recipe"], payload["state_dict"])
    if signature is not None:
        payload["signature"] = signature
    elif not keep_signature:
        payload.pop("signature", None)
    torch.save(payload, path)


@pytest.fixture
def crafted(tmp_path):
    """A file source and an import source, each with a correct digest and no signature of ours."""
    marker = tmp_path / "ran.txt"
    model_py = tmp_path / "model.py"
    model_py.write_text(MODEL_PY.format(marker=str(marker)))
    gm = sntfx.trace(str(model_py))
    marker.unlink()
    file_src = tmp_path / "file_source.pt"
    sntfx.save(gm, file_src)
    _rewrite(file_src)  # same recipe, signature gone: as if it came from someone else
    import_src = tmp_path / "import_source.pt"
    sntfx.save(gm, import_src)
    _rewrite(import_src, source={"kind": "import", "name": "subprocess", "entry": "run",
                                 "kwargs": {"args": ["touch", str(marker)]}})
    return {"file": file_src, "import": import_src, "marker": marker, "model_py": model_py, "dir": tmp_path}


def _digest_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["file", "import"])
def test_load_refuses_untrusted_code_sources_without_side_effect(crafted, kind):
    with pytest.raises(UntrustedSourceError, match="--trust-source"):
        sntfx.load(crafted[kind])
    assert not crafted["marker"].exists()


def test_load_with_opt_in_runs_the_source(crafted):
    gm = sntfx.load(crafted["file"], trust_source=True)
    assert crafted["marker"].read_text() == "imported"
    assert isinstance(gm, torch.fx.GraphModule)
    crafted["marker"].unlink()
    with pytest.raises(ModelSpecError, match="not an nn.Module"):  # subprocess.run ran, then was refused
        sntfx.load(crafted["import"], trust_source=True)
    assert crafted["marker"].exists()


def test_naming_the_model_file_trusts_it(crafted):
    gm = sntfx.load(crafted["file"], model_file=crafted["model_py"])
    assert isinstance(gm, torch.fx.GraphModule) and crafted["marker"].exists()


def test_a_trust_predicate_sees_the_recorded_source_and_decides(crafted):
    """``trust_source`` as a callable is asked about the recipe's source; False refuses before any import."""
    asked = []

    def only_model_py(spec):
        asked.append((spec.kind, spec.name))
        return spec.kind == "file" and Path(spec.name).name == "model.py"

    with pytest.raises(UntrustedSourceError):
        sntfx.load(crafted["import"], trust_source=only_model_py)
    assert asked == [("import", "subprocess")] and not crafted["marker"].exists()
    gm = sntfx.load(crafted["file"], trust_source=only_model_py)
    assert isinstance(gm, torch.fx.GraphModule) and crafted["marker"].exists()


def test_a_study_trusts_the_source_its_own_command_names(crafted, tmp_path):
    """A copied study folder (runs not signed here) resumes for the model file the command names, not for another."""
    from sntfx.study import Study, StudyConfig

    config = StudyConfig(models=[str(crafted["model_py"])], data="digits", methods=["adam"], seeds=[0], epochs=1,
                         limit_batches=1, eval_images=32, sharpness_batches=1, sharpness_iters=2, trace_samples=1,
                         landscape_steps=3, sparsities=[0.5], channel_sparsities=[0.2], bits=[4], act_bits=[],
                         onnx=False)
    out = tmp_path / "study"
    study = Study(config, out, stop_after=lambda run, stage: stage == "train")
    with pytest.raises(KeyboardInterrupt):
        study.run()
    model_pt = next(out.glob("runs/*/adam/seed0/model.pt"))
    _rewrite(model_pt)  # as if the folder came from another machine: our signature is gone
    crafted["marker"].unlink()
    resumed = Study(config, out)
    resumed.run()
    assert ("evaluate" in {stage for _, stage in resumed.executed}) and crafted["marker"].exists()
    _rewrite(model_pt, source={"kind": "import", "name": "subprocess", "entry": "run",
                               "kwargs": {"args": ["touch", str(tmp_path / "other")]}})
    (model_pt.parent / "evaluate.json").unlink()
    with pytest.raises(UntrustedSourceError):
        Study(config, out).run()
    assert not (tmp_path / "other").exists()


def test_files_saved_here_are_trusted_by_their_signature(crafted, tmp_path):
    gm = sntfx.load(crafted["file"], trust_source=True)
    mine = tmp_path / "mine.pt"
    sntfx.save(gm, mine)
    sntfx.load(mine)  # our own key: no flag needed
    key = signing.key_path()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600  # the secret is never wider, whatever the umask


def test_a_signature_is_bound_to_its_file(crafted, tmp_path):
    gm = sntfx.load(crafted["file"], trust_source=True)
    mine = tmp_path / "mine.pt"
    sntfx.save(gm, mine)
    stolen = torch.load(mine, weights_only=True)["signature"]
    # a valid signature copied onto another file with a different recipe does not make it trusted
    _rewrite(crafted["import"], signature=stolen)
    crafted["marker"].unlink(missing_ok=True)
    with pytest.raises(UntrustedSourceError):
        sntfx.load(crafted["import"])
    assert not crafted["marker"].exists()


def test_another_users_key_is_not_ours(crafted, tmp_path, monkeypatch):
    gm = sntfx.load(crafted["file"], trust_source=True)
    theirs = tmp_path / "theirs.pt"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "their-config"))
    sntfx.save(gm, theirs)  # signed with a fresh key, not ours
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "our-config"))
    with pytest.raises(UntrustedSourceError):
        sntfx.load(theirs)


def test_zoo_sources_need_no_trust_but_cannot_load_weights(tmp_path):
    gm = sntfx.trace("sntfx:cnn")
    path = tmp_path / "zoo.pt"
    sntfx.save(gm, path)
    _rewrite(path)
    sntfx.load(path)  # a known architecture: allowed without opt-in
    _rewrite(path, source={"kind": "timm", "name": "resnet18", "entry": None, "sha256": None,
                           "kwargs": {"checkpoint_path": str(path)}})
    with pytest.raises(ModelSpecError, match="load or download weights"):
        sntfx.load(path, trust_source=True)


# Every command that reads a model file, with the arguments that make it reach the load.
def _commands(f: Path, out: Path) -> dict[str, list[str]]:
    return {
        "fold": ["fold", str(f), "--out", str(out / "o.pt")],
        "inspect": ["inspect", str(f)],
        "export": ["export", str(f), "--onnx", str(out / "o.onnx")],
        "train": ["train", str(f), "--data", "digits", "--epochs", "1", "--limit-batches", "1", "--out",
                  str(out / "o.pt")],
        "sharpness": ["sharpness", str(f), "--data", "digits", "--out", str(out / "o.json")],
        "prune": ["prune", str(f), "--sparsity", "0.5", "--out", str(out / "o.pt")],
        "quantize": ["quantize", str(f), "--out", str(out / "o.pt")],
        "sweep": ["sweep", str(f), "--data", "digits", "--out", str(out / "o.json")],
        "study": ["study", "--model", str(f), "--data", "digits", "--methods", "adam", "--seeds", "0", "--epochs",
                  "1", "--limit-batches", "1", "--no-onnx", "--out", str(out / "study")],
    }


@pytest.mark.parametrize("kind", ["file", "import"])
@pytest.mark.parametrize("command", list(_commands(Path("f"), Path("o"))))
def test_every_command_refuses_untrusted_sources(crafted, kind, command):
    out = crafted["dir"] / "out"
    out.mkdir()
    before = _digest_of(crafted[kind])
    res = CliRunner().invoke(cli, _commands(crafted[kind], out)[command])
    assert res.exit_code == 2, res.output
    assert "--trust-source" in res.output and "Traceback" not in res.output
    assert not crafted["marker"].exists(), "the recipe's code ran"
    assert list(out.iterdir()) == [], "a refused command wrote output"
    assert _digest_of(crafted[kind]) == before


def test_cli_opt_in_and_model_file(crafted):
    out = crafted["dir"] / "out"
    out.mkdir()
    runner = CliRunner()
    res = runner.invoke(cli, ["inspect", str(crafted["file"]), "--trust-source"])
    assert res.exit_code == 0, res.output
    assert crafted["marker"].exists()
    res = runner.invoke(cli, ["fold", str(crafted["file"]), "--model-file", str(crafted["model_py"]),
                              "--out", str(out / "f.pt")])
    assert res.exit_code == 0, res.output


def test_trust_flags_are_refused_where_nothing_is_loaded(tmp_path):
    res = CliRunner().invoke(cli, ["inspect", "sntfx:cnn", "--trust-source"])
    assert res.exit_code == 2 and "saved model file" in res.output


def test_untrusted_sources_are_refused_before_anything_is_imported(crafted, monkeypatch):
    import importlib

    calls = []
    monkeypatch.setattr(importlib, "import_module", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(importlib.util, "spec_from_file_location", lambda *a, **k: calls.append(a))
    for kind in ("file", "import"):
        with pytest.raises(UntrustedSourceError):
            sntfx.load(crafted[kind])
    assert calls == []


def test_written_files_honour_the_umask(tmp_path):
    gm = sntfx.trace("sntfx:cnn")
    old = os.umask(0o027)
    try:
        path = sntfx.save(gm, tmp_path / "m.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
