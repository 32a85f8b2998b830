"""SAM as a torch.optim.Optimizer: closure steps, LR schedulers, state_dict, buffers."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from sntfx.sam import SAM


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, generator=g), torch.randn(16, 2, generator=g)


def _closure(opt, model, x, y, loss_fn=nn.functional.mse_loss):
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    return closure


def _reference_sam_step(model: nn.Module, x, y, lr: float, rho: float, adaptive: bool) -> None:
    """One SAM step with plain SGD, written out: gradient at w, e, gradient at w + e, w - lr g."""
    params = list(model.parameters())
    g = torch.autograd.grad(nn.functional.mse_loss(model(x), y), params)
    with torch.no_grad():
        scaled = [(p.abs() * gi if adaptive else gi).float() for p, gi in zip(params, g)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        scale = rho / (norm + 1e-12)
        w = [p.detach().clone() for p in params]
        for p, gi in zip(params, g):
            p.add_((p.square() * gi if adaptive else gi) * scale)
    g_sam = torch.autograd.grad(nn.functional.mse_loss(model(x), y), params)
    with torch.no_grad():
        for p, wi, gi in zip(params, w, g_sam):
            p.copy_(wi.add(gi, alpha=-lr))


def test_sam_is_an_optimizer_sharing_the_base_groups_and_state():
    model = _tiny()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sam = SAM(model.parameters(), base, rho=0.2, adaptive=True, model=model)
    assert isinstance(sam, torch.optim.Optimizer)
    assert sam.param_groups is base.param_groups and sam.state is base.state
    assert sam.defaults["rho"] == 0.2 and sam.defaults["adaptive"] is True and sam.defaults["momentum"] == 0.9
    assert base.param_groups[0]["rho"] == 0.2 and base.param_groups[0]["adaptive"] is True
    assert sam.rho == 0.2 and sam.adaptive is True
    assert "SAM[SGD]" in repr(sam)


@pytest.mark.parametrize("adaptive", [False, True])
def test_closure_step_matches_a_two_pass_sam_by_hand_exactly(adaptive):
    lr, rho = 0.1, 0.3
    x, y = _batch()
    model, reference, legacy = _tiny(), _tiny(), _tiny()
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=lr), rho=rho, adaptive=adaptive, model=model)
    old = SAM(legacy.parameters(), torch.optim.SGD(legacy.parameters(), lr=lr), rho=rho, adaptive=adaptive)
    for _ in range(3):
        sam.step(_closure(sam, model, x, y))
        old.step(legacy, lambda: nn.functional.mse_loss(legacy(x), y))  # the older call, kept working
        _reference_sam_step(reference, x, y, lr, rho, adaptive)
        for p, q, r in zip(model.parameters(), legacy.parameters(), reference.parameters()):
            assert torch.equal(p, r) and torch.equal(q, r)


def test_step_returns_the_loss_at_w():
    x, y = _batch()
    model = _tiny()
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5, model=model)
    with torch.no_grad():
        expected = nn.functional.mse_loss(model(x), y)
    assert torch.equal(sam.step(_closure(sam, model, x, y)).detach(), expected)


@pytest.mark.parametrize("make", [
    lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.01),
    lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=6, cycle_momentum=False),
    lambda opt: lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
], ids=["cosine", "onecycle", "lambda"])
def test_schedulers_drive_the_base_learning_rate(make):
    x, y = _batch()
    model = _tiny()
    base = torch.optim.SGD(model.parameters(), lr=0.2)
    sam = SAM(model.parameters(), base, rho=0.1, model=model)
    scheduler = make(sam)
    seen = []
    for _ in range(5):
        lr = scheduler.get_last_lr()[0]
        assert base.param_groups[0]["lr"] == lr
        before = [p.detach().clone() for p in model.parameters()]
        sam.step(_closure(sam, model, x, y))
        # plain SGD: w <- w - lr * g, with g the gradient at w + e (left in .grad): the scheduler's lr moved w
        for p, w in zip(model.parameters(), before):
            assert torch.equal(p.detach(), w.add(p.grad, alpha=-lr))
        scheduler.step()
        seen.append(lr)
    assert len(set(seen)) > 1


def test_onecycle_cycles_the_base_momentum():
    model = _tiny()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sam = SAM(model.parameters(), base, model=model)
    lr_scheduler.OneCycleLR(sam, max_lr=1.0, total_steps=10)  # needs "momentum" in sam.defaults
    assert base.param_groups[0]["momentum"] == 0.95 and base.param_groups[0]["lr"] == pytest.approx(1.0 / 25)


def test_state_dict_round_trip_resumes_identically():
    x, y = _batch()

    def build(rho):
        model = _tiny()
        first, second = list(model[0].parameters()), list(model[2].parameters())
        base = torch.optim.Adam([{"params": first}, {"params": second, "lr": 3e-3}], lr=1e-2)
        sam = SAM(model.parameters(), base, rho=rho, model=model)
        sam.param_groups[1]["rho"] = 0.2  # per-group radius, saved with the group
        return model, sam, lr_scheduler.CosineAnnealingLR(sam, T_max=6)

    model, sam, sched = build(0.05)
    for _ in range(3):
        sam.step(_closure(sam, model, x, y))
        sched.step()
    saved = copy.deepcopy({"model": model.state_dict(), "opt": sam.state_dict(), "sched": sched.state_dict()})
    assert [g["rho"] for g in saved["opt"]["param_groups"]] == [0.05, 0.2]
    for _ in range(3):
        sam.step(_closure(sam, model, x, y))
        sched.step()

    resumed, sam2, sched2 = build(0.5)  # another rho: the state_dict brings back the saved ones
    resumed.load_state_dict(saved["model"])
    sam2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert sam2.param_groups is sam2.base.param_groups and sam2.state is sam2.base.state
    assert [g["rho"] for g in sam2.param_groups] == [0.05, 0.2]
    for _ in range(3):
        sam2.step(_closure(sam2, resumed, x, y))
        sched2.step()
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert sam2.base.param_groups[0]["lr"] == sam.base.param_groups[0]["lr"]


def test_loads_a_base_optimizer_state_dict():
    """Checkpoints written before SAM was an Optimizer hold the base's state_dict (no rho)."""
    x, y = _batch()
    model = _tiny()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    base.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    base.step()
    state = copy.deepcopy(base.state_dict())
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), rho=0.3, model=model)
    sam.load_state_dict(state)
    assert sam.param_groups[0]["lr"] == 0.1 and sam.param_groups[0]["rho"] == 0.3
    assert len(sam.state) == len(list(model.parameters()))


def test_deepcopy_keeps_the_sharing():
    x, y = _batch()
    model = _tiny()
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model=model)
    sam.step(_closure(sam, model, x, y))
    model2, sam2 = copy.deepcopy((model, sam))
    assert sam2.param_groups is sam2.base.param_groups and sam2.model is model2
    sam.step(_closure(sam, model, x, y))
    sam2.step(_closure(sam2, model2, x, y))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_a_plain_closure_loop_trains():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), rho=0.05, model=model)
    losses = []
    for _ in range(40):
        loss = opt.step(closure=_closure(opt, model, x, y, nn.functional.cross_entropy))  # Lightning's keyword
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_step_without_a_closure_says_what_to_do():
    model = _tiny()
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    with pytest.raises(ValueError, match=r"needs a closure.*opt\.step\(closure\)"):
        sam.step()


def test_batchnorm_statistics_are_updated_once_per_closure_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    reference = copy.deepcopy(model)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    with torch.no_grad():
        reference(x)  # one train-mode pass at w
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5, model=model)
    sam.step(_closure(sam, model, x, y, nn.functional.cross_entropy))
    bn, ref = model[1], reference[1]
    assert torch.equal(bn.running_mean, ref.running_mean)
    assert torch.equal(bn.running_var, ref.running_var)
    assert bn.num_batches_tracked.item() == 1


def test_without_a_model_it_warns_once(caplog):
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    with caplog.at_level(logging.WARNING, logger="sntfx.sam"):
        for _ in range(2):
            sam.step(_closure(sam, model, x, y, nn.functional.cross_entropy))
    assert len([r for r in caplog.records if "SAM has no model" in r.getMessage()]) == 1
    assert model[1].num_batches_tracked.item() == 4  # both passes of both steps: what model= avoids


def test_per_group_rho_and_added_groups():
    a, b = nn.Parameter(torch.tensor([1.0, 2.0])), nn.Parameter(torch.tensor([3.0]))
    base = torch.optim.SGD([a], lr=0.0)
    sam = SAM([a], base, rho=0.5)
    sam.add_param_group({"params": [b], "rho": 0.0})
    assert base.param_groups[1]["rho"] == 0.0 and base.param_groups[1]["adaptive"] is False
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    sam.perturb()
    assert torch.allclose(a.detach(), torch.tensor([1.0 + 0.5 * 3 / 5, 2.0]))  # the norm is over both groups
    assert torch.equal(b.detach(), torch.tensor([3.0]))  # rho 0: not moved
    sam.restore()
    assert torch.equal(a.detach(), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="rho"):
        sam.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "rho": -1.0})


def test_parameters_the_base_does_not_update_are_refused():
    model = _tiny()
    with pytest.raises(ValueError, match="base optimizer"):
        SAM(model.parameters(), torch.optim.SGD(model[0].parameters(), lr=0.1))
