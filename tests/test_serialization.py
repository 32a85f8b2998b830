"""save/load: recipe + weights, rebuilt in a fresh process, no code executed from files."""

from __future__ import annotations

import json
import os
import pickletools
import subprocess
import sys
import zipfile

import pytest
import torch

import sntfx
from sntfx.graph_utils import randomize_
from sntfx.tracing import compare_outputs

MODEL_PY = '''
import torch
from torch import nn

def build_model(width=4):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))

def example_inputs():
    return torch.randn(2, 3, 6, 6)
'''


@pytest.fixture
def model_py(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(MODEL_PY)
    return path


@pytest.mark.parametrize("style", ["linear", "branch", "qa-branch"])
def test_roundtrip_in_a_fresh_process(tmp_path, model_py, style):
    x = torch.randn(2, 3, 6, 6)
    snt = sntfx.transform(str(model_py), x, style=style, ratio=2)
    randomize_(snt, 4)
    snt.eval()
    out = tmp_path / "snt.pt"
    sntfx.save(snt, out)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(snt(x), tmp_path / "want.pt")
    torch.save(snt.state_dict(), tmp_path / "state.pt")
    # the weights come back bit for bit; the outputs to float rounding (a kernel's summation order may depend on
    # the buffers' alignment, which differs from process to process)
    script = (
        "import torch, sntfx, sys\n"
        "m = sntfx.load(sys.argv[1])\n"
        "x = torch.load(sys.argv[2], weights_only=True)\n"
        "want = torch.load(sys.argv[3], weights_only=True)\n"
        "state = torch.load(sys.argv[4], weights_only=True)\n"
        "assert state.keys() == m.state_dict().keys()\n"
        "assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())\n"
        "with torch.no_grad(): got = m(x)\n"
        "assert sntfx.tracing.compare_outputs(got, want) <= 1e-6, (got - want).abs().max()\n"
        "print(type(m.get_submodule('0')).__name__)\n"
    )
    res = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "x.pt"), str(tmp_path / "want.pt"),
                          str(tmp_path / "state.pt")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() in ("LinearExpansion", "BranchBlock")


def test_folded_model_roundtrip_keeps_pipeline(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    snt = sntfx.transform("sntfx:resnet20", x, style="branch")
    randomize_(snt, 1)
    folded = sntfx.fold(snt, x, batchnorm=True)
    folded.eval()
    sntfx.save(folded, tmp_path / "f.pt", info={"note": "test"})
    recipe = sntfx.read_recipe(tmp_path / "f.pt")
    assert [p["name"] for p in recipe["pipeline"]] == ["snt", "fold", "fold_bn"]
    assert recipe["info"] == {"note": "test"} and recipe["versions"]["torch"] == torch.__version__
    loaded = sntfx.load(tmp_path / "f.pt")
    with torch.no_grad():
        assert compare_outputs(folded(x), loaded(x)) == 0.0


def test_file_holds_no_pickled_classes(tmp_path):
    """Only tensor-rebuild functions and storages are referenced by the pickle."""
    x = torch.randn(1, 3, 32, 32)
    sntfx.save(sntfx.transform("sntfx:resnet20", x, style="branch"), tmp_path / "m.pt")
    with zipfile.ZipFile(tmp_path / "m.pt") as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    refs = {arg for op, arg, _ in pickletools.genops(data) if op.name in ("GLOBAL", "STACK_GLOBAL")}
    allowed = {"torch._utils _rebuild_tensor_v2", "collections OrderedDict"}
    assert refs and all(r in allowed or (r.startswith("torch ") and r.endswith("Storage")) for r in refs), refs


class _Evil:
    def __reduce__(self):
        command = "touch " + os.environ["EVIL_MARK"]
        return (os.system, (command,))


def test_malicious_pickle_is_refused_without_running_it(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    bad = tmp_path / "evil.pt"
    torch.save({"format": "sntfx-model", "version": 1, "payload": _Evil()}, bad)
    with pytest.raises(sntfx.FileFormatError, match="not an sntfx model file, or it is damaged"):
        sntfx.load(bad)
    assert not mark.exists()


def test_other_files_and_tampering_get_clear_errors(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    good = tmp_path / "good.pt"
    sntfx.save(sntfx.transform("sntfx:resnet20", x, ratio=1), good)

    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(sntfx.FileFormatError, match=r"holds weights only \(a state dict\), not an sntfx model; "
                                                    r"load it into a model with --weights FILE"):
        sntfx.load(plain)
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, tmp_path / "w.safetensors")
    with pytest.raises(sntfx.FileFormatError, match="weights only.*--weights FILE"):
        sntfx.load(tmp_path / "w.safetensors")
    from sntfx.exporters import export_onnx

    export_onnx(sntfx.load(good), tmp_path / "m.onnx", x, allow_expanded=True)
    with pytest.raises(sntfx.FileFormatError, match=r"'.*m\.onnx' is an ONNX model, not an sntfx model file.*"
                                                    r"`sntfx bench` measures ONNX files"):
        sntfx.load(tmp_path / "m.onnx")
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    with pytest.raises(sntfx.FileFormatError, match="a torch file but not an sntfx model"):
        sntfx.load(listed)

    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(sntfx.FileFormatError, match=r"damaged \(it is not a torch file at all\)"):
        sntfx.load(text)

    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(sntfx.FileFormatError):
        sntfx.load(truncated)

    payload = torch.load(good, weights_only=True)
    key = next(k for k in payload["state_dict"] if k.endswith("weight"))
    payload["state_dict"][key] = payload["state_dict"][key] + 1
    edited = tmp_path / "edited.pt"
    torch.save(payload, edited)
    with pytest.raises(sntfx.FileFormatError, match="modified after it was written"):
        sntfx.load(edited)

    with pytest.raises(sntfx.FileFormatError, match="does not exist"):
        sntfx.load(tmp_path / "missing.pt")


def test_changed_or_moved_model_file(tmp_path, model_py):
    snt = sntfx.transform(str(model_py))
    out = tmp_path / "m.pt"
    sntfx.save(snt, out)
    model_py.write_text(MODEL_PY + "\n# edited\n")
    with pytest.raises(sntfx.ModelSpecError, match="changed since the model was saved"):
        sntfx.load(out)
    moved = tmp_path / "moved.py"
    moved.write_text(MODEL_PY)
    model_py.unlink()
    with pytest.raises(sntfx.ModelSpecError, match="does not exist"):
        sntfx.load(out)
    assert isinstance(sntfx.load(out, model_file=moved), torch.fx.GraphModule)


def test_save_needs_a_source(tmp_path):
    gm = sntfx.trace(torch.nn.Linear(3, 2), torch.randn(1, 3))
    with pytest.raises(sntfx.SntfxError, match="does not record where it came from"):
        sntfx.save(gm, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic(tmp_path, monkeypatch):
    snt = sntfx.transform("sntfx:cnn")
    out = tmp_path / "m.pt"
    out.write_bytes(b"previous")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        sntfx.save(snt, out)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_recipe_is_plain_json(tmp_path):
    sntfx.save(sntfx.transform("sntfx:cnn", style="branch"), tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    recipe = json.loads(payload["recipe"])
    assert recipe["source"] == {"kind": "sntfx", "name": "cnn", "entry": None, "kwargs": {}, "sha256": None}
    assert recipe["pipeline"][0]["params"]["policy"]["style"] == "branch"
