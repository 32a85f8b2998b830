"""Datasets from local files and packages; nothing is ever downloaded.

``load_data(name_or_dir)`` returns a :class:`Data` with train and test
datasets and a :class:`DatasetInfo` (classes, channels, size, normalisation).

==================== =========================================================
``--data``           where it comes from
==================== =========================================================
``digits``           scikit-learn's bundled 8x8 digits (always available),
                     a fixed stratified 80/20 split
``fashion-mnist``    IDX files (``train-images-idx3-ubyte[.gz]`` ...) in
                     ``--data-dir``, else ``/usr/share/datasets/fashion-mnist``
                     (Debian package ``dataset-fashion-mnist``)
``cifar10``          the python-pickle batches (``data_batch_1..5``,
                     ``test_batch``) in ``--data-dir`` or its
                     ``cifar-10-batches-py`` folder
``cifar100``         ``train`` / ``test`` pickles (``cifar-100-python``)
``synthetic``        generated class-dependent patterns, for tests
a directory          ImageFolder layout: ``DIR/train/CLASS/*.png`` and
                     ``DIR/val/CLASS/*`` (or ``test/``), e.g. ImageNet
==================== =========================================================

CIFAR batches are pickles; they are read with an unpickler that only
rebuilds numpy arrays, lists, dicts and strings, so a crafted file cannot run
code. Training augmentation is deterministic: each sample's random crop and
flip come from a generator seeded by ``(seed, epoch, index)``, so a resumed
run sees exactly the same inputs.
"""

from __future__ import annotations

import gzip
import logging
import pickle
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import SntfxError

__all__ = [
    "DatasetInfo",
    "Data",
    "ImageTensorDataset",
    "load_data",
    "fixed_batches",
    "hold_out",
    "DATASETS",
    "DataError",
    "FASHION_MNIST_DIRS",
]

log = logging.getLogger(__name__)

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "synthetic")


class DataError(SntfxError):
    """A dataset is missing or malformed."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"  # "crop-flip" (pad 4, random crop, horizontal flip) | "crop" | "none"
    classes: tuple[str, ...] = ()

    def input_shape(self, batch: int = 1) -> tuple[int, ...]:
        return (batch, self.channels, *self.size)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "channels": self.channels,
                "size": list(self.size), "augment": self.augment}


class ImageTensorDataset(Dataset):
    """uint8 images ``(N, C, H, W)`` and labels in memory; normalised float output.

    ``train=True`` applies the dataset's augmentation, deterministically per
    ``(seed, epoch, index)``; call :meth:`set_epoch` at each epoch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, *, train: bool, seed: int = 0):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"{info.name}: expected uint8 images of shape (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels, self.info = images, labels.long(), info
        self.train, self.seed, self.epoch = train, seed, 0
        self._mean = torch.tensor(info.mean).view(-1, 1, 1)
        self._std = torch.tensor(info.std).view(-1, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def _sample_seed(self, i: int) -> int:
        return (self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i)

    def __getitem__(self, i: int):
        x = self.images[i].float().div_(255.0)
        if self.train and self.info.augment != "none":
            x = _augment_batch(x[None], self.info.augment, [self._sample_seed(i)])[0]
        return (x - self._mean) / self._std, self.labels[i]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A batch at once (``DataLoader`` calls this when it batches): bit for bit ``[self[i] for i in indices]``,
        with the per-image work done on the whole batch. Each image's crop and flip are still drawn from its
        own seed, so a batch does not depend on which images share it."""
        if type(self).__getitem__ is not ImageTensorDataset.__getitem__:  # a subclass's own item: keep it
            return [self[i] for i in indices]
        idx = torch.as_tensor([int(i) for i in indices], dtype=torch.long)
        x = self.images[idx].float().div_(255.0)
        if self.train and self.info.augment != "none":
            x = _augment_batch(x, self.info.augment, [self._sample_seed(i) for i in indices])
        return list(zip(((x - self._mean) / self._std).unbind(0), self.labels[idx].unbind(0)))


def _augment_pad(h: int, w: int) -> int:
    return 4 if min(h, w) >= 16 else 1


def _augment_draws(kind: str, seed: int, pad: int, gen: torch.Generator) -> tuple[int, int, bool]:
    """An image's crop offsets and flip, from its own seed (``gen`` is reseeded: one object serves a batch)."""
    gen.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    flip = kind == "crop-flip" and bool(torch.rand((), generator=gen) < 0.5)
    return dy, dx, flip


def _augment_batch(x: torch.Tensor, kind: str, seeds: list[int]) -> torch.Tensor:
    """Each image of ``x`` (``(B, C, H, W)``) padded, cropped at its seed's offsets and flipped if its seed says so,
    as one gather."""
    b, c, h, w = x.shape
    pad = _augment_pad(h, w)
    gen = torch.Generator()
    draws = torch.tensor([_augment_draws(kind, s, pad, gen) for s in seeds], dtype=torch.long).reshape(b, 3)
    dy, dx, flip = draws[:, :1], draws[:, 1:2], draws[:, 2:].bool()
    rows = dy + torch.arange(h)  # (B, H): the crop's rows in the padded image
    cols = dx + torch.where(flip, torch.arange(w - 1, -1, -1), torch.arange(w))  # (B, W), reversed when flipped
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


@dataclass
class Data:
    train: Dataset
    test: Dataset
    info: DatasetInfo
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    val: Dataset | None = None  # held out from the training split by :func:`hold_out`

    def evaluated_on(self, name: str) -> Data:
        """This data with its ``"val"`` or ``"test"`` split as ``test``, the split trainers and sweeps read."""
        return replace(self, test=self.split(name))

    def split(self, name: str) -> Dataset:
        """The ``"val"`` or ``"test"`` split; a clear error when no validation split was held out."""
        if name == "test":
            return self.test
        if name == "val":
            if self.val is None:
                raise DataError("no validation split: hold images out of the training split first "
                                "(sntfx.data.hold_out(data, n), or val_images = N in a study)")
            return self.val
        raise DataError(f"unknown split '{name}'; use val or test")


class _Subset(Dataset):
    """Items ``indices`` of ``dataset``, forwarding its augmentation switches (``train``, ``seed``, ``set_epoch``)."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor, *, train: bool):
        self.dataset, self.indices, self.train = dataset, indices, train

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list:
        """The wrapped dataset's items at these positions, batched where it batches (``DataLoader`` calls this)."""
        saved = getattr(self.dataset, "train", None)
        if saved is not None:
            self.dataset.train = self.train
        try:
            inner = [int(self.indices[int(i)]) for i in indices]
            fetch = getattr(self.dataset, "__getitems__", None)
            return fetch(inner) if fetch is not None else [self.dataset[i] for i in inner]
        finally:
            if saved is not None:
                self.dataset.train = saved

    def __getattr__(self, name: str):  # seed, epoch, set_epoch, info, ... of the wrapped dataset
        if name in ("dataset", "indices", "train"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __setattr__(self, name: str, value) -> None:
        if name in ("dataset", "indices", "train"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.dataset, name, value)


def _labels_of(dataset: Dataset) -> torch.Tensor:
    for attr in ("labels", "targets"):
        if hasattr(dataset, attr):
            return torch.as_tensor(getattr(dataset, attr)).long()
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])


def hold_out(data: Data, n: int, *, seed: int = 0) -> Data:
    """``data`` with ``n`` training images moved into a validation split (``data.val``), stratified by class.

    The split depends on ``n`` and ``seed`` only, so every run of a study
    holds out the same images. Validation images are not augmented; the
    normalisation statistics stay those of the whole training split.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n < len(data.train):
        raise DataError(f"the validation split must hold between 1 and {len(data.train) - 1} of the "
                        f"{len(data.train)} training images of {data.info.name}, not {n!r}")
    labels = _labels_of(data.train)
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(len(labels), dtype=torch.float64)
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        rank = torch.empty(len(idx), dtype=torch.float64)
        rank[torch.randperm(len(idx), generator=gen)] = torch.arange(len(idx), dtype=torch.float64)
        order[idx] = (rank + 0.5) / len(idx)  # each class's images spread evenly over [0, 1): a proportional draw
    picked = torch.sort(order, stable=True).indices[:n]
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[picked] = True
    keep, val = torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()
    train = data.train
    if isinstance(train, ImageTensorDataset):
        new_train = ImageTensorDataset(train.images[keep], train.labels[keep], train.info, train=train.train,
                                       seed=train.seed)
        new_val = ImageTensorDataset(train.images[val], train.labels[val], train.info, train=False)
    else:
        new_train, new_val = _Subset(train, keep, train=True), _Subset(train, val, train=False)
    return Data(new_train, data.test, data.info, data.source, dict(data.extra), val=new_val)


def fixed_batches(dataset: Dataset, *, batches: int, batch_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded random batches without augmentation (for sharpness and calibration)."""
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[: batches * batch_size]
    augment = getattr(dataset, "train", None)
    if augment is not None:
        dataset.train = False
    try:
        out = []
        for chunk in idx.split(batch_size):
            items = [dataset[int(i)] for i in chunk]
            out.append((torch.stack([x for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])))
        return out
    finally:
        if augment is not None:
            dataset.train = augment


# -- loaders -------------------------------------------------------------------

def _digits(seed: int) -> Data:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(np.clip(d.images * 16.0, 0, 255).astype(np.uint8)).unsqueeze(1)
    labels = torch.tensor(d.target)
    # Fixed stratified split: every fifth sample of each class is a test sample.
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        test_mask[idx[::5]] = True
    info = DatasetInfo("digits", 10, 1, (8, 8), _mean(images[~test_mask]), _std(images[~test_mask]), "crop",
                       tuple(str(i) for i in range(10)))
    return Data(ImageTensorDataset(images[~test_mask], labels[~test_mask], info, train=True, seed=seed),
                ImageTensorDataset(images[test_mask], labels[test_mask], info, train=False), info,
                "scikit-learn load_digits()")


def _mean(images: torch.Tensor) -> tuple[float, ...]:
    return tuple(images.float().div(255).mean(dim=(0, 2, 3)).tolist())


def _std(images: torch.Tensor) -> tuple[float, ...]:
    return tuple(max(s, 1e-3) for s in images.float().div(255).std(dim=(0, 2, 3)).tolist())


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file '{path}': {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"'{path}' is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"'{path}' is truncated: expected {int(np.prod(dims))} values, found {body.size}")
    return body.reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_mnist(data_dir: str | None, seed: int) -> Data:
    candidates = [Path(data_dir)] if data_dir else [Path(p) for p in FASHION_MNIST_DIRS]
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for folder in candidates:
        files = [_find(folder, s) for s in stems]
        if all(files):
            break
    else:
        looked = ", ".join(str(c) for c in candidates)
        raise DataError(
            f"Fashion-MNIST not found (looked in: {looked}). Install it with `apt-get install dataset-fashion-mnist` "
            "(Debian; files go to /usr/share/datasets/fashion-mnist), or put the four IDX files "
            f"({', '.join(s + '[.gz]' for s in stems)}) in a folder and pass --data-dir FOLDER."
        )
    xtr, ytr, xte, yte = (_read_idx(f) for f in files)
    if xtr.shape[0] != ytr.shape[0] or xte.shape[0] != yte.shape[0]:
        raise DataError(f"Fashion-MNIST in {folder}: image and label counts differ")
    train_images = torch.tensor(xtr).unsqueeze(1)
    names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    info = DatasetInfo("fashion-mnist", 10, 1, (28, 28), _mean(train_images), _std(train_images), "crop-flip", names)
    return Data(ImageTensorDataset(train_images, torch.tensor(ytr), info, train=True, seed=seed),
                ImageTensorDataset(torch.tensor(xte).unsqueeze(1), torch.tensor(yte), info, train=False), info,
                str(folder))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches contain: numpy arrays and builtin containers."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
        ("builtins", "bytearray"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: CIFAR batches hold only arrays")


def _load_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            data = _ArrayUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"'{path}' is not a CIFAR python batch: {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"'{path}' is not a CIFAR python batch (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _cifar(name: str, data_dir: str | None, seed: int) -> Data:
    sub = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    if not data_dir:
        raise DataError(
            f"{name} needs --data-dir: a folder holding the python-version batches ({sub}/ as extracted from "
            f"the official {sub.replace('-', '_')} archive); sntfx never downloads data"
        )
    root = Path(data_dir)
    folder = root / sub if (root / sub).is_dir() else root
    if name == "cifar10":
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key, n_classes = [folder / "test_batch"], "labels", 10
    else:
        train_files, test_files, label_key, n_classes = [folder / "train"], [folder / "test"], "fine_labels", 100
    missing = [str(f) for f in train_files + test_files if not f.is_file()]
    if missing:
        raise DataError(f"{name} not found: missing {', '.join(missing)} (looked in {folder}). Extract the "
                        f"python-version archive there, or point --data-dir at the folder holding {sub}/.")

    def read(files):
        xs, ys = [], []
        for f in files:
            b = _load_batch(f)
            if "data" not in b or label_key not in b:
                raise DataError(f"'{f}' lacks 'data' or '{label_key}'")
            x = np.asarray(b["data"], dtype=np.uint8)
            if x.ndim != 2 or x.shape[1] != 3072:
                raise DataError(f"'{f}': expected data of shape (N, 3072), got {x.shape}")
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(np.asarray(b[label_key], dtype=np.int64))
        return torch.tensor(np.concatenate(xs)), torch.tensor(np.concatenate(ys))

    xtr, ytr = read(train_files)
    xte, yte = read(test_files)
    info = DatasetInfo(name, n_classes, 3, (32, 32), _mean(xtr), _std(xtr), "crop-flip")
    return Data(ImageTensorDataset(xtr, ytr, info, train=True, seed=seed),
                ImageTensorDataset(xte, yte, info, train=False), info, str(folder))


def _synthetic(seed: int, n_train: int = 512, n_test: int = 256, classes: int = 4, size: int = 16) -> Data:
    """Learnable synthetic images: each class has its own mean pattern, plus noise."""
    gen = torch.Generator().manual_seed(1234)
    patterns = torch.rand(classes, 3, size, size, generator=gen) * 160 + 40

    def make(n, salt):
        g = torch.Generator().manual_seed(1234 + salt)
        y = torch.arange(n) % classes
        x = patterns[y] + torch.randn(n, 3, size, size, generator=g) * 40
        return x.clamp(0, 255).to(torch.uint8), y

    xtr, ytr = make(n_train, 1)
    xte, yte = make(n_test, 2)
    info = DatasetInfo("synthetic", classes, 3, (size, size), _mean(xtr), _std(xtr), "crop-flip")
    return Data(ImageTensorDataset(xtr, ytr, info, train=True, seed=seed),
                ImageTensorDataset(xte, yte, info, train=False), info, "generated")


def _read_image(path: str):
    """ImageFolder's loader, with a clear error for a file that is not a readable image (named, with the fix)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:  # PIL: UnidentifiedImageError and truncated files are OSErrors
        why = "not an image format PIL reads" if isinstance(exc, UnidentifiedImageError) else \
            f"{type(exc).__name__}: {exc}"
        raise DataError(f"cannot read the image '{path}' ({why}); remove or replace that file and run again") from exc


def _image_folder(root: Path, seed: int) -> Data:
    from torchvision import datasets, transforms

    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"'{root}' is not an ImageFolder dataset: expected {root}/train/CLASS/*.jpg and "
                        f"{root}/val/CLASS/* (or test/)")
    probe = datasets.ImageFolder(str(train_dir), loader=_read_image)
    if not probe.samples:
        raise DataError(f"'{train_dir}' holds no images")
    first = transforms.functional.pil_to_tensor(probe.loader(probe.samples[0][0]))
    size = tuple(first.shape[-2:]) if max(first.shape[-2:]) <= 64 else (224, 224)
    resize = [] if size == tuple(first.shape[-2:]) else [transforms.Resize(256 if size == (224, 224) else size)]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(size) if size == (224, 224) else transforms.RandomCrop(size, padding=4),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(mean, std)])
    test_tf = transforms.Compose([*resize, transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(mean, std)])
    train = datasets.ImageFolder(str(train_dir), transform=train_tf, loader=_read_image)
    test = datasets.ImageFolder(str(test_dir), transform=test_tf, loader=_read_image)
    if test.classes != train.classes:
        raise DataError(f"'{root}': the class folders of train/ and {test_dir.name}/ differ")
    info = DatasetInfo(root.name, len(train.classes), 3, size, mean, std, "folder", tuple(train.classes))
    return Data(train, test, info, str(root))


def load_data(name_or_dir: str, *, data_dir: str | None = None, seed: int = 0) -> Data:
    """Load a dataset by name (see the module docstring) or from an ImageFolder directory.

    ``data_dir`` is where a named dataset's files are (Fashion-MNIST, CIFAR);
    datasets that read no files (digits, synthetic, an ImageFolder given by its
    path) refuse it rather than ignore it.
    """
    reads_dir = name_or_dir in ("fashion-mnist", "fashion_mnist", "fmnist", "cifar10", "cifar100")
    if data_dir is not None and not reads_dir:
        raise DataError(f"--data-dir says where a named dataset's files are (fashion-mnist, cifar10, cifar100); "
                        f"'{name_or_dir}' reads none from it, so it would be ignored: drop --data-dir")
    if name_or_dir == "digits":
        return _digits(seed)
    if name_or_dir in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return _fashion_mnist(data_dir, seed)
    if name_or_dir in ("cifar10", "cifar100"):
        return _cifar(name_or_dir, data_dir, seed)
    if name_or_dir == "synthetic":
        return _synthetic(seed)
    path = Path(name_or_dir)
    if path.is_dir():
        return _image_folder(path, seed)
    raise DataError(f"unknown dataset '{name_or_dir}': use one of {', '.join(DATASETS)}, or the path of an "
                    "ImageFolder directory (with train/ and val/ class folders)")
