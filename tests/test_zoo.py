"""Every torchvision classifier and a sample of timm families: transform, randomise, fold, compare.

Tolerance: norm-wise relative error of the eval-mode outputs <= 1e-5 (float32),
and the folded model has exactly the parameters of the original. Expanded
models estimated above ``zoo_check.BLOCKWISE_PARAMS`` are checked block by
block on each block's own recorded input (the ids say ``blockwise``).

The full sweep is marked slow (`make test-slow`, run by CI); a small
representative subset runs with `make test`.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from zoo_check import TOLERANCE, check_model, input_size

STYLES = ["linear", "branch", "qa-branch"]
TORCHVISION = torchvision.models.list_models(module=torchvision.models)
TIMM = [
    "resnet18",
    "efficientnet_b0",
    "mobilenetv3_small_100",
    "convnext_atto",
    "regnetx_002",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "repvgg_a0",
    "mobileone_s0",
]
FAST_TORCHVISION = ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "regnet_x_400mf"]
FAST_TIMM = ["vit_tiny_patch16_224"]


def _tv(name):
    s = input_size(name)
    return torchvision.models.get_model(name, weights=None), torch.randn(2, 3, s, s)


def _timm(name):
    import timm

    size = 224 if name.startswith(("vit", "deit")) else 64
    return timm.create_model(name, pretrained=False), torch.randn(2, 3, size, size)


def _assert_ok(r):
    assert r.expanded > 0, r
    assert r.max_rel_error <= TOLERANCE, r
    assert r.params_folded == r.params_original, r


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", FAST_TORCHVISION)
def test_torchvision_subset(name, style):
    model, x = _tv(name)
    _assert_ok(check_model(model, x, style, name=name))


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", FAST_TIMM)
def test_timm_subset(name, style):
    model, x = _timm(name)
    _assert_ok(check_model(model, x, style, name=name))


@pytest.mark.slow
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", [n for n in TORCHVISION if n not in FAST_TORCHVISION])
def test_every_torchvision_classifier(name, style):
    model, x = _tv(name)
    _assert_ok(check_model(model, x, style, name=name))


@pytest.mark.slow
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", [n for n in TIMM if n not in FAST_TIMM])
def test_timm_families(name, style):
    model, x = _timm(name)
    _assert_ok(check_model(model, x, style, name=name))
