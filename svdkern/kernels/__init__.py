"""Triton implementations of the svdkern ops (the CUDA kernels; CPU under TRITON_INTERPRET=1).

`IMPLS` maps each op name of `svdkern.ops.OP_NAMES` to its host launcher, which
takes the op schema's positional arguments and returns the same structure;
`svdkern.ops` registers them with torch.library. The grouped launchers return
packed buffers (one tensor per output, as the schemas declare). One file per op:

    compose.py   compose, compose_backward, compose_grouped_packed, compose_grouped_backward
    lowrank.py   lowrank_linear, lowrank_linear_forward, lowrank_linear_backward
    orth.py      orth_loss, orth_loss_forward, orth_loss_backward
    sparsity.py  sparsity_loss, sparsity_loss_backward
    _gemm.py     the GEMM shared by compose and the long low-rank chain
"""

from __future__ import annotations

from collections.abc import Callable

from svdkern.kernels.compose import (
    compose_bwd,
    compose_fwd,
    compose_grouped_bwd,
    compose_grouped_fwd,
)
from svdkern.kernels.lowrank import lowrank_linear_bwd, lowrank_linear_forward, lowrank_linear_fwd
from svdkern.kernels.orth import orth_loss_bwd, orth_loss_forward_fwd, orth_loss_fwd
from svdkern.kernels.sparsity import sparsity_loss_bwd, sparsity_loss_fwd

__all__ = ["IMPLS"]

IMPLS: dict[str, Callable] = {
    "compose": compose_fwd,
    "compose_backward": compose_bwd,
    "compose_grouped_packed": compose_grouped_fwd,
    "compose_grouped_backward": compose_grouped_bwd,
    "lowrank_linear": lowrank_linear_fwd,
    "lowrank_linear_forward": lowrank_linear_forward,
    "lowrank_linear_backward": lowrank_linear_bwd,
    "orth_loss": orth_loss_fwd,
    "orth_loss_forward": orth_loss_forward_fwd,
    "orth_loss_backward": orth_loss_bwd,
    "sparsity_loss": sparsity_loss_fwd,
    "sparsity_loss_backward": sparsity_loss_bwd,
}
