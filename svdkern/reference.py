"""Plain-PyTorch definitions of every svdkern op: the ground truth.

Every kernel (C++ CPU, Triton CUDA) and every benchmark is compared against
these functions. They are written for clarity, not speed, and use only
differentiable torch operations, so autograd gives their gradients.

Math (docs/ARCHITECTURE.md §1, §3), for a layer with U (m×r), s (r,), V (n×r):

    compose(U, s, V)             = (U·diag(s))·Vᵀ                    (m×n)
    lowrank_linear(x, U, s, V, b) = ((x·V)·diag(s))·Uᵀ + b            (..., m)
    orth_loss(mats)              = Σ_M ‖MᵀM − I‖²_F / r_M²           (r_M = columns of M)
    sparsity_loss(svals, kind)   = Σ_s R(s),  R ∈ {‖s‖₁, ‖s‖₁/‖s‖₂, ‖s‖₁²/‖s‖₂²}

Losses accumulate in fp32 and return fp32 (fp64 for fp64 inputs). Where a form
exists whose intermediates cannot overflow while the result fits, it is the one
computed: orth_loss sums (MᵀM − I)²/r² as ((MᵀM − I)/r)², and the Hoyer measures,
which are scale invariant, are computed on t = s/‖s‖_∞ (so a vector of values
near the dtype's largest has a finite Hoyer measure in [1, √r]). A loss whose
value exceeds the dtype's range is inf. The Hoyer measures of an all-zero vector
are defined as 0 (with zero gradient): the denominator is clamped to the
smallest normal float.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "SPARSITY_KINDS",
    "compose",
    "compose_grouped",
    "loss_dtype",
    "lowrank_linear",
    "orth_loss",
    "sparsity_loss",
]

SPARSITY_KINDS = ("l1", "hoyer", "hoyer_square")


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss is accumulated and returned in: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compose(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """W = (U·diag(s))·Vᵀ with U (m×r), s (r,), V (n×r); returns W (m×n)."""
    return (U * s) @ V.T


def compose_grouped(
    Us: Sequence[torch.Tensor], ss: Sequence[torch.Tensor], Vs: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """[compose(U, s, V) for each layer]."""
    return [compose(U, s, V) for U, s, V in zip(Us, ss, Vs, strict=True)]


def lowrank_linear(
    x: torch.Tensor,
    U: torch.Tensor,
    s: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = ((x·V)·diag(s))·Uᵀ + bias with x (..., n), U (m×r), s (r,), V (n×r); y (..., m)."""
    y = ((x @ V) * s) @ U.T
    return y if bias is None else y + bias


def orth_loss(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_M ‖MᵀM − I‖²_F / r² over M (k×r) in mats, accumulated in fp32."""
    total = None
    for M in mats:
        acc = M.to(loss_dtype(M.dtype))
        r = acc.shape[1]
        eye = torch.eye(r, dtype=acc.dtype, device=acc.device)
        term = (((acc.T @ acc - eye) / r) ** 2).sum()
        total = term if total is None else total + term
    return total


def _sparsity(s: torch.Tensor, kind: str) -> torch.Tensor:
    if kind not in SPARSITY_KINDS:
        raise ValueError(f"sparsity kind must be one of {SPARSITY_KINDS}, got {kind!r}")
    if kind == "l1":
        return s.abs().sum()
    # h(s) = h(s / c) for any c > 0: with c = ‖s‖_∞ (a constant, so no gradient flows through
    # it) the sums below neither overflow nor underflow.
    amax = s.detach().abs().amax()
    t = s / torch.where(amax > 0, amax, torch.ones_like(amax))
    l2 = torch.linalg.vector_norm(t).clamp_min(torch.finfo(s.dtype).tiny)
    h = t.abs().sum() / l2
    return h if kind == "hoyer" else h**2


def sparsity_loss(svals: Sequence[torch.Tensor], kind: str = "hoyer") -> torch.Tensor:
    """Σ_s R(s) over the vectors in svals; R = L1, Hoyer or Hoyer-square; fp32."""
    total = None
    for s in svals:
        term = _sparsity(s.to(loss_dtype(s.dtype)), kind)
        total = term if total is None else total + term
    return total
