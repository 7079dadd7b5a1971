"""svdkern.compress: what the plain form of each SVD layer keeps of it (trainable or frozen
weights and bias, each on its own). The policies' choices are tested in test_costs.py
("flops") and test_convert.py ("latency"), the example inputs in test_examples.py."""

from __future__ import annotations

import warnings

import pytest
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import svdkern
from svdkern.nn import SVDConv2d, SVDLinear


def _layers() -> dict[str, nn.Module]:
    return {
        "linear": SVDLinear(12, 10, rank=3),
        "conv": SVDConv2d(4, 6, 3, rank=2),
        "spatial": SVDConv2d(4, 6, 3, rank=2, decomposition="spatial"),
    }


@pytest.mark.parametrize("kind", ["linear", "conv", "spatial"])
@pytest.mark.parametrize("policy", ["lowrank", "dense"])
@pytest.mark.parametrize("frozen", ["bias", "factors"])
def test_plain_form_keeps_which_of_weights_and_bias_are_frozen(kind, policy, frozen):
    layer = _layers()[kind]
    if frozen == "bias":
        layer.bias.requires_grad_(False)
    else:
        for p in (layer.U, layer.s, layer.V):
            p.requires_grad_(False)
    plain = svdkern.compress(nn.Sequential(layer), policy)[0]
    params = dict(plain.named_parameters())
    biases = [name for name in params if name.endswith("bias")]
    assert len(biases) == 1 and len(params) == (3 if policy == "lowrank" else 2)
    for name, p in params.items():
        assert p.requires_grad is ((name in biases) != (frozen == "bias")), name
