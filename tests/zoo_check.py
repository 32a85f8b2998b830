"""Helpers for the model-zoo equivalence tests (also usable from a shell).

``check_model`` builds a model with random weights, randomises its
BatchNorm statistics, transforms it with a style, randomises the expanded
blocks (weights and norm statistics), folds, and compares eval-mode outputs
of the folded model with the expanded one, twice:

* in float64 (the expanded model converted, then folded): this isolates the
  algebra of the fold from float32 rounding and must agree to ``FP64_TOLERANCE``;
* in float32: the folded model must agree with the expanded one within
  ``TOLERANCE`` (1e-5), or, for a randomly initialised network so badly
  conditioned that float32 evaluation of the expanded model itself is off by
  more than that from its float64 value, within ``NOISE_FACTOR`` (16) times that
  float32 noise. ``ZooResult.fp32_noise`` records it, so reports can say which
  models needed the second clause.

Models whose expanded form has more than ``BLOCKWISE_PARAMS`` (300M)
parameters, counted exactly by building each block on the meta device, are not
expanded whole (the float32 and float64 copies would not fit beside each other
in the CI machine's memory): each distinct layer configuration is expanded on
its own and checked on the input it receives in the original model. In that mode a ``linear`` block that would exceed
``MAX_BLOCK_PARAMS`` at the requested ratio (RegNetY-128GF's 7392-wide 1x1
convs, VGG's 25088-wide classifier) is checked at ratio 1, which exercises
the same composition; ``ZooResult.reduced`` counts those layers.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

import sntfx
from sntfx.blocks import LAYER_CLASSES, BranchBlock, LayerConfig, LinearExpansion, make_block
from sntfx.graph_utils import is_plain, randomize_
from sntfx.tracing import compare_outputs

# Expanded models above this many parameters are checked block by block. The
# whole-model check holds the expanded model in float32 and float64 plus both
# folds (about 24 bytes per expanded parameter, ~7 GB at this bound) and fits
# the 24 GiB of the CI machine with room for activations; only models of
# hundreds of millions of expanded parameters go block by block.
BLOCKWISE_PARAMS = 300_000_000
FP64_TOLERANCE = 1e-8
NOISE_FACTOR = 16.0
MAX_BLOCK_PARAMS = 30_000_000
TOLERANCE = 1e-5

# Input sizes: the smallest each model accepts keeps the sweep fast.
FIXED_SIZE = {"inception_v3": 299}
NEEDS_224 = ("vit_", "swin", "maxvit", "regnet_y_128gf")


@dataclass
class ZooResult:
    name: str
    style: str
    mode: str  # "whole" or "blockwise"
    max_rel_error: float
    params_original: int
    params_folded: int
    expanded: int
    seconds: float
    reduced: int = 0
    fp64_error: float = 0.0
    fp32_noise: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.expanded > 0
            and self.params_folded == self.params_original
            and self.fp64_error <= FP64_TOLERANCE
            and self.max_rel_error <= max(TOLERANCE, NOISE_FACTOR * self.fp32_noise)
        )


def input_size(name: str) -> int:
    if name in FIXED_SIZE:
        return FIXED_SIZE[name]
    if name.startswith(NEEDS_224):
        return 224
    return 64


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_model(model: nn.Module, x: torch.Tensor, style: str, *, ratio: int = 2, name: str = "") -> ZooResult:
    start = time.perf_counter()
    torch.manual_seed(0)
    model.eval()
    randomize_(model, seed=1)
    if expanded_estimate(model, style, ratio) > BLOCKWISE_PARAMS:
        return _check_blockwise(model, x, style, ratio, name, start)
    gm = sntfx.trace(model, x)
    original_params = count(gm)
    snt, report = sntfx.transform(gm, x, style=style, ratio=ratio, report=True, inplace=True)
    randomize_(snt, seed=2)
    snt.eval()
    snt64, x64 = copy.deepcopy(snt).double(), x.double()
    with torch.no_grad():
        want, want64 = snt(x), snt64(x64)
    folded = sntfx.fold(snt, x, inplace=True)
    folded64 = sntfx.fold(snt64, x64, inplace=True)
    with torch.no_grad():
        got, got64 = folded(x), folded64(x64)
    expanded = sum(v for k, v in report.passes[0].stats.items() if k.startswith("expanded"))
    return ZooResult(name, style, "whole", compare_outputs(want, got), original_params, count(folded), expanded,
                     time.perf_counter() - start, fp64_error=compare_outputs(want64, got64),
                     fp32_noise=compare_outputs(want64, want))


@functools.lru_cache(maxsize=None)
def block_params(config: LayerConfig, style: str, ratio: int) -> int:
    """Exact parameter count of the block replacing a layer (built on the meta device: no memory)."""
    with torch.device("meta"):
        if style == "linear":
            block = LinearExpansion(config, ratio)
        else:
            block = BranchBlock(config, qa=style == "qa-branch")
    return count(block)


def expanded_estimate(model: nn.Module, style: str, ratio: int) -> int:
    """Parameters the model will have after expansion, if every plain conv/linear layer is expanded."""
    total = count(model)
    for m in model.modules():
        if is_plain(m, *LAYER_CLASSES.values()):
            total += block_params(LayerConfig.from_module(m), style, ratio) - count(m)
    return total


def _check_blockwise(model, x, style, ratio, name, start) -> ZooResult:
    inputs: dict[LayerConfig, tuple[str, torch.Tensor]] = {}
    hooks = []
    for path, m in model.named_modules():
        if is_plain(m, *LAYER_CLASSES.values()):
            config = LayerConfig.from_module(m)

            def hook(mod, args, path=path, config=config):
                inputs.setdefault(config, (path, args[0].detach()))

            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    worst, n, reduced = 0.0, 0, 0
    gen = torch.Generator().manual_seed(3)
    for config, (path, inp) in inputs.items():
        layer = model.get_submodule(path)
        r = ratio
        if style == "linear" and block_params(config, style, ratio) > MAX_BLOCK_PARAMS:
            r, reduced = 1, reduced + 1
        block = make_block(layer, style, ratio=r, gen=gen)
        randomize_(block, seed=n)
        block.eval()
        folded, residual = block.fold()
        if LayerConfig.from_module(folded) != config:
            return ZooResult(name, style, "blockwise", math.inf, count(model), -1, n, time.perf_counter() - start)
        with torch.no_grad():
            want = block(inp)
            got = folded(inp)
            if residual is not None:
                shape = (-1,) if config.kind == "linear" else (1, -1, *([1] * (got.dim() - 2)))
                got = got + residual.to(got).reshape(shape)
        worst = max(worst, compare_outputs(want, got))
        n += 1
    return ZooResult(name, style, "blockwise", worst, count(model), count(model), n, time.perf_counter() - start,
                     reduced)


if __name__ == "__main__":  # python tests/zoo_check.py [names...]
    import sys

    import torchvision

    names = sys.argv[1:] or torchvision.models.list_models(module=torchvision.models)
    for nm in names:
        m = torchvision.models.get_model(nm, weights=None)
        s = input_size(nm)
        for st in ("linear", "branch", "qa-branch"):
            r = check_model(copy.deepcopy(m), torch.randn(2, 3, s, s), st, name=nm)
            print(f"{nm:28s} {st:10s} {r.mode:9s} err={r.max_rel_error:.2e} params {r.params_original}->{r.params_folded} "
                  f"n={r.expanded} reduced={r.reduced} {r.seconds:.1f}s", flush=True)
