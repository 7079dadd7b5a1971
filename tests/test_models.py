"""Models of `svdkern train`: shapes, the standard CIFAR ResNet sizes, option-A shortcuts,
and how the pipeline decomposes them (every Linear/Conv2d but the classifier `fc`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import svdkern
from svdkern.train.models import CLASSIFIER, build_model

# Parameter counts of He et al.'s CIFAR ResNets with option-A shortcuts (0.27 M, 0.46 M,
# 0.85 M, 1.7 M, as in the widely used akamaster/pytorch_resnet_cifar10) and the CIFAR
# ResNet-18 (11.17 M).
PARAMS = {
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "resnet18": 11_173_962,
}


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_digits_models_map_8x8_to_10_logits(name):
    model = build_model(name, (1, 8, 8), 10)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert isinstance(getattr(model, CLASSIFIER), nn.Linear)


@pytest.mark.parametrize("name", list(PARAMS))
def test_cifar_resnet_parameter_counts(name):
    model = build_model(name, (3, 32, 32), 10)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_cifar_resnet_forward_shape(name):
    model = build_model(name, (3, 32, 32), 10).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_option_a_shortcut_subsamples_and_zero_pads():
    block = build_model("resnet20", (3, 32, 32), 10).layers[1][0]
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0
    assert not list(block.shortcut.parameters())


def test_resnet20_decomposes_every_conv_but_not_fc():
    model = build_model("resnet20", (3, 32, 32), 10).eval()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    svdkern.decompose(model, "channel", skip=[CLASSIFIER])
    svd = [n for n, m in model.named_modules() if isinstance(m, svdkern.SVDConv2d)]
    assert svd == convs and len(svd) == 19
    assert type(model.fc) is nn.Linear
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg", (3, 32, 32), 10)
