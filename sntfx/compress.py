"""Compression workflows shared by the CLI: apply a pass to a copy, measure accuracy, sweep.

:func:`sweep` measures a folded model's accuracy, without fine-tuning, at each
unstructured sparsity (global magnitude pruning), each activation-aware
(Wanda) sparsity or N:M pattern, each structured channel sparsity, each
weight bit width (simulated PTQ, per-channel), and each weight/activation
pair (W8A8, W4A8, ...) with activations calibrated on real data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils.data import DataLoader

from .blocks import is_expanded
from .graph_utils import count_parameters
from .data import Data, fixed_batches
from .errors import SntfxError
from .pass_base import Pass, PassContext
from .pass_manager import PassManager
from .train import evaluate

__all__ = ["apply_pass", "accuracy", "sweep", "ensure_folded", "check_sweep_settings", "parse_sweep_axis",
           "finetune_sparse"]

log = logging.getLogger(__name__)


def ensure_folded(gm: fx.GraphModule, what: str = "the model") -> None:
    if is_expanded(gm):
        raise SntfxError(f"{what} is still in its expanded SNT form: fold it first (`sntfx fold MODEL --out FOLDED`); "
                         "compressing the expanded model would not carry over to the deployed one")


def check_sweep_settings(*, sparsities: Sequence[float] = (), channel_sparsities: Sequence[float] = (),
                         bits: Sequence[int] = (), act_bits: Sequence[Sequence[int]] = (),
                         wanda_sparsities: Sequence[float] = (), nm_patterns: Sequence[str] = (),
                         mse_bits: Sequence[int] = ()) -> None:
    """Refuse a sweep setting the compression passes would refuse, before any work (the passes' own checks)."""
    from sntfx.passes import MagnitudePrune, SimulatedQuantize, StructuredPrune, WandaPrune

    for what, axis in (("sparsities", sparsities), ("channel sparsities", channel_sparsities), ("bits", bits),
                       ("MSE-range bits", mse_bits),
                       ("activation-aware sparsities", wanda_sparsities), ("N:M patterns", nm_patterns),
                       ("activation settings", [tuple(p) if isinstance(p, (list, tuple)) else p for p in act_bits])):
        if len(set(axis)) != len(axis):
            raise SntfxError(f"the sweep's {what} list a value twice ({list(axis)}); list each once")
    checks = [(f"sparsity {s!r}", lambda s=s: MagnitudePrune(s)) for s in sparsities]
    checks += [(f"channel sparsity {s!r}", lambda s=s: StructuredPrune(s)) for s in channel_sparsities]
    checks += [(f"weight bits {b!r}", lambda b=b: SimulatedQuantize(wbits=b)) for b in bits]
    checks += [(f"MSE-range weight bits {b!r}", lambda b=b: SimulatedQuantize(wbits=b, method="mse")) for b in mse_bits]
    checks += [(f"activation-aware sparsity {s!r}", lambda s=s: WandaPrune(s)) for s in wanda_sparsities]
    checks += [(f"N:M pattern {p!r}", lambda p=p: WandaPrune(pattern=p if isinstance(p, str) else repr(p)))
               for p in nm_patterns]
    for pair in act_bits:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise SntfxError(f"an activation setting is a pair [weight bits, activation bits], e.g. [4, 8]; got {pair!r}")
        checks.append((f"W{pair[0]}A{pair[1]}", lambda p=pair: SimulatedQuantize(wbits=p[0], abits=p[1])))
    for what, make in checks:
        try:
            make()
        except (ValueError, TypeError) as exc:
            raise SntfxError(f"sweep setting {what}: {exc}") from exc


def parse_sweep_axis(text: str, kind: str, option: str) -> list:
    """Parse one comma-separated sweep axis: ``kind`` is ``fraction``, ``bits`` or ``wa`` (``W:A`` pairs)."""
    values: list = []
    for item in (v.strip() for v in str(text).split(",")):
        if not item:
            continue
        try:
            if kind == "fraction":
                values.append(float(item))
            elif kind == "bits":
                values.append(int(item))
            else:
                w, a = item.split(":")
                values.append((int(w), int(a)))
        except ValueError:
            example = {"fraction": "0.5,0.7,0.9", "bits": "8,6,4", "wa": "8:8,4:8"}[kind]
            raise SntfxError(f"{option} takes a comma-separated list like {example}; {item!r} is not one") from None
    return values


def apply_pass(gm: fx.GraphModule, p: Pass, data: Data | None = None, *, calib_batches: int = 16,
               batch_size: int = 64, inplace: bool = False):
    """Run one compression pass on ``gm`` (a copy unless ``inplace``); returns the pass report."""
    target = gm
    ctx = PassContext(example_inputs=(torch.zeros(data.info.input_shape(2)),) if data else None)
    if data is not None:
        batches = fixed_batches(data.train, batches=calib_batches, batch_size=batch_size, seed=1)
        ctx.calibration = [x for x, _ in batches]
        ctx.calibration_labeled = batches
    elif ctx.example_inputs is None:
        from .tracing import inputs_from_spec, sntfx_meta

        spec = sntfx_meta(target).get("input_spec")
        ctx.example_inputs = inputs_from_spec(spec) if spec else None
    return PassManager([p]).run(target, ctx, inplace=inplace)


def accuracy(gm: torch.nn.Module, data: Data, *, batch_size: int = 256, limit: int | None = None,
             device: torch.device | str | None = None, num_workers: int = 0) -> float:
    """Top-1 accuracy on ``data.test`` (the first ``limit`` batches), computed on ``device`` (default: CPU).

    The model is moved to ``device`` for the measurement and back to where
    its parameters were; on a GPU the loader pins memory.
    """
    device = torch.device(device or "cpu")
    loader = DataLoader(data.test, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    home = next((p.device for p in gm.parameters()), device)
    gm.to(device)
    try:
        return evaluate(gm, loader, device, limit=limit)["accuracy"]
    finally:
        gm.to(home)


def sweep(gm: fx.GraphModule, data: Data, *, sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9),
          channel_sparsities: Sequence[float] = (), bits: Sequence[int] = (8, 6, 5, 4, 3),
          act_bits: Sequence[tuple[int, int]] = ((8, 8), (4, 8)), wanda_sparsities: Sequence[float] = (),
          nm_patterns: Sequence[str] = (), mse_bits: Sequence[int] = (), recalibrate_bn: bool = True,
          calib_batches: int = 16, limit: int | None = None, progress: Callable[[str], None] | None = None,
          exclude: Sequence[str] = (), device: torch.device | str | None = None,
          num_workers: int = 0) -> dict[str, Any]:
    """Accuracy of ``gm`` under each compression setting, without fine-tuning.

    ``wanda_sparsities`` and ``nm_patterns`` are activation-aware (Wanda)
    pruning, unstructured per output row and N:M, calibrated on training
    images and followed by BatchNorm re-estimation when ``recalibrate_bn``;
    their results are under ``result["wanda"]`` keyed by the sparsity or the
    pattern (``"0.5"``, ``"2:4"``). ``mse_bits`` are weight-only settings like
    ``bits`` whose per-channel ranges are chosen to minimise the rounding error
    (``quantize``'s ``method="mse"``: clipping the largest weights where that
    pays) instead of min-max; their results are under ``result["bits_mse"]``.
    ``exclude`` (glob patterns over module names) keeps those layers dense and
    in float in every setting. The
    compression passes run on the CPU; every accuracy is measured on
    ``device`` (the training device in a study).
    """
    from sntfx.passes import MagnitudePrune, SimulatedQuantize, StructuredPrune, WandaPrune

    check_sweep_settings(sparsities=sparsities, channel_sparsities=channel_sparsities, bits=bits, act_bits=act_bits,
                         wanda_sparsities=wanda_sparsities, nm_patterns=nm_patterns, mse_bits=mse_bits)
    ensure_folded(gm)
    tick = progress or (lambda label: None)

    def measure(model) -> float:
        return accuracy(model, data, limit=limit, device=device, num_workers=num_workers)

    result: dict[str, Any] = {"float": measure(gm), "sparsity": {}, "channel_sparsity": {},
                              "bits": {}, "act_bits": {}}
    if wanda_sparsities or nm_patterns:
        result["wanda"] = {}
    if mse_bits:
        result["bits_mse"] = {}
    tick("float")
    for s in sparsities:
        pruned = apply_pass(gm, MagnitudePrune(s, exclude=exclude), data).graph_module
        result["sparsity"][str(s)] = measure(pruned)
        tick(f"sparsity {s}")
    for s in channel_sparsities:
        pruned = apply_pass(gm, StructuredPrune(s, exclude=exclude), data).graph_module
        result["channel_sparsity"][str(s)] = {"accuracy": measure(pruned),
                                              "params": count_parameters(pruned)}
        tick(f"channels {s}")
    for setting in [*wanda_sparsities, *nm_patterns]:
        p = WandaPrune(pattern=setting, recalibrate_bn=recalibrate_bn, exclude=exclude) if isinstance(setting, str) \
            else WandaPrune(setting, recalibrate_bn=recalibrate_bn, exclude=exclude)
        pruned = apply_pass(gm, p, data, calib_batches=calib_batches).graph_module
        result["wanda"][str(setting)] = measure(pruned)
        tick(f"wanda {setting}")
    for b in bits:
        q = apply_pass(gm, SimulatedQuantize(wbits=b, exclude=exclude), data).graph_module
        result["bits"][str(b)] = measure(q)
        tick(f"W{b}")
    for b in mse_bits:
        q = apply_pass(gm, SimulatedQuantize(wbits=b, method="mse", exclude=exclude), data).graph_module
        result["bits_mse"][str(b)] = measure(q)
        tick(f"W{b} (MSE ranges)")
    for wb, ab in act_bits:
        q = apply_pass(gm, SimulatedQuantize(wbits=wb, abits=ab, exclude=exclude), data,
                       calib_batches=calib_batches).graph_module
        result["act_bits"][f"W{wb}A{ab}"] = measure(q)
        tick(f"W{wb}A{ab}")
    return result


def finetune_sparse(gm: fx.GraphModule, data: Data, epochs: int, lr: float, *, batch_size: int = 128,
                    callback=None) -> None:
    """Short fine-tuning (Adam, cosine schedule) that keeps every zero weight at zero.

    Weights that are exactly zero in a conv/linear weight are masked out of
    the gradient and re-zeroed at the end, so unstructured and N:M sparsity
    survive. ``callback`` is a :class:`~sntfx.train.TrainCallback` (progress).
    """
    import tempfile
    from pathlib import Path

    from .train import TrainConfig, Trainer

    masks = {n: (p != 0) for n, p in gm.named_parameters() if p.dim() > 1 and bool((p == 0).any())}
    params = dict(gm.named_parameters())
    hooks = [params[n].register_hook(lambda g, m=m: g * m) for n, m in masks.items()]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, schedule="cosine", weight_decay=0.0)
            Trainer(config, callback).fit(gm, data, Path(tmp) / "finetune.pt")
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
