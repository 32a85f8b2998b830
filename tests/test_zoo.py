"""Every torchvision classifier and a sample of timm families: transform, randomise, fold, compare.

Criteria (``zoo_check.ZooResult.ok``): the folded model has exactly the
parameters of the original; in float64 the folded and expanded models agree
to 1e-8 (the fold's algebra is exact); in float32 they agree to a norm-wise
relative error of 1e-5, or within 16x the float32 evaluation noise of the
expanded model itself for the few randomly initialised networks too
ill-conditioned for 1e-5 to be meaningful (the failure message shows both).
Models whose expanded form exceeds ``zoo_check.BLOCKWISE_PARAMS`` (300M
parameters, for memory) are checked block by block on each block's own
recorded input; everything smaller is expanded, folded and compared whole.

A small representative subset runs with `make test`, every style on each of
its models. The rest of the sweep is marked slow: `make test-slow` (run by CI)
checks each of those models with one style, the styles taking turns down the
list so that every style meets every family; the other two styles of each
model are marked ``exhaustive`` as well and run with `make test-zoo` (all
three styles on every model, over an hour on 2 cores).
"""

from __future__ import annotations

import gc

import pytest
import torch
import torchvision

from zoo_check import check_model, input_size

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


@pytest.fixture(autouse=True)
def _free_models_between_tests():
    """GraphModules hold reference cycles, so a finished check's tensors wait for the cyclic
    collector; over the sweep several multi-GB models piled up (19 GB peak). Collect after each."""
    yield
    gc.collect()


def _input(size):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def _tv(name):
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None), _input(input_size(name))


def _timm(name):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False), _input(224 if name.startswith(("vit", "deit")) else 64)


def _assert_ok(r):
    assert r.ok, r


def _cases(all_names, fast):
    """(name, style) for every model and style: the fast subset unmarked; of the others, one style per model
    (taking turns down the list) marked slow, the other two slow and exhaustive."""
    cases, turn = [], 0
    for name in all_names:
        if name in fast:
            cases += [(name, style) for style in STYLES]
            continue
        for i, style in enumerate(STYLES):
            marks = [pytest.mark.slow] + ([] if i == turn % len(STYLES) else [pytest.mark.exhaustive])
            cases.append(pytest.param(name, style, marks=marks, id=f"{name}-{style}"))
        turn += 1
    return cases


@pytest.mark.parametrize(("name", "style"), _cases(TORCHVISION, FAST_TORCHVISION))
def test_torchvision_classifier(name, style):
    model, x = _tv(name)
    _assert_ok(check_model(model, x, style, name=name))


@pytest.mark.parametrize(("name", "style"), _cases(TIMM, FAST_TIMM))
def test_timm_family(name, style):
    model, x = _timm(name)
    _assert_ok(check_model(model, x, style, name=name))


BUILTIN = ["cnn", "smallvgg", "resnet8", "resnet20", "resnet32", "resnet56", "vgg11", "vgg16", "mobilenetv2", "vit"]


def test_builtin_list_is_complete():
    from sntfx.zoo import BUILTIN_MODELS

    assert sorted(BUILTIN) == sorted(BUILTIN_MODELS)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", BUILTIN)  # all fast: 27 checks in ~16 s
def test_builtin_model(name, style):
    from sntfx.models import ModelSpec

    spec = ModelSpec.parse(f"sntfx:{name}")
    torch.manual_seed(0)
    model = spec.build()
    shape = spec.example_inputs()[0].shape
    x = torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(0))
    _assert_ok(check_model(model, x, style, name=name))
