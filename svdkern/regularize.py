"""The SVD-training regularizer: orthogonality and sparsity of all SVD layers at once.

    orth     = Σ_layers (‖UᵀU − I‖²_F + ‖VᵀV − I‖²_F) / r²       (docs/ARCHITECTURE.md §1)
    sparsity = Σ_layers R(s),  R ∈ {‖s‖₁, ‖s‖₁/‖s‖₂, ‖s‖₁²/‖s‖₂²}
    total    = λ_o · orth + λ_s · sparsity

Each term is one grouped op call over the whole model (`svdkern.ops.orth_loss` over all
U and V, `svdkern.ops.sparsity_loss` over all s), not one call per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from svdkern import ops
from svdkern.nn import svd_layers
from svdkern.reference import SPARSITY_KINDS

__all__ = ["SVDRegularizer"]


def _check_strength(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


class SVDRegularizer:
    """Loss terms of SVD training for every SVDLinear / SVDConv2d in a model.

    Args:
        model: a model with SVD layers (see `svdkern.decompose`).
        orth: λ_o, weight of the orthogonality term (≥ 0).
        sparsity: "l1", "hoyer", "hoyer_square", or None for no sparsity term.
        strength: λ_s, weight of the sparsity term (≥ 0; 0 by default).

    `reg(model)` (or `reg()` for the model given here) returns a dict of scalars
    `{"orth", "sparsity", "total"}`: `orth` and `sparsity` are the unweighted sums over
    layers, `total = orth_scale·λ_o·orth + strength·sparsity`. `orth_scale` (default 1)
    amortizes the orthogonality term: `orth_scale=k` every k-th step and `orth_scale=0`
    (the Grams are then not computed; `orth` is returned as 0) on the others. They are
    computed in fp32 with autocast disabled (fp64 for an fp64 model); `sparsity` is 0
    when `sparsity=None`. Layers are collected at every call, so pruned (re-shaped)
    layers are picked up.

    Example::

        reg = svdkern.SVDRegularizer(model, orth=1.0, sparsity="hoyer", strength=0.07)
        loss = F.cross_entropy(model(x), y) + reg(model)["total"]
    """

    def __init__(
        self,
        model: nn.Module,
        orth: float = 1.0,
        sparsity: str | None = "hoyer",
        strength: float = 0.0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if sparsity is not None and sparsity not in SPARSITY_KINDS:
            raise ValueError(f"sparsity must be one of {SPARSITY_KINDS} or None, got {sparsity!r}")
        self.orth = _check_strength("orth", orth)
        self.strength = _check_strength("strength", strength)
        self.sparsity = sparsity
        if not svd_layers(model):
            raise ValueError(
                "model has no SVD layers (SVDLinear / SVDConv2d); convert it first with "
                "svdkern.decompose(model)"
            )
        self.model = model

    def __call__(
        self, model: nn.Module | None = None, orth_scale: float = 1.0
    ) -> dict[str, torch.Tensor]:
        layers = [layer for _, layer in svd_layers(self.model if model is None else model)]
        if not layers:
            raise ValueError("model has no SVD layers (SVDLinear / SVDConv2d)")
        param = layers[0].s
        dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        with torch.autocast(param.device.type, enabled=False):
            if orth_scale == 0:
                orth = torch.zeros((), dtype=dtype, device=param.device)
            else:
                orth = ops.orth_loss([m.U for m in layers] + [m.V for m in layers]).to(dtype)
            if self.sparsity is None:
                sparsity = torch.zeros((), dtype=dtype, device=param.device)
            else:
                sparsity = ops.sparsity_loss([m.s for m in layers], self.sparsity).to(dtype)
        total = orth * (self.orth * orth_scale) + sparsity * self.strength
        return {"orth": orth, "sparsity": sparsity, "total": total}

    def __repr__(self) -> str:
        return (
            f"SVDRegularizer(orth={self.orth}, sparsity={self.sparsity!r}, "
            f"strength={self.strength})"
        )
