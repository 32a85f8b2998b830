"""Files saved before the style registry and pass contract v2 (sntfx at cfbb1c0) still load, to the same function.

The fixtures in tests/data/ were written by that version (tiny ``sntfx:cnn``
models: one per style, and a folded model taken through channel pruning,
magnitude pruning and W6A8 quantization), together with their outputs on a
fixed probe. Loading replays each recipe's passes with today's code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sntfx
from sntfx.tracing import compare_outputs

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def recorded():
    return torch.load(DATA / "v1_cnn_outputs.pt", weights_only=True)


@pytest.mark.parametrize("name", ["linear", "branch", "qa-branch", "compressed"])
def test_files_from_before_the_redesign_load_to_the_same_function(recorded, name):
    gm = sntfx.load(DATA / f"v1_cnn_{name}.pt")
    with torch.no_grad():
        out = gm(recorded["probe"])
    assert compare_outputs(recorded["outputs"][name], out) <= 1e-6


def test_an_old_expanded_file_still_folds_exactly(recorded):
    gm = sntfx.load(DATA / "v1_cnn_qa-branch.pt")
    folded = sntfx.fold(gm, recorded["probe"])
    with torch.no_grad():
        assert compare_outputs(recorded["outputs"]["qa-branch"], folded.eval()(recorded["probe"])) <= 1e-5


def test_the_old_compressed_recipe_replays_every_pass():
    gm = sntfx.load(DATA / "v1_cnn_compressed.pt")
    names = [p["name"] for p in sntfx.read_recipe(DATA / "v1_cnn_compressed.pt")["pipeline"]]
    assert names == ["snt", "fold", "prune_channels", "prune", "quantize"]
    assert any(n.startswith("sntfx_actq_") for n, _ in gm.named_children())  # activation quantizers re-inserted
