"""Models of `svdkern train`: shapes, the standard CIFAR ResNet sizes, option-A shortcuts,
the byte-level GPT-2, and how the pipeline decomposes them (every Linear/Conv2d/Conv1D but
the classifier `fc`)."""

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


def test_sizes_override_defaults_and_unknown_sizes_are_refused():
    assert build_model("cnn", (1, 8, 8), 10, width=4).fc.in_features == 16
    with pytest.raises(ValueError, match=r"'resnet20' takes the sizes none; got \['width'\]"):
        build_model("resnet20", (3, 32, 32), 10, width=8)


GPT = {"width": 48, "layers": 2, "heads": 3}  # 48 / 3 = 16 per head
SEQ = 12


def _gpt() -> nn.Module:
    return build_model("gpt2-tiny", (SEQ,), 256, **GPT).eval()


def test_gpt2_maps_token_ids_to_next_byte_logits():
    model = _gpt()
    out = model(torch.randint(0, 256, (3, SEQ)))
    assert type(out) is torch.Tensor and out.shape == (3, SEQ, 256)
    assert model.fc.weight is model.transformer.wte.weight
    assert model.transformer.config.n_positions == SEQ
    default = build_model("gpt2-tiny", (64,), 256)
    assert default.transformer.config.n_embd == 192 and len(default.transformer.h) == 4


def test_gpt2_is_causal():
    model = _gpt()
    x = torch.randint(0, 256, (1, SEQ))
    changed = x.clone()
    changed[0, -1] = (x[0, -1] + 1) % 256
    torch.testing.assert_close(model(changed)[:, :-1], model(x)[:, :-1])


def test_gpt2_decomposes_every_conv1d_exactly_and_keeps_the_tied_head():
    model = _gpt()
    projections = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    x = torch.randint(0, 256, (2, SEQ))
    expected = model(x)
    svdkern.decompose(model, "channel", skip=[CLASSIFIER])
    svd = [n for n, m in model.named_modules() if isinstance(m, svdkern.SVDLinear)]
    assert svd == projections and len(svd) == 4 * GPT["layers"]
    assert {n.rsplit(".", 1)[-1] for n in svd} == {"c_attn", "c_proj", "c_fc"}
    assert type(model.fc) is nn.Linear and model.fc.weight is model.transformer.wte.weight
    assert type(model.transformer.wte) is nn.Embedding
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-4)


def test_gpt2_macs_of_an_int64_example():
    model = _gpt()
    x = torch.randint(0, 256, (1, SEQ))
    w, layers = GPT["width"], GPT["layers"]
    # per token and block: c_attn w·3w, attn c_proj w·w, c_fc w·4w, mlp c_proj 4w·w
    dense = SEQ * (layers * 12 * w * w + w * 256)
    assert svdkern.flops(model, example_inputs=(x,)).dense_macs == dense
    svdkern.decompose(model, "channel", skip=[CLASSIFIER])
    report = svdkern.flops(model, example_inputs=(x,))
    assert report.dense_macs == report.compressed_macs == dense
    assert report.attention_macs > 0
