from __future__ import annotations

import torch
import pytest

import sntfx

torch.set_num_threads(2)


class WellFormed:
    """Instrument: lint the graph and check every call_module target exists after each pass."""

    def before_pass(self, p, gm):
        pass

    def after_pass(self, p, result):
        gm = result.graph_module
        gm.graph.lint()
        for node in gm.graph.nodes:
            if node.op == "call_module":
                gm.get_submodule(node.target)


@pytest.fixture(autouse=True)
def _well_formed_passes(monkeypatch):
    """Attach the well-formedness instrument to every PassManager built in a test."""
    original = sntfx.PassManager.__init__

    def init(self, passes, *, check=False, instruments=()):
        original(self, passes, check=check, instruments=(*instruments, WellFormed()))

    monkeypatch.setattr(sntfx.PassManager, "__init__", init)
    yield


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    yield
