from __future__ import annotations

import ctypes
import os
import sys
import tempfile

import pytest
import torch

from sntfx.testing import WellFormed, instrument_every_pipeline

torch.set_num_threads(2)

# Tests never touch the user's configuration: the signing key of files saved in tests lives in a
# throwaway folder (inherited by the CLI and torchrun processes that tests start).
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="sntfx-test-config-")


def _unmap_large_tensors_on_free() -> None:
    """Keep the test process's memory flat across the model-zoo sweep.

    glibc raises its mmap threshold after a large block is freed, so later big
    tensors come from the heap, which fragments and is never returned: over the
    zoo sweep (hundreds of models of up to 300M expanded parameters in one
    process) that grew the process past 24 GB and the OOM killer stopped it,
    although no single check needs more than ~7 GB (measured: RSS after
    vgg16_bn..vit_b_16 branch/qa-branch grows 0.95 -> 2.2 GB without this and
    stays at 0.76 GB with it). Fixing the threshold at 128 KiB (M_MMAP_THRESHOLD
    = -3) makes every large tensor an mmap that is unmapped when freed.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
        except (OSError, AttributeError):  # not glibc
            pass


_unmap_large_tensors_on_free()


@pytest.fixture(autouse=True)
def _well_formed_passes():
    """Attach the well-formedness instrument to every pipeline a test runs."""
    with instrument_every_pipeline(WellFormed()):
        yield


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def test_split_reads(monkeypatch) -> dict[str, int]:
    """Counts the test-split images read from any dataset loaded through ``sntfx.data.load_data`` (``["test"]``)."""
    import sntfx.data

    real, reads = sntfx.data.load_data, {"test": 0}

    class Counting(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            reads["test"] += 1
            return self.inner[i]

    def load(*args, **kwargs):
        data = real(*args, **kwargs)
        data.test = Counting(data.test)
        return data

    monkeypatch.setattr(sntfx.data, "load_data", load)
    return reads

