"""The ``lin-branch`` style: what it builds, its kernel by hand, one convolution per online step, end to end."""

from __future__ import annotations

import itertools

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import sntfx
from sntfx.blocks import get_style, make_block
from sntfx.blocks.lin_branch import LinearizedBranchBlock
from sntfx.graph_utils import randomize_
from sntfx.tracing import compare_outputs


def test_branches_follow_the_layer():
    full = make_block(nn.Conv2d(8, 8, 3, padding=1), "lin-branch")
    assert isinstance(full, LinearizedBranchBlock) and set(full.scales) == {"main", "aux", "avg", "identity"}
    assert set(make_block(nn.Conv2d(8, 16, 3, stride=2, padding=1), "lin-branch").scales) == {"main", "aux", "avg"}
    assert set(make_block(nn.Conv2d(8, 8, 1), "lin-branch").scales) == {"main", "identity"}
    assert set(make_block(nn.Linear(10, 7), "lin-branch").scales) == {"main"}
    info = get_style("lin-branch")
    assert info.trains_online and not info.bias_sink and info.options == ()


def _kernel_by_hand(block: LinearizedBranchBlock) -> torch.Tensor:
    """The composed kernel written out tap by tap (a second implementation of the module docstring's formula)."""
    c = block.config
    s = {n: p.detach().double() for n, p in block.scales.items()}
    w = s["main"].reshape(-1, 1, 1, 1) * block.main.weight.detach().double()
    per_group = c.in_features // c.groups
    ci, cj = c.center
    for o, i in itertools.product(range(c.out_features), range(per_group)):
        w[o, i, ci, cj] += s["aux"][o] * block.aux.weight[o, i, 0, 0].double()
        for u, v in itertools.product(range(c.kernel[0]), range(c.kernel[1])):
            w[o, i, u, v] += s["avg"][o] * block.avg_proj.weight[o, i, 0, 0].double() / c.ktaps
        if "identity" in s and i == o % per_group:
            w[o, i, ci, cj] += s["identity"][o]
    return w


@pytest.mark.parametrize("layer", [nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.Conv2d(4, 6, (3, 5), padding=(1, 2)),
                                   nn.Conv2d(4, 4, 4, padding="same", bias=False)], ids=["grouped", "3x5", "even k"])
def test_folded_kernel_is_the_sum_of_scaled_branches(layer):
    block = make_block(layer, "lin-branch")
    randomize_(block, seed=2)
    folded, residual = block.fold()
    assert residual is None and (folded.bias is None) == (layer.bias is None)
    assert compare_outputs(_kernel_by_hand(block), folded.weight.double()) <= 1e-6


def test_online_runs_one_convolution_and_no_branch():
    layer = nn.Conv2d(8, 8, 3, padding=1)
    block = make_block(layer, "lin-branch")
    randomize_(block, seed=0)
    called = []
    for name in ("main", "aux", "avg_proj"):
        getattr(block, name).register_forward_hook(lambda *a, name=name: called.append(name))
    x = torch.randn(2, 8, 9, 9)
    explicit = block(x)
    assert sorted(called) == ["aux", "avg_proj", "main"]
    called.clear()
    block.online = True
    composed = block(x)
    assert called == [] and compare_outputs(explicit, composed) <= 1e-5


def test_preserve_is_exact_and_every_branch_still_learns():
    layer = nn.Conv2d(8, 8, 3, padding=1)
    block = make_block(layer, "lin-branch", preserve=True)
    block.online = True
    x = torch.randn(4, 8, 9, 9)
    assert compare_outputs(layer(x), block(x)) <= 1e-6
    block(x).square().mean().backward()
    for name, scale in block.scales.items():  # zero-scale branches start learning through their scale
        assert scale.grad.abs().sum() > 0, name


def test_trains_online_in_the_trainer_and_folds_exactly(tmp_path):
    from sntfx.data import load_data
    from sntfx.train import TrainConfig, Trainer
    from sntfx.workflow import model_for_data

    data = load_data("digits", seed=0)
    model = model_for_data("sntfx:cnn", data.info)
    x = torch.stack([data.test[i][0] for i in range(64)])
    gm = sntfx.transform(model, x[:2], style="lin-branch", preserve=True)
    blocks = [m for m in gm.modules() if isinstance(m, LinearizedBranchBlock)]
    assert blocks and not any(b.online for b in blocks)
    before = [b.composed_weight().detach().clone() for b in blocks]
    Trainer(TrainConfig(epochs=1, batch_size=32, limit_batches=5, lr=3e-3)).fit(gm, data, tmp_path / "run")
    assert all(b.online for b in blocks)
    assert any(compare_outputs(w, b.composed_weight().detach()) > 1e-3 for w, b in zip(before, blocks))
    gm.eval()
    with torch.no_grad():
        want = gm(x)
    folded = sntfx.fold(gm, x[:2])
    assert not any(isinstance(m, LinearizedBranchBlock) for m in folded.modules())
    with torch.no_grad():
        assert compare_outputs(want, folded(x)) <= 1e-5


def test_cli_and_study_name_it(tmp_path):
    from sntfx.cli import cli
    from sntfx.study import Method

    res = CliRunner().invoke(cli, ["transform", "sntfx:cnn", "--style", "lin-branch", "--out", str(tmp_path / "m.pt")])
    assert res.exit_code == 0, res.output
    assert any(isinstance(m, LinearizedBranchBlock) for m in sntfx.load(tmp_path / "m.pt").modules())
    assert Method.parse("snt-lin-branch+sam") == Method("snt-lin-branch+sam", "lin-branch", None, "preserve", True)
