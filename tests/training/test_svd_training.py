"""End to end on synthetic data (seconds): SVD training with the orthogonality and Hoyer
regularizers lowers the orth loss and drives small singular values down; energy pruning then
removes them with the accuracy kept, and the compressed model gives the same predictions."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import svdkern
from svdkern.nn import SVDLinear


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # labels depend on a 3-dimensional projection of the 24 inputs: a low-rank task
    g = torch.Generator().manual_seed(1234)
    teacher = torch.randn(24, 3, generator=g) @ torch.randn(3, 4, generator=g)
    x = torch.randn(n, 24, generator=torch.Generator().manual_seed(seed))
    return x, (x @ teacher).argmax(1)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _train(strength: float, steps: int = 250) -> tuple[nn.Module, dict[str, float]]:
    torch.manual_seed(0)
    x, y = _data(2048, seed=0)
    dense = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 4))
    model = svdkern.decompose(dense)
    with torch.no_grad():  # start off-orthonormal so the orth term has work to do
        for layer in model.modules():
            if isinstance(layer, SVDLinear):
                layer.U.add_(0.2 * torch.randn_like(layer.U))
                layer.V.add_(0.2 * torch.randn_like(layer.V))
    reg = svdkern.SVDRegularizer(model, orth=1.0, sparsity="hoyer", strength=strength)
    orth_start = reg(model)["orth"].item()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        batch = slice((step * 256) % 2048, (step * 256) % 2048 + 256)
        terms = reg(model)
        loss = F.cross_entropy(model(x[batch]), y[batch]) + terms["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, {"orth_start": orth_start, "orth_end": reg(model)["orth"].item()}


def test_svd_training_with_hoyer_then_pruning_keeps_accuracy():
    x_test, y_test = _data(1024, seed=1)
    model, hoyer = _train(strength=0.1)
    baseline, plain = _train(strength=0.0)

    # the orthogonality term pulls the perturbed factors back to orthonormal
    assert hoyer["orth_end"] < 0.1 * hoyer["orth_start"]
    assert plain["orth_end"] < 0.1 * plain["orth_start"]

    # Hoyer drives most singular values of the 24×32 first layer to ~0; plain training does not
    def small(layer):
        s = layer.s.detach().abs()
        return int((s < 0.01 * s.max()).sum())

    assert small(model[0]) >= 12 and small(baseline[0]) == 0

    accuracy = _accuracy(model, x_test, y_test)
    assert accuracy > 0.9
    report = svdkern.prune(model, energy=1e-3)
    assert model[0].rank <= 10, str(report)
    assert baseline[0].rank == 24  # not pruned: the comparison model keeps its rank
    assert _accuracy(model, x_test, y_test) >= accuracy - 0.01

    deployable = svdkern.compress(model)
    with torch.no_grad():
        torch.testing.assert_close(deployable(x_test), model(x_test), rtol=1e-4, atol=1e-5)
