"""SVDRegularizer: the DESIGN §1 sums over layers, one grouped op call per term, fp32 under
autocast, argument checks."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import svdkern
from svdkern import ops, reference
from svdkern.nn import SVDConv2d, SVDLinear


def _model(dtype=torch.float64) -> nn.Module:
    model = nn.Sequential(
        SVDConv2d(3, 6, 3, rank=4, decomposition="channel"),
        nn.ReLU(),
        SVDConv2d(6, 5, (3, 1), rank=5, decomposition="spatial"),
        nn.Flatten(),
        SVDLinear(20, 7),
        nn.Sequential(SVDLinear(7, 9, rank=3), nn.Linear(9, 2)),
    ).to(dtype)
    with torch.no_grad():  # move the factors off the orthonormal init so orth > 0
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _layers(model):
    return [m for m in model.modules() if isinstance(m, (SVDLinear, SVDConv2d))]


@pytest.mark.parametrize("kind", ["l1", "hoyer", "hoyer_square"])
def test_regularizer_equals_per_layer_reference_sum(kind):
    model = _model()
    reg = svdkern.SVDRegularizer(model, orth=0.5, sparsity=kind, strength=0.07)
    out = reg(model)
    orth = sum(reference.orth_loss([m.U, m.V]) for m in _layers(model))
    sparsity = sum(reference.sparsity_loss([m.s], kind) for m in _layers(model))
    torch.testing.assert_close(out["orth"], orth)
    torch.testing.assert_close(out["sparsity"], sparsity)
    torch.testing.assert_close(out["total"], 0.5 * orth + 0.07 * sparsity)
    assert out["orth"] > 0


def test_regularizer_gradients_match_reference():
    model = _model()
    reg = svdkern.SVDRegularizer(model, orth=1.0, sparsity="hoyer", strength=0.3)
    reg(model)["total"].backward()
    got = [p.grad.clone() for m in _layers(model) for p in (m.U, m.s, m.V)]
    model.zero_grad()
    total = sum(
        reference.orth_loss([m.U, m.V]) + 0.3 * reference.sparsity_loss([m.s], "hoyer")
        for m in _layers(model)
    )
    total.backward()
    expected = [p.grad for m in _layers(model) for p in (m.U, m.s, m.V)]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_regularizer_makes_one_call_of_each_loss_op(monkeypatch):
    model = _model(torch.float32)
    calls = {"orth": 0, "sparsity": 0}
    orth_loss, sparsity_loss = ops.orth_loss, ops.sparsity_loss

    def count_orth(mats):
        calls["orth"] += 1
        assert len(mats) == 2 * len(_layers(model))
        return orth_loss(mats)

    def count_sparsity(svals, kind="hoyer"):
        calls["sparsity"] += 1
        assert len(svals) == len(_layers(model))
        return sparsity_loss(svals, kind)

    monkeypatch.setattr(ops, "orth_loss", count_orth)
    monkeypatch.setattr(ops, "sparsity_loss", count_sparsity)
    reg = svdkern.SVDRegularizer(model, sparsity="l1", strength=1.0)
    reg(model)["total"].backward()
    assert calls == {"orth": 1, "sparsity": 1}


def test_regularizer_is_fp32_under_autocast():
    model = _model(torch.float32)
    reg = svdkern.SVDRegularizer(model, sparsity="hoyer", strength=0.1)
    expected = reg(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = reg()
    for key in ("orth", "sparsity", "total"):
        assert out[key].dtype == torch.float32 and out[key].dim() == 0
        torch.testing.assert_close(out[key], expected[key])


def test_regularizer_without_sparsity():
    model = _model()
    out = svdkern.SVDRegularizer(model, orth=2.0, sparsity=None)(model)
    assert out["sparsity"].item() == 0.0
    torch.testing.assert_close(out["total"], 2.0 * out["orth"])


def test_regularizer_follows_pruned_layers():
    model = _model()
    reg = svdkern.SVDRegularizer(model, sparsity="l1", strength=1.0)
    svdkern.prune(model, energy=0.5)
    expected = sum(reference.sparsity_loss([m.s], "l1") for m in _layers(model))
    torch.testing.assert_close(reg(model)["sparsity"], expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"sparsity": "l2"}, "sparsity", id="unknown-kind"),
        pytest.param({"orth": -1.0}, "orth", id="negative-orth"),
        pytest.param({"strength": -0.1}, "strength", id="negative-strength"),
        pytest.param({"strength": float("nan")}, "strength", id="nan-strength"),
    ],
)
def test_regularizer_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        svdkern.SVDRegularizer(_model(), **kwargs)


def test_regularizer_needs_svd_layers():
    with pytest.raises(ValueError, match="decompose"):
        svdkern.SVDRegularizer(nn.Linear(3, 3))
