"""Baselines of `svdkern train` and the layer views they share with the pipeline.

posthoc  truncated SVD of the trained dense model: `svdkern.decompose`, then
         `svdkern.prune(target_flops=...)` at the MACs of the SVD-trained result (one
         global energy threshold), then the same fine-tuning (λ_o kept, λ_s = 0).
trp      trained rank pruning (Xu et al., 2019): the dense weights are trained with a
         nuclear-norm regulariser λ_n·Σ‖W‖_*, and every k steps each weight is replaced
         by its truncated SVD, keeping the rank the pruning energy rule gives; afterwards
         the model is decomposed, pruned by the same rule and fine-tuned.

Weights are viewed as matrices as the SVD layers view them: a Linear weight as it is; a
conv weight (c_out, c_in, kh, kw) as c_out × (c_in·kh·kw) for "channel", (c_in·kh) ×
(c_out·kw) for "spatial". svdkern holds that view and the energy rule only privately (an
SVD layer's `_matrix_from_weight`, `svdkern.prune`'s `_rank_for`), for SVD layers, while
TRP applies them to the dense weights: hence `weight_matrix` and `energy_rank` here.
"""

from __future__ import annotations

import torch
from torch import nn

from svdkern.nn import is_conv1d_like
from svdkern.train.models import CLASSIFIER

__all__ = [
    "decomposable",
    "energy_rank",
    "nuclear_norm",
    "trp_truncate_",
    "weight_matrix",
]


def decomposable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the dense layers the pipeline decomposes: every Linear, Conv2d and
    transformers Conv1D (GPT-2's projections, weight stored (in, out)) but the classifier."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if (type(m) in (nn.Linear, nn.Conv2d) or is_conv1d_like(m)) and n != CLASSIFIER
    ]


def weight_matrix(weight: torch.Tensor, decomposition: str) -> torch.Tensor:
    """A Linear or Conv2d weight viewed as the matrix its SVD layer factorizes (a Conv1D's
    (in, out) weight is its transpose: the same singular values and truncation)."""
    if weight.dim() == 2:
        return weight
    c_out, c_in, kh, kw = weight.shape
    if decomposition == "channel":
        return weight.reshape(c_out, c_in * kh * kw)
    return weight.permute(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)


def _weight_from_matrix(W: torch.Tensor, like: torch.Tensor, decomposition: str) -> torch.Tensor:
    if like.dim() == 2:
        return W
    c_out, c_in, kh, kw = like.shape
    if decomposition == "channel":
        return W.reshape(like.shape)
    return W.reshape(c_in, kh, c_out, kw).permute(2, 0, 1, 3)


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k ≥ 1 with Σ_{i≤k} s_i² ≥ (1 − ε)·Σ s_i², s² sorted descending."""
    sq = torch.sort(s.detach().double() ** 2, descending=True).values
    total = sq.sum()
    if total <= 0:
        return 1
    kept = torch.cumsum(sq, 0) >= (1.0 - energy) * total
    return int(kept.nonzero()[0].item()) + 1


def nuclear_norm(model: nn.Module, decomposition: str) -> torch.Tensor:
    """Σ ‖W‖_* over the decomposable layers (differentiable: d‖W‖_*/dW = U·Vᵀ)."""
    terms = [
        torch.linalg.svdvals(weight_matrix(m.weight, decomposition)).sum()
        for _, m in decomposable(model)
    ]
    return torch.stack(terms).sum()


@torch.no_grad()
def trp_truncate_(model: nn.Module, decomposition: str, energy: float) -> dict[str, int]:
    """Replace every decomposable weight by its energy-rule truncated SVD; returns ranks."""
    ranks = {}
    for name, m in decomposable(model):
        W = weight_matrix(m.weight, decomposition).double()
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        k = energy_rank(s, energy)
        low = (U[:, :k] * s[:k]) @ Vh[:k]
        m.weight.copy_(_weight_from_matrix(low.to(m.weight.dtype), m.weight, decomposition))
        ranks[name] = k
    return ranks
