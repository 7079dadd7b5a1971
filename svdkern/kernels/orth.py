"""orth_loss: Σ_M ‖MᵀM − I‖²_F / r² over all matrices in one launch, and its backward.

Forward: a persistent grid over the upper-triangular Gram tiles of every
matrix (M packed into one buffer, int64 offsets in a problem table). A tile
computes M[:, I]ᵀ·M[:, J] over all rows, subtracts I on the diagonal, and adds
the squared sum of the tile divided by r (×2 off the diagonal) to the program's
total (Σ (D/r)², not Σ D²/r²: D² can overflow where the loss does not); the
per-program totals are summed afterwards (deterministic two-level reduction).
`orth_loss_forward` also stores the residuals R = MᵀM − I (fp32) for backward.

Backward: dM = grad · 4·M·R/r² for all matrices in one persistent launch, on
tensor cores for bf16/fp16 with fp32 accuracy: M widened to fp32 is exact in
TF32 (bf16 and fp16 significands fit its 11 bits, fp16 subnormals its exponent),
and the fp32 residual is split R = R_hi + R_lo with R_hi exact in TF32, so two
TF32 MMAs with fp32 accumulation (M·R_hi + M·R_lo) carry R to about 2⁻²⁰ of its
value: |error| ≲ 2⁻²⁰ · Σ_c |M_ic|·|R_cj| before the result is rounded to
bf16/fp16 (2⁻⁹ / 2⁻¹²), against 2⁻⁹ for R rounded to bf16. fp32 inputs follow
torch's TF32 setting (FMA when off).

Autotune keys: the number of matrices, the largest r and k bucketed to powers of
two, precision (and STORE_RES). Configs: tensor-core or FMA tiles within shared
memory, at most 64 accumulators per thread.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from svdkern._checks import check_mats
from svdkern.kernels._common import (
    SMEM_BUDGET,
    acc_dtype,
    autotune,
    bucket,
    check_device_dtype,
    device_guard,
    fma,
    input_precision,
    member,
    num_sms,
    offsets,
    pack,
    problem_table,
    union,
)
from svdkern.kernels._gemm import _tile_dot, acc_per_thread, mma, tf32_hi
from svdkern.reference import loss_dtype

# Persistent Gram tiles: 64-row tiles need 8 warps (4 spill in fp32 and sit at 255
# registers in bf16), 128-row ones spill, and so does 64 × 64 × 64 on FMA (fp32 with the
# residual store); 32 × 64 with 4 warps spills 12 B/thread in bf16 since the residual is
# scaled by 1/r before squaring. Spill-free on sm_90 (triton 3.6).
FWD_MMA = [
    dict(BLOCK_R=64, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_R=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_R=32, BLOCK_K=32, num_warps=4, num_stages=3),
]
FWD_FMA = [
    dict(BLOCK_R=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_R=32, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_R=32, BLOCK_K=32, num_warps=4, num_stages=3),
]
FWD_DEFAULTS = [dict(BLOCK_R=32, BLOCK_K=32, num_warps=4, num_stages=3)]


def _keep_fwd(cfg: dict, args: dict) -> bool:
    """Gram tiles not far larger than the largest r, of the launch's class, within shared
    memory (operand stages plus the residual tile transposed for its mirror store)."""
    br, bk, stages = cfg["BLOCK_R"], cfg["BLOCK_K"], cfg["num_stages"]
    smem = stages * 2 * br * bk * args["MATS"].element_size() + br * br * 4
    space = FWD_FMA if fma(args) else FWD_MMA
    return (
        br <= max(32, args["MAX_R"])
        and acc_per_thread(cfg, "BLOCK_R", "BLOCK_R") <= 64
        and smem <= SMEM_BUDGET
        and member(cfg, space)
    )


@autotune(
    union(FWD_MMA, FWD_FMA),
    FWD_DEFAULTS,
    key=["NUM_PROBLEMS", "MAX_R", "MAX_K", "STORE_RES", "PRECISION"],
    keep=_keep_fwd,
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
    """PART[p] = Σ over the Gram tiles of program p of ‖(MᵀM − I)[I, J] / r‖² · (2 if I≠J).

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
        inv_r = 1.0 / r.to(ACC)
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
                dr = d * inv_r
                weight = tl.where(bj > bi, 2.0, 1.0).to(ACC)
                total += tl.sum(tl.sum(dr * dr, axis=1), axis=0) * weight
                if STORE_RES:
                    res = RES + tl.load(row + 3)
                    mask = (offs_i[:, None] < r) & (offs_j[None, :] < r)
                    tl.store(res + offs_i[:, None] * r + offs_j[None, :], d, mask=mask)
                    if bj > bi:
                        tl.store(res + offs_j[None, :] * r + offs_i[:, None], d, mask=mask)
            tile += step
    tl.store(PART + pid + tl.arange(0, 1), total)


# Spill-free on sm_90 (triton 3.6); the split (two MMAs) needs 8 warps for 64 × 64 and
# larger tiles.
BWD_MMA = [
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=3),
]
BWD_FMA = [
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=3),
]
BWD_DEFAULTS = [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=3)]


def _keep_bwd(cfg: dict, args: dict) -> bool:
    """Column tiles not far wider than the largest r, of the launch's class, within shared
    memory (M and fp32 R stages, the two R operands and M widened to fp32)."""
    bm, bn, bk, stages = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_stages"]
    smem = stages * (bm * bk * args["MATS"].element_size() + bk * bn * 4) + (2 * bn + bm) * bk * 4
    space = BWD_FMA if fma(args) else BWD_MMA
    return (
        bn <= max(32, args["MAX_R"])
        and acc_per_thread(cfg) <= 64
        and smem <= SMEM_BUDGET
        and member(cfg, space)
    )


@autotune(
    union(BWD_MMA, BWD_FMA),
    BWD_DEFAULTS,
    key=["NUM_PROBLEMS", "MAX_R", "MAX_K", "PRECISION"],
    keep=_keep_bwd,
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
    SPLIT_R: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dM = grad·4/r² · M·R for every matrix M (k×r) and its residual R = MᵀM − I (r×r).

    TABLE (NUM_PROBLEMS × 4, int64): k, r, off (M in MATS and dM in OUT, row-major
    k×r), off_res (R in RES, ACC, row-major). GRAD: the upstream scalar (ACC).
    Persistent over the (k×r) output tiles of all matrices. SPLIT_R (bf16/fp16 M,
    PRECISION "tf32"): M widened to fp32 (exact in TF32) times R_hi + R_lo, two TF32
    MMAs (module docstring); else M widened to ACC times R at PRECISION.
    MAX_R, MAX_K (buckets) only key the autotuner.
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
                if SPLIT_R:
                    a = a.to(tl.float32)
                    b_hi = tf32_hi(b)
                    acc = mma(a, b_hi, acc, PRECISION)
                    acc = mma(a, b - b_hi, acc, PRECISION)
                else:
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
) -> tuple[torch.Tensor, torch.Tensor]:
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
            bucket(max(r for _, r in shapes)), bucket(max(k for k, _ in shapes)),
            STORE_RES=store_res, ACC=acc_dtype(dtype), PRECISION=input_precision(dtype),
        )  # fmt: skip
    return part.sum(), res


def orth_loss_fwd(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_M ‖MᵀM − I‖²_F / r² over M (k×r) in mats; a 0-d fp32 tensor (fp64 for fp64)."""
    return _forward("orth_loss", mats, store_res=False)[0]


def orth_loss_forward_fwd(mats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(orth_loss(mats), the residuals R = MᵀM − I (r×r, fp32 / fp64) of all M in mats, packed
    row-major back to back) in one launch."""
    return _forward("orth_loss_forward", mats, store_res=True)


def orth_loss_bwd(
    grad: torch.Tensor, mats: Sequence[torch.Tensor], residuals: torch.Tensor
) -> torch.Tensor:
    """[grad · 4·M·R/r² for M, R in zip(mats, residuals)] packed (row-major, back to back) in
    M's dtype; residuals packed as orth_loss_forward_fwd returns them; one launch."""
    mats = list(mats)
    shapes, _, _, table = _layout("orth_loss_backward", mats)
    dtype, device = mats[0].dtype, mats[0].device
    ldtype = loss_dtype(dtype)
    total_r2 = sum(r * r for _, r in shapes)
    if not isinstance(residuals, torch.Tensor) or tuple(residuals.shape) != (total_r2,):
        got = list(residuals.shape) if isinstance(residuals, torch.Tensor) else residuals
        raise ValueError(
            f"orth_loss_backward: residuals must be the packed r×r residuals of all matrices, "
            f"shape [{total_r2}], got {got}"
        )
    out = torch.empty(sum(k * r for k, r in shapes), dtype=dtype, device=device)
    grad = grad.detach().reshape(1).to(device=device, dtype=ldtype)
    cap = 4 * num_sms(device)
    # bf16/fp16: tensor cores at fp32 accuracy (TF32 with R split in two, module docstring).
    split = dtype in (torch.bfloat16, torch.float16)
    precision = "tf32" if split else input_precision(dtype)

    def grid(meta):
        tiles = sum(
            triton.cdiv(k, meta["BLOCK_M"]) * triton.cdiv(r, meta["BLOCK_N"]) for k, r in shapes
        )
        return (max(1, min(tiles, cap)),)

    if out.numel():
        with device_guard(mats[0]):
            _orth_bwd_kernel[grid](
                pack(mats), residuals.to(ldtype).contiguous(), out, grad, table,
                len(mats), bucket(max(r for _, r in shapes)), bucket(max(k for k, _ in shapes)),
                SPLIT_R=split, ACC=acc_dtype(dtype), PRECISION=precision,
            )  # fmt: skip
    return out
