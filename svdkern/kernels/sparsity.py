"""sparsity_loss: Σ_s R(s) over all vectors in one launch, and its backward in one launch.

    l1:            R = ‖s‖₁                     dR/ds = sign(s)
    hoyer:         R = h = ‖t‖₁ / max(‖t‖₂, tiny)
                   dh/ds = (sign(t)/l2 − [‖t‖₂ ≥ tiny]·‖t‖₁·t/‖t‖₂³) / c
    hoyer_square:  R = h²                        dR/ds = 2h·dh/ds

with t = s/c, c = ‖s‖_∞ (1 for a zero vector): the Hoyer measures are scale
invariant, and the sums of t neither overflow nor underflow (a first pass over
the vector finds c). tiny is the smallest normal number of the loss dtype, so an
all-zero vector has R = 0 and zero gradient (as svdkern.reference). An L1 sum
beyond the loss dtype's range is inf. Square roots and divisions are
correctly rounded (tl.sqrt_rn, tl.div_rn in fp32; fp64's are IEEE already): the
GPU's default fp32 forms (sqrt.approx.ftz, div.full) are a few ulp off and flush a
subnormal ‖s‖₂² to zero. The vectors are packed into one
buffer; program p handles vectors p, p + programs, …, accumulating in fp32 (fp64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from svdkern._checks import check_svals
from svdkern.kernels._common import (
    acc_dtype,
    check_device_dtype,
    device_guard,
    num_sms,
    offsets,
    pack,
    problem_table,
)
from svdkern.reference import loss_dtype

_KINDS = {"l1": 0, "hoyer": 1, "hoyer_square": 2}
_BLOCK = 1024


@triton.jit
def _scale(S, start, end, SCALED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """c = ‖s‖_∞ of S[start:end] in ACC (1 for a zero vector, or when not SCALED)."""
    c = tl.full((), 1.0, ACC)
    if SCALED:
        amax = tl.zeros((BLOCK,), dtype=ACC)
        for i in range(start, end, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            x = tl.load(S + offs, mask=offs < end, other=0.0).to(ACC)
            amax = tl.maximum(amax, tl.abs(x))
        m = tl.max(amax, axis=0)
        c = tl.where(m > 0, m, c)
    return c


@triton.jit
def _norms(S, start, end, c, SCALED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """(‖t‖₁, ‖t‖₂²) of t = S[start:end] / c (t = s when not SCALED) in ACC."""
    l1 = tl.zeros((BLOCK,), dtype=ACC)
    sq = tl.zeros((BLOCK,), dtype=ACC)
    for i in range(start, end, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        x = tl.load(S + offs, mask=offs < end, other=0.0).to(ACC)
        if SCALED:
            x = _div(x, c, ACC)
        l1 += tl.abs(x)
        sq += x * x
    return tl.sum(l1, axis=0), tl.sum(sq, axis=0)


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    """Correctly rounded √x in ACC."""
    return tl.sqrt_rn(x) if ACC.primitive_bitwidth == 32 else tl.sqrt(x)


@triton.jit
def _div(x, y, ACC: tl.constexpr):
    """Correctly rounded x / y in ACC."""
    return tl.div_rn(x, y) if ACC.primitive_bitwidth == 32 else x / y


@triton.jit
def _sparsity_fwd_kernel(
    S,
    OFFS,
    PART,
    NUM_VECS,
    KIND: tl.constexpr,
    ACC: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """PART[p] = Σ R(s_g) over vectors g = p, p + programs, …; s_g = S[OFFS[g]:OFFS[g+1]]."""
    pid = tl.program_id(0)
    total = tl.zeros((1,), dtype=ACC)
    for g in range(pid, NUM_VECS, tl.num_programs(0)):
        start = tl.load(OFFS + g)
        end = tl.load(OFFS + g + 1)
        c = _scale(S, start, end, KIND != 0, ACC, BLOCK)
        l1, sq = _norms(S, start, end, c, KIND != 0, ACC, BLOCK)
        if KIND == 0:
            total += l1
        else:
            h = _div(l1, tl.maximum(_sqrt(sq, ACC), tl.full((), TINY, ACC)), ACC)
            if KIND == 1:
                total += h
            else:
                total += h * h
    tl.store(PART + pid + tl.arange(0, 1), total)


@triton.jit
def _sparsity_bwd_kernel(
    S,
    OFFS,
    GRAD,
    OUT,
    NUM_VECS,
    KIND: tl.constexpr,
    ACC: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """OUT[OFFS[g]:OFFS[g+1]] = grad · dR/ds_g (formulas in the module docstring)."""
    pid = tl.program_id(0)
    grad = tl.load(GRAD).to(ACC)
    tiny = tl.full((), TINY, ACC)
    for g in range(pid, NUM_VECS, tl.num_programs(0)):
        start = tl.load(OFFS + g)
        end = tl.load(OFFS + g + 1)
        c = _scale(S, start, end, KIND != 0, ACC, BLOCK)
        l1, sq = _norms(S, start, end, c, KIND != 0, ACC, BLOCK)
        norm = _sqrt(sq, ACC)
        l2 = tl.maximum(norm, tiny)
        h = _div(l1, l2, ACC)
        # The clamp passes no gradient below tiny (an all-zero vector gets zero gradient).
        # h/l2 · (s/l2) rather than h/l2² · s: l2² would overflow for tiny norms.
        hl = tl.where(norm >= tiny, _div(h, l2, ACC), 0.0)
        for i in range(start, end, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            mask = offs < end
            x = tl.load(S + offs, mask=mask, other=0.0).to(ACC)
            sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(ACC)
            if KIND == 0:
                d = sign
            else:
                t = _div(x, c, ACC)
                d = _div(sign, l2, ACC) - hl * _div(t, l2, ACC)
                if KIND == 2:
                    d = 2.0 * h * d
                d = _div(d, c, ACC)
            tl.store(OUT + offs, (grad * d).to(OUT.dtype.element_ty), mask=mask)


def _layout(svals: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, int]:
    sizes = [s.shape[0] for s in svals]
    return problem_table([[o] for o in offsets([*sizes, 0])], device).view(-1), sum(sizes)


def _programs(svals: Sequence[torch.Tensor], total: int, device: torch.device) -> int:
    """One program for a small model (no second reduction), more for many long vectors."""
    return max(1, min(len(svals), total // (8 * _BLOCK), 4 * num_sms(device)))


def sparsity_loss_fwd(svals: Sequence[torch.Tensor], kind: str) -> torch.Tensor:
    """Σ_s R(s) over 1-D vectors s; R by kind ∈ {l1, hoyer, hoyer_square}; 0-d fp32 (fp64)."""
    svals = list(svals)
    check_svals("sparsity_loss", svals, kind)
    check_device_dtype("sparsity_loss", svals[0])
    dtype, device = svals[0].dtype, svals[0].device
    ldtype = loss_dtype(dtype)
    offs, total = _layout(svals, device)
    programs = _programs(svals, total, device)
    part = torch.empty(programs, dtype=ldtype, device=device)
    with device_guard(svals[0]):
        _sparsity_fwd_kernel[(programs,)](
            pack(svals), offs, part, len(svals),
            KIND=_KINDS[kind], ACC=acc_dtype(dtype), TINY=torch.finfo(ldtype).tiny, BLOCK=_BLOCK,
        )  # fmt: skip
    return part.view(()) if programs == 1 else part.sum()


def sparsity_loss_bwd(grad: torch.Tensor, svals: Sequence[torch.Tensor], kind: str) -> torch.Tensor:
    """[grad · dR/ds for s in svals] packed back to back, in s's dtype; one launch."""
    svals = list(svals)
    check_svals("sparsity_loss_backward", svals, kind)
    check_device_dtype("sparsity_loss_backward", svals[0])
    dtype, device = svals[0].dtype, svals[0].device
    ldtype = loss_dtype(dtype)
    offs, total = _layout(svals, device)
    out = torch.empty(total, dtype=dtype, device=device)
    grad = grad.detach().reshape(1).to(device=device, dtype=ldtype)
    programs = max(1, min(len(svals), 4 * num_sms(device)))
    with device_guard(svals[0]):
        _sparsity_bwd_kernel[(programs,)](
            pack(svals), offs, grad, out, len(svals),
            KIND=_KINDS[kind], ACC=acc_dtype(dtype), TINY=torch.finfo(ldtype).tiny, BLOCK=_BLOCK,
        )  # fmt: skip
    return out
