"""svdkern.grouped_compose: one compose_grouped call for a whole model, same results."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import svdkern
from svdkern import ops


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    ).double()
    return svdkern.decompose(model)


def _loss_and_grads(model, x, y):
    loss = F.cross_entropy(model(x), y)
    return loss, torch.autograd.grad(loss, list(model.parameters()))


def test_grouped_compose_matches_per_layer_compose_values_and_gradients(monkeypatch):
    model = _model()
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 7])
    for layer in model.modules():
        if isinstance(layer, (svdkern.SVDLinear, svdkern.SVDConv2d)):
            layer.mode = "compose"
    loss, grads = _loss_and_grads(model, x, y)

    calls = {"compose": 0, "compose_grouped": 0}
    for name in calls:
        original = getattr(ops, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(ops, name, counted)
    with svdkern.grouped_compose(model):
        grouped_loss, grouped_grads = _loss_and_grads(model, x, y)
    assert calls == {"compose": 0, "compose_grouped": 1}
    torch.testing.assert_close(grouped_loss, loss, rtol=1e-12, atol=1e-12)
    for g, e in zip(grouped_grads, grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert all(m._grouped_matrix is None for m in model.modules() if hasattr(m, "_grouped_matrix"))


def test_grouped_compose_leaves_out_layers_on_the_chain_path():
    model = _model()
    model[5].mode, model[7].mode = "chain", "compose"
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model(x)  # the layers record their path
    with svdkern.grouped_compose(model):
        assert model[5]._grouped_matrix is None
        assert model[0]._grouped_matrix is not None and model[7]._grouped_matrix is not None
        out = model(x)
    torch.testing.assert_close(out, model(x), rtol=1e-12, atol=1e-12)


def test_grouped_compose_matches_the_reference_values_and_gradients():
    """Against the plain-PyTorch reference (not the per-layer op, whose backward the grouped
    kernels share), in fp32 as a model trains."""
    model = _model().float()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 7])
    for layer in model.modules():
        if isinstance(layer, (svdkern.SVDLinear, svdkern.SVDConv2d)):
            layer.mode = "compose"
    with ops.reference_mode():
        loss, grads = _loss_and_grads(model, x, y)
    with svdkern.grouped_compose(model):
        grouped_loss, grouped_grads = _loss_and_grads(model, x, y)
    torch.testing.assert_close(grouped_loss, loss, rtol=1e-5, atol=1e-6)
    for g, e in zip(grouped_grads, grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
