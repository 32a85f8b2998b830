"""SAM correctness and the sharpness measures, on cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from sntfx import sharpness as sh
from sntfx.sam import SAM


def _linear_model(w):
    m = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([w], dtype=torch.float32))
    return m


def test_two_sam_steps_by_hand():
    """f(w) = 0.5 (w.x - y)^2 with SGD(lr) inside SAM(rho), computed by hand with numpy."""
    x, y, lr, rho = np.array([1.0, 1.0]), 0.0, 0.1, 0.1
    w = np.array([1.0, 2.0])
    expected = []
    for _ in range(2):
        g = (w @ x - y) * x  # gradient at w
        e = rho * g / np.linalg.norm(g)  # worst-case perturbation
        g_sam = ((w + e) @ x - y) * x  # gradient at w + e
        w = w - lr * g_sam
        expected.append(w.copy())
    assert np.allclose(expected[0], [0.68586, 1.68586], atol=1e-5)  # 1 - 0.1 * (3 + 0.1 * sqrt(2))

    model = _linear_model([1.0, 2.0])
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=lr), rho=rho)
    xt, yt = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0]])
    for step in range(2):
        sam.step(model, lambda: 0.5 * ((model(xt) - yt) ** 2).sum())
        assert np.allclose(model.weight.detach().numpy()[0], expected[step], atol=1e-6)


def test_adaptive_sam_perturbation():
    model = _linear_model([1.0, -2.0])
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.0), rho=0.5, adaptive=True)
    model.weight.grad = torch.tensor([[3.0, 4.0]])
    w = model.weight.detach().clone()
    sam.perturb()
    t = w.abs()
    g = torch.tensor([[3.0, 4.0]])
    expected = w + 0.5 * t * t * g / (t * g).norm()
    assert torch.allclose(model.weight, expected)
    sam.restore()
    assert torch.equal(model.weight.detach(), w)


def test_batchnorm_statistics_are_updated_once_per_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    reference = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    with torch.no_grad():
        reference(x)  # one train-mode pass at w
    sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5)
    sam.step(model, lambda: nn.functional.cross_entropy(model(x), y))
    bn, ref = model[1], reference[1]
    assert torch.equal(bn.running_mean, ref.running_mean)
    assert torch.equal(bn.running_var, ref.running_var)
    assert bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("form", ["step(model, loss_fn)", "step(closure)"])
def test_sam_does_not_all_reduce_the_first_gradient(tmp_path, form):
    """Under DDP only the perturbed pass's gradient is all-reduced (one all-reduce per step), in either call form."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        ddp = nn.parallel.DistributedDataParallel(model)
        calls = []

        def hook(state, bucket):
            calls.append(1)
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, hook)
        x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        sam = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
        nn.functional.cross_entropy(ddp(x), y).backward()
        plain = len(calls)
        calls.clear()
        if form == "step(closure)":
            sam.model = ddp

            def closure():
                sam.zero_grad()
                loss = nn.functional.cross_entropy(ddp(x), y)
                loss.backward()
                return loss

            sam.step(closure)
        else:
            sam.step(ddp, lambda: nn.functional.cross_entropy(ddp(x), y))
        assert plain >= 1 and len(calls) == plain
    finally:
        dist.destroy_process_group()


def test_sam_under_bf16_autocast_keeps_fp32_weights():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    sam = SAM(model.parameters(), torch.optim.Adam(model.parameters(), lr=1e-2))
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))

    def loss_fn():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        return nn.functional.cross_entropy(out.float(), y)

    before = [p.detach().clone() for p in model.parameters()]
    loss = sam.step(model, loss_fn)
    assert math.isfinite(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


class Quadratic(nn.Module):
    """L(w) = 0.5 * sum(lam_i * w_i^2) + c . w: Hessian diag(lam)."""

    def __init__(self, lam, c):
        super().__init__()
        self.lam = torch.tensor(lam, dtype=torch.float64)
        self.c = torch.tensor(c, dtype=torch.float64)
        self.w = nn.Parameter(torch.linspace(-1, 1, len(lam), dtype=torch.float64))

    def loss(self):
        return 0.5 * (self.lam * self.w**2).sum() + (self.c * self.w).sum()


def test_hessian_measures_on_a_known_spectrum():
    lam = [9.0, 4.0, 2.5, 1.0, 0.5, 0.1]
    q = Quadratic(lam, [0.3, -0.2, 0.1, 0.0, 0.5, 1.0])
    assert sh.top_eigenvalue(q.loss, q, iters=500, tol=1e-10) == pytest.approx(9.0, rel=1e-6)
    # Rademacher probes are exact on a diagonal Hessian.
    assert sh.hessian_trace(q.loss, q, samples=3) == pytest.approx(sum(lam), rel=1e-12)
    # SAM sharpness in closed form: L(w + e) - L(w) = g.e + 0.5 e^T H e with e = rho g/|g|.
    w = q.w.detach()
    lam_t = torch.tensor(lam, dtype=torch.float64)
    g = lam_t * w + q.c
    e = 0.05 * g / g.norm()
    expected = float(g @ e + 0.5 * (lam_t * e * e).sum())
    assert sh.sam_sharpness(q.loss, q, rho=0.05) == pytest.approx(expected, rel=1e-9)
    assert torch.equal(q.w.detach(), w)  # weights restored


def test_negative_dominant_eigenvalue_is_found():
    q = Quadratic([-6.0, 2.0, 1.0], [0.0, 0.0, 0.0])
    assert sh.top_eigenvalue(q.loss, q, iters=500, tol=1e-10) == pytest.approx(-6.0, rel=1e-6)


def test_landscape_restores_weights_and_is_centred():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    fn = sh.batch_loss_fn(model, [(x, y)])
    before = [p.detach().clone() for p in model.parameters()]
    one = sh.landscape(model, fn, dims=1, steps=5, span=0.5)
    two = sh.landscape(model, fn, dims=2, steps=3, span=0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with torch.no_grad():
        centre = float(fn())
    assert one["losses"][2] == pytest.approx(centre, rel=1e-6)
    assert two["losses"][1][1] == pytest.approx(centre, rel=1e-6)
    assert len(two["losses"]) == 3 and len(two["losses"][0]) == 3


def test_plot_landscape_writes_png(tmp_path):
    curves = {"a": {"alphas": [-1, 0, 1], "losses": [2, 1, 2]}, "b": {"alphas": [-1, 0, 1], "losses": [3, 1, 3]}}
    sh.plot_landscape(curves, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_weight_statistics_match_their_definitions():
    """Gaussian weights: kurtosis ~0; uniform: -1.2 and crest sqrt(3); zeros at W4 = what the 4-bit quantizer zeroes."""
    import sntfx
    from sntfx.quant import fake_quant_weight
    from sntfx.weight_stats import weight_statistics

    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 256, 3), nn.Flatten(), nn.Linear(256 * 4, 512))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(model[0].weight.shape, generator=gen))
        model[2].weight.uniform_(-1, 1, generator=gen)
    gm = sntfx.trace(model, torch.zeros(1, 16, 4, 4))
    stats = weight_statistics(gm)
    conv_k = float(((model[0].weight - model[0].weight.mean()) ** 4).mean() / model[0].weight.var(unbiased=False) ** 2 - 3)
    assert abs(conv_k) < 0.1 and stats["kurtosis"] == pytest.approx((conv_k - 1.2) / 2, abs=0.02)
    crests = [r.abs().max() / r.square().mean().sqrt() for m in (model[0], model[2])
              for r in m.weight.detach().reshape(m.weight.shape[0], -1)]
    assert stats["crest_factor"] == pytest.approx(float(torch.stack(crests).mean()), rel=1e-6)
    assert float(torch.stack(crests[256:]).mean()) == pytest.approx(math.sqrt(3), rel=0.02)  # uniform rows
    zeros = sum(int((fake_quant_weight(m.weight, 4) == 0).sum()) for m in (model[0], model[2]))
    total = model[0].weight.numel() + model[2].weight.numel()
    assert stats["zero_at_w4"] == pytest.approx(zeros / total, abs=1e-4)
    # Gaussian 3x3 kernels: no tap is special, so about 1 channel in 9 has its largest weight at the centre
    assert stats["centre_max_share"] == pytest.approx(1 / 9, abs=0.05)


def test_centre_max_share_counts_the_channels_whose_largest_weight_is_the_centre_tap():
    """The share is over odd-kernel convs only (1x1 convs, even kernels and linears have no centre that could be
    special), survives BatchNorm folding (a per-channel scale keeps where the maximum is), and is absent when no
    layer has a centre tap."""
    import sntfx
    from sntfx.weight_stats import weight_statistics

    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 2),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
    with torch.no_grad():
        model[0].weight.fill_(0.1)
        model[0].weight[0, 1, 1, 1] = 2.0  # channel 0: the centre tap holds the maximum
        model[0].weight[1, 0, 1, 1] = -3.0  # channel 1: so does a negative centre weight
        model[0].weight[2, 0, 0, 2] = 2.0  # channel 2: a corner does
        model[0].weight[3, 1, 1, 1], model[0].weight[3, 1, 2, 1] = 1.0, -1.5  # channel 3: an edge tap, just
        model[1].weight.copy_(torch.tensor([0.5, 2.0, -1.0, 3.0]))
        model[1].running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 2.0]))
        for m in (model[2], model[3], model[5]):
            m.weight.fill_(1.0)  # any maximum here would count, if these layers were counted
    gm = sntfx.trace(model.eval(), torch.zeros(1, 2, 4, 4))
    assert weight_statistics(gm)["centre_max_share"] == pytest.approx(2 / 4)
    flat = sntfx.trace(nn.Sequential(nn.Conv1d(2, 3, 4), nn.Flatten(), nn.Linear(3 * 5, 2)), torch.zeros(1, 2, 8))
    assert "centre_max_share" not in weight_statistics(flat)
