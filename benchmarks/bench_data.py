"""Training data loading: a batch fetched at once (``__getitems__``) vs image by image, interleaved in one run.

The study and ``sntfx train`` read in-memory datasets (Fashion-MNIST, CIFAR,
digits) through ``ImageTensorDataset``, whose augmentation draws each image's
crop and flip from its own seed. ``DataLoader`` fetches a batch through the
dataset's ``__getitems__``, which does the per-image work on the whole batch
and gives the same tensors bit for bit (``tests/test_data.py``); before it,
every image went through ``__getitem__`` and the collate stacked them. Both
paths read the same batches of the training split (the study's held-out
layout), round by round; the script prints median milliseconds per batch and
the ratio.

    python benchmarks/bench_data.py                        # fashion-mnist (digits if absent), batch 128
    python benchmarks/bench_data.py --threads 1 --out bench-results/data-1thread.json

Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from sntfx.data import FASHION_MNIST_DIRS, hold_out, load_data
from sntfx.train import _EpochSampler


class OneByOne(Dataset):
    """The dataset as a DataLoader saw it before ``__getitems__``: one ``__getitem__`` per image."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i]


def ms_per_batch(dataset: Dataset, batch: int, batches: int, seed: int) -> float:
    sampler = _EpochSampler(len(dataset), batch, seed, 0, 1, batches)
    t0 = time.perf_counter()
    n = sum(1 for _ in DataLoader(dataset, batch_sampler=sampler, num_workers=0))
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="dataset (default: fashion-mnist where installed, else digits)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=40, help="batches per round and path")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--val-images", type=int, default=10000, help="held out first, as the study does (0: none)")
    parser.add_argument("--out", default="bench-results/data.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.data or ("fashion-mnist" if any(Path(d).is_dir() for d in FASHION_MNIST_DIRS) else "digits")
    data = load_data(name)
    if args.val_images and len(data.train) > 2 * args.val_images:
        data = hold_out(data, args.val_images)
    batched, single = data.train, OneByOne(data.train)
    times: dict[str, list[float]] = {"one by one": [], "batched": []}
    for r in range(args.rounds):  # alternate, so that drifts hit both alike; each round a new epoch's order
        times["one by one"].append(ms_per_batch(single, args.batch, args.batches, r))
        times["batched"].append(ms_per_batch(batched, args.batch, args.batches, r))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(a / b for a, b in zip(times["one by one"], times["batched"]))
    print(f"{name}, batch {args.batch}, {torch.get_num_threads()} thread(s), augmentation {data.info.augment}:")
    for k, v in med.items():
        print(f"  {k:<10} {v:7.2f} ms per batch")
    print(f"  one by one / batched = {ratio:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"data": name, "batch": args.batch, "threads": torch.get_num_threads(),
                               "augment": data.info.augment, "rounds": args.rounds, "batches": args.batches,
                               "machine": platform.machine(), "torch": torch.__version__,
                               "median_ms_per_batch": med, "ratio_one_by_one_to_batched": ratio}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
