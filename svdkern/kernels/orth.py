"""orth_loss: Σ_M ‖MᵀM − I‖²_F / r² over all matrices in one launch, and its backward.

Forward: a persistent grid over the upper-triangular Gram tiles of every
matrix (M packed into one buffer, int64 offsets in a problem table). A tile
computes M[:, I]ᵀ·M[:, J] over all rows, subtracts I on the diagonal, and adds
its squared sum (×2 off the diagonal, /r²) to the program's total; the
per-program totals are summed afterwards (deterministic two-level reduction).
`orth_loss_forward` also stores the residuals R = MᵀM − I (fp32) for backward.

Backward: dM = grad · 4·M·R/r² for all matrices in one persistent launch,
M widened to fp32 so the product is as exact as the fp32 reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from svdkern._checks import check_mats
from svdkern.kernels._common import (
    acc_dtype,
    check_device_dtype,
    configs,
    device_guard,
    input_precision,
    num_sms,
    offsets,
    pack,
    problem_table,
    prune,
    unpack,
)
from svdkern.kernels._gemm import _tile_dot, mma
from svdkern.reference import loss_dtype


def _fwd_configs() -> list[triton.Config]:
    space = [
        dict(BLOCK_R=128, BLOCK_K=64, num_warps=8, num_stages=3),
        dict(BLOCK_R=64, BLOCK_K=64, num_warps=4, num_stages=3),
        dict(BLOCK_R=32, BLOCK_K=64, num_warps=4, num_stages=3),
    ]
    return configs(space, dict(BLOCK_R=32, BLOCK_K=32, num_warps=4, num_stages=3))


@triton.autotune(
    configs=_fwd_configs(),
    key=["NUM_PROBLEMS", "MAX_R", "MAX_K", "STORE_RES"],
    prune_configs_by=prune(
        lambda cfg, args: cfg["BLOCK_R"] <= max(32, triton.next_power_of_2(args["MAX_R"]))
    ),
    reset_to_zero=["PART"],
)
@triton.jit
def _orth_fwd_kernel(
    MATS,
    RES,
    PART,
    TABLE,
    NUM_PROBLEMS,
    MAX_R,
    MAX_K,
    STORE_RES: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """PART[p] = Σ over the Gram tiles of program p of ‖(MᵀM − I)[I, J]‖² · (2 if I≠J) / r².

    TABLE (NUM_PROBLEMS × 4, int64): k, r, off, off_res; M (k×r) row-major at
    MATS + off. Tiles of a matrix are the (I, J) pairs of cdiv(r, BLOCK_R)²
    blocks; J < I are skipped (the Gram is symmetric). STORE_RES: also write
    R = MᵀM − I (r×r, ACC, row-major at RES + off_res), tile (I, J) and its mirror.
    """
    pid = tl.program_id(0)
    tile = pid.to(tl.int64)
    step = tl.num_programs(0)
    tile_end = tile * 0
    total = tl.zeros((1,), dtype=ACC)
    for g in range(NUM_PROBLEMS):
        row = TABLE + g * 4
        k = tl.load(row)
        r = tl.load(row + 1)
        base = MATS + tl.load(row + 2)
        nb = tl.cdiv(r, BLOCK_R)
        tile_start = tile_end
        tile_end = tile_start + nb * nb
        inv_r2 = 1.0 / (r.to(ACC) * r.to(ACC))
        while tile < tile_end:
            local = tile - tile_start
            bi = local // nb
            bj = local % nb
            if bj >= bi:
                offs_i = bi * BLOCK_R + tl.arange(0, BLOCK_R)
                offs_j = bj * BLOCK_R + tl.arange(0, BLOCK_R)
                gram = _tile_dot(
                    base, base, base, 1, r, r, 1, offs_i, offs_j, r, r, k,
                    False, ACC, PRECISION, BLOCK_R, BLOCK_R, BLOCK_K,
                )  # fmt: skip
                eye = (offs_i[:, None] == offs_j[None, :]) & (offs_i[:, None] < r)
                d = gram - tl.where(eye, 1.0, 0.0).to(ACC)
                weight = tl.where(bj > bi, 2.0, 1.0).to(ACC) * inv_r2
                total += tl.sum(tl.sum(d * d, axis=1), axis=0) * weight
                if STORE_RES:
                    res = RES + tl.load(row + 3)
                    mask = (offs_i[:, None] < r) & (offs_j[None, :] < r)
                    tl.store(res + offs_i[:, None] * r + offs_j[None, :], d, mask=mask)
                    if bj > bi:
                        tl.store(res + offs_j[None, :] * r + offs_i[:, None], d, mask=mask)
            tile += step
    tl.store(PART + pid + tl.arange(0, 1), total)


def _bwd_configs() -> list[triton.Config]:
    space = [
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3),
    ]
    return configs(space, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3))


@triton.autotune(
    configs=_bwd_configs(),
    key=["NUM_PROBLEMS", "MAX_R", "MAX_K"],
    prune_configs_by=prune(
        lambda cfg, args: cfg["BLOCK_N"] <= max(32, triton.next_power_of_2(args["MAX_R"]))
    ),
)
@triton.jit
def _orth_bwd_kernel(
    MATS,
    RES,
    OUT,
    GRAD,
    TABLE,
    NUM_PROBLEMS,
    MAX_R,
    MAX_K,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dM = grad·4/r² · M·R for every matrix M (k×r) and its residual R = MᵀM − I (r×r).

    TABLE (NUM_PROBLEMS × 4, int64): k, r, off (M in MATS and dM in OUT, row-major
    k×r), off_res (R in RES, ACC, row-major). GRAD: the upstream scalar (ACC).
    Persistent over the (k×r) output tiles of all matrices; M is widened to ACC so
    the product is as exact as the fp32 reference.
    """
    tile = tl.program_id(0).to(tl.int64)
    step = tl.num_programs(0)
    tile_end = tile * 0
    grad = tl.load(GRAD).to(ACC)
    offs_k0 = tl.arange(0, BLOCK_K)
    for g in range(NUM_PROBLEMS):
        row = TABLE + g * 4
        k = tl.load(row)
        r = tl.load(row + 1)
        off = tl.load(row + 2)
        res = RES + tl.load(row + 3)
        num_n = tl.cdiv(r, BLOCK_N)
        tile_start = tile_end
        tile_end = tile_start + tl.cdiv(k, BLOCK_M) * num_n
        coef = grad * 4.0 / (r.to(ACC) * r.to(ACC))
        while tile < tile_end:
            local = tile - tile_start
            offs_i = (local // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_j = (local % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_i = offs_i < k
            mask_j = offs_j < r
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
            for c0 in range(0, r, BLOCK_K):
                offs_c = c0 + offs_k0
                mask_c = offs_c < r
                m_ptrs = MATS + off + offs_i[:, None] * r + offs_c[None, :]
                a = tl.load(m_ptrs, mask=mask_i[:, None] & mask_c[None, :], other=0.0)
                r_ptrs = res + offs_c[:, None] * r + offs_j[None, :]
                b = tl.load(r_ptrs, mask=mask_c[:, None] & mask_j[None, :], other=0.0)
                acc = mma(a.to(ACC), b, acc, PRECISION)
            o_ptrs = OUT + off + offs_i[:, None] * r + offs_j[None, :]
            o_mask = mask_i[:, None] & mask_j[None, :]
            tl.store(o_ptrs, (acc * coef).to(OUT.dtype.element_ty), mask=o_mask)
            tile += step


def _layout(
    op: str, mats: Sequence[torch.Tensor]
) -> tuple[list[tuple[int, int]], list[int], list[int], torch.Tensor]:
    """Shapes, offsets of M and of R in their packed buffers, and the problem table."""
    check_mats(op, mats)
    check_device_dtype(op, mats[0])
    shapes = [(M.shape[0], M.shape[1]) for M in mats]
    offs = offsets([k * r for k, r in shapes])
    res_offs = offsets([r * r for _, r in shapes])
    rows = [(k, r, o, ro) for (k, r), o, ro in zip(shapes, offs, res_offs)]
    return shapes, offs, res_offs, problem_table(rows, mats[0].device)


def _forward(
    op: str, mats: Sequence[torch.Tensor], store_res: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    mats = list(mats)
    shapes, _, _, table = _layout(op, mats)
    dtype, device = mats[0].dtype, mats[0].device
    ldtype = loss_dtype(dtype)
    cap = 4 * num_sms(device)
    part = torch.zeros(cap, dtype=ldtype, device=device)
    res = torch.empty(
        sum(r * r for _, r in shapes) if store_res else 0, dtype=ldtype, device=device
    )

    def grid(meta):
        tiles = sum(triton.cdiv(r, meta["BLOCK_R"]) ** 2 for _, r in shapes)
        return (max(1, min(tiles, cap)),)

    with device_guard(mats[0]):
        _orth_fwd_kernel[grid](
            pack(mats), res if store_res else part, part, table, len(mats),
            max(r for _, r in shapes), max(k for k, _ in shapes),
            STORE_RES=store_res, ACC=acc_dtype(dtype), PRECISION=input_precision(dtype),
        )  # fmt: skip
    residuals = unpack(res, [(r, r) for _, r in shapes]) if store_res else []
    return part.sum(), residuals


def orth_loss_fwd(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_M ‖MᵀM − I‖²_F / r² over M (k×r) in mats; a 0-d fp32 tensor (fp64 for fp64)."""
    return _forward("orth_loss", mats, store_res=False)[0]


def orth_loss_forward_fwd(mats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(orth_loss(mats), [R = MᵀM − I (r×r, fp32 / fp64) for M in mats]) in one launch."""
    return _forward("orth_loss_forward", mats, store_res=True)


def orth_loss_bwd(
    grad: torch.Tensor, mats: Sequence[torch.Tensor], residuals: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """[grad · 4·M·R/r² for M, R in zip(mats, residuals)], each in M's dtype; one launch."""
    mats, residuals = list(mats), list(residuals)
    shapes, _, _, table = _layout("orth_loss_backward", mats)
    dtype, device = mats[0].dtype, mats[0].device
    ldtype = loss_dtype(dtype)
    if len(residuals) != len(mats):
        raise ValueError(
            f"orth_loss_backward: residuals must have {len(mats)} tensors (one per matrix), "
            f"got {len(residuals)}"
        )
    for i, (R, (_, r)) in enumerate(zip(residuals, shapes)):
        if tuple(R.shape) != (r, r):
            raise ValueError(
                f"orth_loss_backward: residuals[{i}] must have shape [{r}, {r}], "
                f"got {list(R.shape)}"
            )
    out = torch.empty(sum(k * r for k, r in shapes), dtype=dtype, device=device)
    grad = grad.detach().reshape(1).to(device=device, dtype=ldtype)
    cap = 4 * num_sms(device)

    def grid(meta):
        tiles = sum(
            triton.cdiv(k, meta["BLOCK_M"]) * triton.cdiv(r, meta["BLOCK_N"]) for k, r in shapes
        )
        return (max(1, min(tiles, cap)),)

    if out.numel():
        with device_guard(mats[0]):
            _orth_bwd_kernel[grid](
                pack(mats), pack([R.to(ldtype) for R in residuals]), out, grad, table,
                len(mats), max(r for _, r in shapes), max(k for k, _ in shapes),
                ACC=acc_dtype(dtype), PRECISION=input_precision(ldtype),
            )  # fmt: skip
    return unpack(out, shapes)
