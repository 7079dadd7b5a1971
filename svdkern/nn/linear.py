"""`SVDLinear`: nn.Linear with its weight kept as U·diag(s)·Vᵀ; `is_conv1d_like` recognises
the transposed-weight Linear of transformers (`Conv1D`, GPT-2), which `SVDLinear.from_dense`
also takes.

Example::

    layer = SVDLinear.from_dense(nn.Linear(64, 32))   # exact: layer(x) == linear(x)
    layer.prune_(8)                                   # keep the 8 largest |s|
    pair = layer.to_lowrank()                         # Linear(64, 8) → Linear(8, 32)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from svdkern import ops
from svdkern.nn import _base
from svdkern.nn._base import SVDLayer, _uninitialized

__all__ = ["SVDLinear", "is_conv1d_like"]


def is_conv1d_like(module: nn.Module) -> bool:
    """True for transformers' `Conv1D` (GPT-2 and its relatives): a Linear y = x·W + b
    whose weight W has shape (in, out) = (nx, nf). Recognised by its class name (itself or
    a base class named "Conv1D"), a 2-D weight and an `nf` attribute equal to W.shape[1],
    so transformers need not be imported."""
    if not isinstance(module, nn.Module):
        return False
    if not any(cls.__name__ == "Conv1D" for cls in type(module).__mro__):
        return False
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


class SVDLinear(SVDLayer):
    """Linear layer y = x·Wᵀ + b with W = U·diag(s)·Vᵀ kept factorized.

    Shapes: x (..., in_features) → y (..., out_features); U (out_features × r),
    s (r,), V (in_features × r), bias (out_features,). r = rank ≤ min(in, out).

    forward runs `ops.compose` + `F.linear` or the fused chain `ops.lowrank_linear`
    (((x·V)·diag(s))·Uᵀ + b), picking the one with fewer MACs: compose costs
    m·n·r + rows·m·n, the chain rows·r·(m + n) (m = out, n = in, rows = x.numel() / n);
    `mode="compose" | "chain"` forces a path.

    A new layer is initialised like `nn.Linear` (Kaiming-uniform weight), then factorized
    by SVD and truncated to `rank`.

    Example::

        layer = SVDLinear.from_dense(nn.Linear(128, 64))   # equal outputs at full rank
        y = layer(torch.randn(10, 128))                     # (10, 64)
        layer.prune_(16)                                    # rank 16
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        rank: int | None = None,
        *,
        mode: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._m, self._n = out_features, in_features
        self.mode = mode
        self._make_parameters(
            rank, out_features if bias else None, {"device": device, "dtype": dtype}
        )
        if _base._init_parameters:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's initialisation of a dense weight, factorized by SVD and truncated."""
        if self.U.device.type == "meta":
            return
        weight = torch.empty(self._m, self._n, dtype=torch.float64)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self._init_from_weight(weight)
        if self.bias is not None:
            bound = 1 / math.sqrt(self._n) if self._n > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_dense(
        cls, linear: nn.Module, rank: int | None = None, *, mode: str = "auto"
    ) -> SVDLinear:
        """Exact factorization of `linear` (float64 SVD, cast back), optionally truncated.

        `linear` is an nn.Linear (weight (out, in)) or a transformers `Conv1D`
        (`is_conv1d_like`: weight (in, out), y = x·W + b); either way the result computes
        the same y = x·Wᵀ + b with in_features, out_features of the dense map.
        """
        if isinstance(linear, nn.Linear):
            weight = linear.weight
        elif is_conv1d_like(linear):
            weight = linear.weight.mT
        else:
            raise TypeError(
                "linear must be an nn.Linear or a transformers Conv1D (weight (in, out), "
                f"attribute nf), got {type(linear).__name__}"
            )
        bias = getattr(linear, "bias", None)
        out_features, in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(
                f"{type(linear).__name__}.bias must have shape ({out_features},), got "
                f"{list(bias.shape)}"
            )
        with _uninitialized():
            layer = cls(
                in_features,
                out_features,
                bias=bias is not None,
                rank=rank,
                mode=mode,
                device=weight.device,
                dtype=weight.dtype,
            )
        layer._init_from_weight(weight)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer.train(linear.training)

    def _matrix_from_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def _weight_from_matrix(self, W: torch.Tensor) -> torch.Tensor:
        return W

    @property
    def geometry(self) -> tuple:
        return ("linear", self._m, self._n, self.bias is not None)

    def macs(self, input_shape: Sequence[int], rank: int | None = None) -> tuple[int, int]:
        r = self.rank if rank is None else rank
        rows = math.prod(input_shape[:-1])
        return rows * self._m * self._n, rows * r * (self._m + self._n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_chain(x.shape):
            return ops.lowrank_linear(x, self.U, self.s, self.V, self.bias)
        return F.linear(x, self._matrix(), self.bias)

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """nn.Linear with weight U·diag(s)·Vᵀ and the same bias."""
        return self._filled(
            nn.Linear(
                self._n, self._m, self.bias is not None, device=self.U.device, dtype=self.U.dtype
            )
        )

    @torch.no_grad()
    def to_lowrank(self) -> nn.Sequential:
        """nn.Sequential(Linear(in, r, bias=False), Linear(r, out)); s folded into the first."""
        factory = {"device": self.U.device, "dtype": self.U.dtype}
        first = nn.Linear(self._n, self.rank, bias=False, **factory)
        second = nn.Linear(self.rank, self._m, self.bias is not None, **factory)
        first.weight.copy_((self.V * self.s).mT)
        second.weight.copy_(self.U)
        if self.bias is not None:
            second.bias.copy_(self.bias)
        return nn.Sequential(first, second).train(self.training)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self._rank_repr()}, bias={self.bias is not None}"
        )
