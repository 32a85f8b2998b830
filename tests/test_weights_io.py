"""Weights in and out: --weights and --pretrained (local caches only), transform --data, fold --state-dict.

Nothing here touches the network: the download functions of torch.hub and
huggingface_hub and socket connections fail the test if anything calls them,
and the "pretrained" files are random weights written into a temporary cache.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import sntfx
from sntfx.cli import cli
from sntfx.data import DatasetInfo
from sntfx.errors import SntfxError, WeightsError

X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Any download or connection fails the test; the caches are empty temporary folders unless a test fills them."""
    import huggingface_hub
    import huggingface_hub.file_download

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def refused(res, out_dir: Path, *words: str) -> str:
    """Exit 2, one `error:` paragraph naming ``words``, no traceback, nothing in ``out_dir``."""
    assert res.exit_code == 2, f"exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    for word in words:
        assert word in res.output.replace("\n", " "), res.output
    assert not any(out_dir.iterdir()), list(out_dir.iterdir())
    return errors[0]


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def seeded(factory, seed: int = 1):
    torch.manual_seed(seed)
    return factory()


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


# --------------------------------------------------------------------------- reading weights files


def test_state_dict_files_of_every_accepted_form_load_the_same_weights(tmp_path):
    ref = seeded(lambda: sntfx.build_model("sntfx:cnn"))
    state = ref.state_dict()
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pth")
    torch.save({"model": state, "optimizer": {"lr": torch.tensor(0.1)}}, tmp_path / "ckpt2.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    x = torch.randn(2, 1, 28, 28)
    for name in ("w.safetensors", "w.pt", "ckpt.pth", "ckpt2.pt", "ddp.pt"):
        model = sntfx.load_weights(seeded(lambda: sntfx.build_model("sntfx:cnn"), seed=7), tmp_path / name)
        assert torch.equal(outputs(model, x), outputs(ref, x)), name


def test_python_api_takes_weights_and_pretrained(tmp_path):
    ref = seeded(lambda: sntfx.build_model("sntfx:cnn", num_classes=4))
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    x = torch.randn(1, 1, 28, 28)
    built = sntfx.build_model("sntfx:cnn", weights=tmp_path / "w.safetensors", num_classes=4)
    assert torch.equal(outputs(built, x), outputs(ref, x))
    spec = sntfx.ModelSpec.parse("sntfx:cnn", kwargs={"num_classes": 4})
    gm = sntfx.transform(spec, x, weights=tmp_path / "w.safetensors", preserve=True, style="linear", ratio=2)
    torch.testing.assert_close(outputs(gm, x), outputs(ref, x))
    # the keyword arguments that used to be refused (or a TypeError) work when they ask for nothing
    assert isinstance(sntfx.build_model("torchvision:resnet18", weights=None, pretrained=False, num_classes=3),
                      torch.nn.Module)
    with pytest.raises(SntfxError, match="apply when the model is a spec"):
        sntfx.trace(ref, x, weights=tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="local cache"):
        sntfx.trace("timm:resnet18", X32, pretrained=True)


# --------------------------------------------------------------------------- transform --weights --preserve, fold back


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_transform_preserve_on_loaded_weights_keeps_their_function_and_folds_back(tmp_path, suffix):
    ref = seeded(lambda: sntfx.build_model("sntfx:cnn"), seed=5)
    weights = tmp_path / f"mine{suffix}"
    save_file(ref.state_dict(), weights) if suffix == ".safetensors" else torch.save(ref.state_dict(), weights)
    res = run("transform", "sntfx:cnn", "--weights", weights, "--preserve", "--input-shape", "2,1,28,28",
              "--out", tmp_path / "snt.pt")
    assert res.exit_code == 0, res.output
    x = torch.randn(4, 1, 28, 28)
    snt = sntfx.load(tmp_path / "snt.pt")
    torch.testing.assert_close(outputs(snt, x), outputs(ref, x), rtol=1e-4, atol=1e-5)
    recorded = sntfx.read_recipe(tmp_path / "snt.pt")["info"]["initial_weights"]
    assert recorded == {"file": weights.name, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    sd = tmp_path / f"deploy{suffix}"
    res = run("fold", tmp_path / "snt.pt", "--out", tmp_path / "folded.pt", "--state-dict", sd)
    assert res.exit_code == 0, res.output
    torch.testing.assert_close(outputs(sntfx.load(tmp_path / "folded.pt"), x), outputs(ref, x), rtol=1e-4, atol=1e-5)
    state = load_file(sd) if suffix == ".safetensors" else torch.load(sd, weights_only=True)
    fresh = sntfx.build_model("sntfx:cnn")
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(outputs(fresh, x), outputs(ref, x), rtol=1e-4, atol=1e-5)
    for name, tensor in ref.state_dict().items():  # the loaded weights come back
        torch.testing.assert_close(state[name].to(tensor.dtype), tensor, rtol=1e-4, atol=1e-5)
    assert (sd.stat().st_mode & 0o777) == 0o666 & ~sntfx.io.current_umask()


# --------------------------------------------------------------------------- fold --state-dict for the original class


def _torchvision():
    return torchvision.models.resnet18(num_classes=5)


def _timm():
    return timm.create_model("resnet18", pretrained=False, num_classes=5)


def _builtin():
    return sntfx.build_model("sntfx:resnet20", num_classes=5)


@pytest.mark.parametrize("spec,factory,suffix", [
    ("torchvision:resnet18", _torchvision, ".safetensors"),
    ("timm:resnet18", _timm, ".pt"),
    ("sntfx:resnet20", _builtin, ".safetensors"),
])
def test_fold_state_dict_loads_strictly_into_a_fresh_original(tmp_path, spec, factory, suffix):
    ref = seeded(factory, seed=2)
    save_file(ref.state_dict(), tmp_path / "init.safetensors")
    res = run("transform", spec, "--kwargs", '{"num_classes": 5}', "--weights", tmp_path / "init.safetensors",
              "--input-shape", "1,3,32,32", "--style", "linear", "--ratio", "2", "--out", tmp_path / "snt.pt")
    assert res.exit_code == 0, res.output
    snt = sntfx.load(tmp_path / "snt.pt")
    with torch.no_grad():  # pretend training changed the weights: the state dict must carry what was measured
        for p in snt.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sntfx.save(snt, tmp_path / "trained.pt")
    res = run("fold", tmp_path / "trained.pt", "--out", tmp_path / "folded.pt", "--state-dict", tmp_path / f"w{suffix}")
    assert res.exit_code == 0, res.output
    written = tmp_path / f"w{suffix}"
    state = load_file(written) if suffix == ".safetensors" else torch.load(written, weights_only=True)
    fresh = seeded(factory, seed=9)
    fresh.load_state_dict(state, strict=True)
    folded = sntfx.load(tmp_path / "folded.pt")
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(outputs(fresh, x), outputs(folded, x), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(outputs(fresh, x), outputs(ref, x))  # the trained weights, not the initial ones


def test_state_dict_alone_and_the_python_api(tmp_path):
    x = torch.randn(2, 1, 28, 28)
    snt = sntfx.transform("sntfx:cnn", x, style="linear", ratio=2)
    sntfx.save(snt, tmp_path / "snt.pt")
    res = run("fold", tmp_path / "snt.pt", "--state-dict", tmp_path / "w.pth")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snt.pt", "w.pth"]
    folded = sntfx.fold(snt)
    state = sntfx.original_state_dict(folded)
    fresh = sntfx.build_model("sntfx:cnn")
    fresh.load_state_dict(torch.load(tmp_path / "w.pth", weights_only=True), strict=True)
    torch.testing.assert_close(outputs(fresh, x), outputs(folded, x))
    assert state.keys() == fresh.state_dict().keys()
    with pytest.raises(WeightsError, match="fold it first"):
        sntfx.original_state_dict(snt)


def test_fold_state_dict_refuses_batchnorm_folding(tmp_path, out):
    x = torch.randn(2, 1, 28, 28)
    sntfx.save(sntfx.transform("sntfx:cnn", x, style="linear", ratio=2), tmp_path / "snt.pt")
    res = run("fold", tmp_path / "snt.pt", "--batchnorm", "--out", out / "f.pt", "--state-dict", out / "w.safetensors")
    refused(res, out, "BatchNorm", "--batchnorm", "no longer fit")


# --------------------------------------------------------------------------- transform --data


def test_transform_data_fits_every_family_to_the_dataset(tmp_path):
    cases = {"sntfx:cnn": {"in_channels": 1, "num_classes": 10},
             "sntfx:smallvgg": {"in_channels": 1, "num_classes": 10, "image_size": 8},
             "torchvision:resnet18": {"in_channels": 1, "num_classes": 10},
             "timm:resnet18": {"in_chans": 1, "num_classes": 10}}
    for spec, kwargs in cases.items():
        path = tmp_path / f"{spec.replace(':', '_')}.pt"
        res = run("transform", spec, "--data", "digits", "--style", "linear", "--ratio", "2", "--out", path)
        assert res.exit_code == 0, res.output
        recipe = sntfx.read_recipe(path)
        assert recipe["source"]["kwargs"] == kwargs and recipe["input_spec"][0]["shape"] == [1, 1, 8, 8], spec
        gm = sntfx.load(path)  # the recorded stem rebuilds
        assert outputs(gm, torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_transform_data_keeps_given_kwargs_and_refuses_a_model_that_does_not_fit(out):
    res = run("transform", "sntfx:cnn", "--data", "digits", "--kwargs", '{"num_classes": 3}', "--out", out / "o.pt")
    refused(res, out, "10 classes", "sntfx:cnn takes in_channels, num_classes", '"num_classes": 10')
    res = run("transform", "sntfx:cnn", "--data", "digits", "--input-shape", "1,1,8,8", "--out", out / "o.pt")
    refused(res, out, "--input-shape")


def test_fit_hints_name_each_familys_own_arguments():
    from sntfx.workflow import fit_hint

    info = DatasetInfo("fashion-mnist", 10, 1, (28, 28), (0.5,), (0.5,))
    assert '"in_chans": 1, "num_classes": 10' in fit_hint("timm", "resnet18", info)
    tv = fit_hint("torchvision", "resnet18", info)
    assert "no input-channels argument" in tv and "--data fashion-mnist" in tv and "model file" in tv
    assert '"image_size": 28' in fit_hint("sntfx", "smallvgg", info)
    assert "image_size" not in fit_hint("sntfx", "cnn", info)
    assert "its own arguments" in fit_hint("file", "/x/model.py", info)
    assert "transform the model again with --data" in fit_hint("timm", "resnet18", info, saved=True)


def test_training_a_saved_torchvision_model_on_other_channels_says_how(tmp_path, out):
    res = run("transform", "torchvision:resnet18", "--input-shape", "1,3,16,16", "--style", "linear", "--ratio", "2",
              "--out", tmp_path / "tv.pt")
    assert res.exit_code == 0, res.output
    res = run("train", tmp_path / "tv.pt", "--data", "digits", "--epochs", "1", "--limit-batches", "1",
              "--out", out / "o.pt")
    refused(res, out, "no input-channels argument", "--data digits")


def test_train_starts_from_weights(tmp_path):
    ref = seeded(lambda: sntfx.build_model("sntfx:cnn", in_channels=1, num_classes=10), seed=4)
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    res = run("train", "sntfx:cnn", "--data", "digits", "--epochs", "1", "--limit-batches", "1", "--lr", "1e-9",
              "--weights", tmp_path / "w.safetensors", "--out", tmp_path / "t.pt")
    assert res.exit_code == 0, res.output
    trained = sntfx.load(tmp_path / "t.pt")
    assert sntfx.read_recipe(tmp_path / "t.pt")["info"]["initial_weights"]["file"] == "w.safetensors"
    torch.testing.assert_close(trained.state_dict()["features.0.weight"], ref.state_dict()["features.0.weight"],
                               rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- --pretrained, from the local caches


def _torchvision_cache(seed: int = 3) -> torch.nn.Module:
    folder = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    ref = seeded(torchvision.models.resnet18, seed)
    torch.save(ref.state_dict(), folder / "resnet18-f37072fd.pth")
    return ref


def _timm_cache(seed: int = 4) -> torch.nn.Module:
    repo = Path(os.environ["HF_HUB_CACHE"]) / "models--timm--resnet18.a1_in1k"
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    ref = seeded(lambda: timm.create_model("resnet18", pretrained=False), seed)
    save_file(ref.state_dict(), repo / "snapshots" / "0123abc" / "model.safetensors")
    return ref


@pytest.mark.parametrize("spec,cache", [("torchvision:resnet18", _torchvision_cache), ("timm:resnet18", _timm_cache)])
def test_pretrained_from_the_local_cache_preserved_by_transform(tmp_path, spec, cache):
    ref = cache()
    res = run("transform", spec, "--pretrained", "--preserve", "--input-shape", "1,3,32,32", "--style", "linear",
              "--ratio", "2", "--out", tmp_path / "snt.pt")
    assert res.exit_code == 0, res.output
    torch.testing.assert_close(outputs(sntfx.load(tmp_path / "snt.pt"), X32), outputs(ref, X32), rtol=1e-4, atol=1e-4)
    assert sntfx.read_recipe(tmp_path / "snt.pt")["source"]["kwargs"] == {}  # nothing that would load weights again


@pytest.mark.parametrize("spec,cache", [("torchvision:resnet18", _torchvision_cache), ("timm:resnet18", _timm_cache)])
def test_pretrained_with_data_adapts_the_stem_and_starts_the_classifier_fresh(tmp_path, spec, cache):
    ref = cache()
    res = run("transform", spec, "--pretrained", "--data", "digits", "--style", "linear", "--ratio", "2",
              "--out", tmp_path / "snt.pt")
    assert res.exit_code == 0, res.output
    model = sntfx.build_model(spec, pretrained=True, **sntfx.read_recipe(tmp_path / "snt.pt")["source"]["kwargs"])
    assert torch.equal(model.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)
    torch.testing.assert_close(model.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))
    assert model.fc.weight.shape == (10, 512)


def test_torchvision_weights_argument_reads_the_cache():
    ref = _torchvision_cache()
    model = sntfx.build_model("torchvision:resnet18", weights="DEFAULT")
    assert torch.equal(outputs(model, X32), outputs(ref, X32))
    model = sntfx.build_model("torchvision:resnet18", weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    assert torch.equal(outputs(model, X32), outputs(ref, X32))


@pytest.mark.parametrize("spec,where", [("torchvision:resnet18", "resnet18-f37072fd.pth"),
                                        ("timm:resnet18", "models--timm--resnet18.a1_in1k")])
def test_pretrained_without_a_cached_file_is_refused_without_downloading(out, spec, where):
    res = run("transform", spec, "--pretrained", "--out", out / "o.pt")
    refused(res, out, "never downloads", where, "--weights FILE")


# --------------------------------------------------------------------------- bad weights: exit 2, nothing written


@pytest.fixture
def bad_files(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    ref = seeded(lambda: sntfx.build_model("sntfx:cnn", num_classes=10))
    (d / "text.pt").write_text("not weights\n")
    (d / "random.safetensors").write_bytes(bytes(range(256)) * 4)
    (d / "weights.npz").write_bytes(b"PK\x03\x04")
    save_file(ref.state_dict(), d / "ok.safetensors")
    torch.save(ref, d / "module.pt")  # a pickled module: unpickling would run code

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'pwned'}",))

    torch.save({"conv.weight": torch.ones(1), "payload": Payload()}, d / "evil.pt")
    torch.save({k: v for k, v in ref.state_dict().items() if not k.startswith("classifier")}, d / "partial.pt")
    torch.save({"epoch": 3, "lr": 0.1}, d / "not_state.pt")
    sntfx.save(sntfx.trace("sntfx:cnn", torch.zeros(1, 1, 28, 28)), d / "sntfx_model.pt")
    digests = {p: p.read_bytes() for p in d.iterdir()}
    yield d
    assert not (d / "pwned").exists()
    assert {p: p.read_bytes() for p in d.iterdir()} == digests  # inputs intact


@pytest.mark.parametrize("name,kwargs,words", [
    ("text.pt", None, ["not a readable torch file"]),
    ("random.safetensors", None, ["not a valid safetensors file"]),
    ("weights.npz", None, [".safetensors", ".pt"]),
    ("module.pt", None, ["Python objects", "weights_only", "state_dict()"]),
    ("evil.pt", None, ["Python objects", "refuses"]),
    ("partial.pt", None, ["missing classifier.bias, classifier.weight"]),
    ("ok.safetensors", '{"num_classes": 3}', ["classifier.weight (10, 64) in the weights vs (3, 64)", "num_classes"]),
    ("not_state.pt", None, ["not a state dict", "epoch"]),
    ("sntfx_model.pt", None, ["sntfx model file", "--state-dict"]),
])
def test_bad_weights_are_refused_cleanly(bad_files, out, name, kwargs, words):
    args = ["transform", "sntfx:cnn", "--weights", bad_files / name, "--out", out / "o.pt"]
    res = run(*args, *(["--kwargs", kwargs] if kwargs else []))
    refused(res, out, *words)


def test_weights_do_not_fit_a_model_fitted_to_the_data(bad_files, out):
    res = run("train", "sntfx:cnn", "--data", "synthetic", "--epochs", "1", "--weights", bad_files / "ok.safetensors",
              "--out", out / "o.pt")
    refused(res, out, "--data set", "shape")


@pytest.mark.parametrize("args,words", [
    (["transform", "sntfx:cnn", "--pretrained"], ["--pretrained", "--weights FILE"]),
    (["transform", "timm:resnet18", "--pretrained", "--weights", "{ok}"], ["choose one"]),
    (["transform", "sntfx:cnn", "--weights", "{in}/missing.pt"], ["does not exist"]),
    (["train", "{in}/sntfx_model.pt", "--data", "digits", "--weights", "{ok}"], ["--weights", "model spec"]),
    (["fold", "{in}/sntfx_model.pt"], ["--state-dict"]),
    (["fold", "{in}/sntfx_model.pt", "--state-dict", "{out}/w.onnx"], [".safetensors"]),
    (["fold", "{in}/sntfx_model.pt", "--out", "{out}/w.pt", "--state-dict", "{out}/w.pt"], ["same file"]),
    (["fold", "{in}/sntfx_model.pt", "--state-dict", "{in}/sntfx_model.pt"], ["input file"]),
])
def test_bad_weight_options_are_refused_cleanly(bad_files, out, args, words):
    subst = {"{ok}": str(bad_files / "ok.safetensors"), "{in}": str(bad_files), "{out}": str(out)}
    argv = []
    for a in args:
        for k, v in subst.items():
            a = a.replace(k, v)
        argv.append(a)
    if argv[0] in ("transform", "train") and "--out" not in argv:
        argv += ["--out", str(out / "o.pt")]
    refused(run(*argv), out, *words)
