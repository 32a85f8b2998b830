"""Dataset loaders on real files (digits always, Fashion-MNIST when installed) and synthetic files in each format."""

from __future__ import annotations

import gzip
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from sntfx.data import DataError, load_data

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def test_digits_is_always_there_with_a_stratified_split():
    d = load_data("digits")
    assert len(d.train) + len(d.test) == 1797 and len(d.test) == 364
    assert d.info.num_classes == 10 and d.info.input_shape() == (1, 1, 8, 8)
    counts = torch.bincount(d.test.labels, minlength=10)
    assert counts.min() >= 35  # every class in the test split
    x, y = d.test[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= int(y) < 10


def test_augmentation_is_deterministic_per_seed_epoch_and_index():
    a, b = load_data("synthetic", seed=1), load_data("synthetic", seed=1)
    assert torch.equal(a.train[5][0], b.train[5][0])
    a.train.set_epoch(1)
    assert not torch.equal(a.train[5][0], b.train[5][0])
    b.train.set_epoch(1)
    assert torch.equal(a.train[5][0], b.train[5][0])
    assert torch.equal(a.test[3][0], b.test[3][0])  # no augmentation at test time


@pytest.mark.parametrize("augment, size", [("crop-flip", 16), ("crop", 16), ("none", 16), ("crop-flip", 8)])
def test_a_batch_fetched_at_once_is_bit_for_bit_the_images_fetched_one_by_one(augment, size):
    """DataLoader fetches a batch through __getitems__ (vectorised): the same tensors as __getitem__ per image,
    for every augmentation, pad (8x8 images pad 1, larger 4), epoch, and through a held-out subset."""
    from dataclasses import replace

    from torch.utils.data import DataLoader

    from sntfx.data import ImageTensorDataset, _Subset

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, size, size), dtype=torch.uint8, generator=g)
    info = replace(load_data("synthetic").info, augment=augment, channels=3, size=(size, size),
                   mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    ds = ImageTensorDataset(images, torch.arange(40) % 4, info, train=True, seed=7)
    order = [5, 0, 39, 5, 17, 2, 30]
    for epoch in (0, 3):
        ds.set_epoch(epoch)
        batch = ds.__getitems__(order)
        for i, (x, y) in zip(order, batch):
            ref_x, ref_y = ds[i]
            assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
    if augment != "none":  # the augmentation did something, so the comparison above compared crops
        assert not torch.equal(ds.__getitems__([5])[0][0], ((images[5].float() / 255 - ds._mean) / ds._std))
    sub = _Subset(ds, torch.tensor([3, 9, 1, 22]), train=True)
    assert all(torch.equal(a[0], ds[j][0]) for a, j in zip(sub.__getitems__([2, 0, 3]), [1, 3, 22]))
    eval_sub = _Subset(ds, torch.tensor([3, 9]), train=False)  # the held-out view is not augmented
    assert torch.equal(eval_sub.__getitems__([1])[0][0], ((images[9].float() / 255 - ds._mean) / ds._std))
    assert ds.train  # and the switch is restored

    class OneByOne(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return ds[i]

    sampler = [[3, 1, 4, 1, 5], [9, 2, 6]]
    for (xa, ya), (xb, yb) in zip(DataLoader(ds, batch_sampler=sampler), DataLoader(OneByOne(), batch_sampler=sampler)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)

    class Shifted(ImageTensorDataset):  # a subclass that changes its items keeps them when a DataLoader batches
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x + 1, y

    shifted = Shifted(images, torch.arange(40) % 4, info, train=False)
    (xs, _), = DataLoader(shifted, batch_sampler=[[0, 7]])
    assert torch.equal(xs, torch.stack([shifted[0][0], shifted[7][0]]))


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_the_debian_package():
    d = load_data("fashion-mnist")
    assert len(d.train) == 60000 and len(d.test) == 10000
    assert d.info.input_shape() == (1, 1, 28, 28) and d.info.classes[9] == "Ankle boot"
    assert torch.bincount(d.test.labels).tolist() == [1000] * 10


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_files_in_a_folder(tmp_path, gz):
    rng = np.random.default_rng(0)
    xtr, ytr = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 10, 20)
    xte, yte = rng.integers(0, 256, (10, 28, 28)), rng.integers(0, 10, 10)
    _write_idx(tmp_path / "train-images-idx3-ubyte", xtr, gz)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", ytr, gz)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", xte, gz)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", yte, gz)
    d = load_data("fashion-mnist", data_dir=str(tmp_path))
    assert len(d.train) == 20 and torch.equal(d.train.images[:, 0], torch.tensor(xtr, dtype=torch.uint8))
    assert d.test.labels.tolist() == yte.tolist()


def test_broken_idx_files_get_clear_errors(tmp_path):
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / stem).write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 5, 28, 28) + b"\x00" * 100)
    with pytest.raises(DataError, match="truncated"):
        load_data("fashion-mnist", data_dir=str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="bad magic"):
        load_data("fashion-mnist", data_dir=str(tmp_path))


def test_missing_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match=rf"looked in: {tmp_path}.*apt-get install dataset-fashion-mnist"):
        load_data("fashion-mnist", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="needs --data-dir"):
        load_data("cifar10")
    with pytest.raises(DataError, match="missing .*data_batch_1"):
        load_data("cifar10", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_data("imagenet")


def _cifar_batch(n, classes, label_key, seed):
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: list(rng.integers(0, classes, n)),
            b"filenames": [b"x.png"] * n}


def test_cifar10_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_batch(8, 10, b"labels", i), protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps(_cifar_batch(6, 10, b"labels", 9), protocol=2))
    d = load_data("cifar10", data_dir=str(tmp_path))
    assert len(d.train) == 40 and len(d.test) == 6 and d.info.input_shape() == (1, 3, 32, 32)
    first = _cifar_batch(8, 10, b"labels", 1)
    assert torch.equal(d.train.images[0], torch.tensor(first[b"data"][0].reshape(3, 32, 32)))


def test_cifar100_python_batches(tmp_path):
    (tmp_path / "train").write_bytes(pickle.dumps(_cifar_batch(10, 100, b"fine_labels", 1)))
    (tmp_path / "test").write_bytes(pickle.dumps(_cifar_batch(4, 100, b"fine_labels", 2)))
    d = load_data("cifar100", data_dir=str(tmp_path))
    assert d.info.num_classes == 100 and len(d.train) == 10


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["EVIL_MARK"],))


def test_cifar_pickle_cannot_run_code(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / name).write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}))
    with pytest.raises(DataError, match="refusing to load posix.system|refusing to load os.system"):
        load_data("cifar10", data_dir=str(tmp_path))
    assert not mark.exists()


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog", "eel"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    d = load_data(str(tmp_path))
    assert d.info.classes == ("cat", "dog", "eel") and d.info.num_classes == 3
    x, y = d.train[4]
    assert x.shape == (3, 20, 20) and int(y) == 1
    (tmp_path / "val" / "fox").mkdir()
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "val" / "fox" / "0.png")
    with pytest.raises(DataError, match="class folders"):
        load_data(str(tmp_path))


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_in_a_folder_dataset_is_named_with_the_fix(tmp_path, workers):
    """A file that is not an image (or is truncated) stops training with one clear line naming it, exit 2, and no
    output, also when DataLoader workers read it (torch re-raises their errors with a traceback in the text)."""
    from click.testing import CliRunner
    from PIL import Image

    from sntfx.cli import cli

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / "ds" / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
                    tmp_path / "ds" / split / cls / f"{i}.png")
    (tmp_path / "ds" / "train" / "dog" / "9.png").write_bytes(b"not an image")
    good = tmp_path / "ds" / "train" / "cat" / "0.png"
    (tmp_path / "ds" / "val" / "cat" / "9.jpg").write_bytes(good.read_bytes()[:40])  # truncated
    data = load_data(str(tmp_path / "ds"))
    bad = next(i for i, (p, _) in enumerate(data.train.samples) if p.endswith("9.png"))
    with pytest.raises(DataError, match=r"cannot read the image '.*9\.png' \(not an image format PIL reads\); remove"):
        data.train[bad]
    result = CliRunner().invoke(cli, ["train", "sntfx:cnn", "--data", str(tmp_path / "ds"), "--epochs", "1",
                                      "--workers", str(workers), "--out", str(tmp_path / "m.pt")])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert re.fullmatch(r"error: cannot read the image '.*9\.(png|jpg)' \(.*\); remove or replace that file and "
                        r"run again", message), message
    assert "Traceback" not in message and not (tmp_path / "m.pt").exists()
    truncated = next(i for i, (p, _) in enumerate(data.test.samples) if p.endswith("9.jpg"))
    with pytest.raises(DataError, match=r"cannot read the image '.*9\.jpg'"):  # a truncated file is refused too
        data.test[truncated]
