"""lowrank_linear: y = ((x·V)·diag(s))·Uᵀ + bias without forming W, forward and backward.

Fused chain for r ≤ `r_max(dtype)` (256 for bf16/fp16, 128 for fp32: at 256 fp32
columns only tiny row blocks fit on chip).
Forward: one program per BLOCK_M rows keeps t = x·V (BLOCK_M × r) on chip,
scales it by s and multiplies by Uᵀ tile by tile. Backward: one row-block kernel
computes t = x·V and gu = g·U on chip, the ds partials colsum(t ⊙ gu),
dx = (gu·diag(s))·Vᵀ, and writes ts = t·diag(s) and dt = gu·diag(s) (rows × r);
a second launch computes dU = gᵀ·ts, dV = xᵀ·dt and dbias = colsum(g) (both
weight GEMMs in one grid). Larger r: plain GEMMs of `_gemm` (two-GEMM path).

Autotune keys: rows, n, m bucketed to powers of two, R_PAD (r to a power of two,
≥ 16), precision. Configs are pruned by shared memory (every stage and on-chip
intermediate counted), by accumulators per thread (no spills), and to tensor-core
or FMA (fp32 "ieee") tiles; the weight kernel has 16- and 32-column tiles for
small ranks.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from svdkern._checks import check_lowrank_input
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
    union,
)
from svdkern.kernels._gemm import MIN_BLOCK_M, acc_per_thread, gemm_smem, matmul, mma

R_MAX = 256
# fp32 (4-byte) chains stop at this rank: see `r_max`.
R_MAX_FP32 = 128


def r_max(dtype: torch.dtype) -> int:
    """Largest rank the fused chain takes for `dtype`: 256 for 2-byte dtypes, 128 for fp32
    and fp64. At 256 columns a 4-byte chain fits shared memory only with 16- or 32-row,
    32-column, 2-stage tiles (the backward's at 254 registers on sm_90), and every row
    block re-reads all of U and V; the two-GEMM path runs full GEMM tiles for one rows × r
    round trip through memory. A GPU measurement of both paths at r = 129…256 may move it."""
    return R_MAX if torch.finfo(dtype).bits == 16 else R_MAX_FP32


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


# Tensor cores: BLOCK_M × R_PAD fp32 intermediates live in registers, so large R_PAD
# keeps only the short row blocks (the pruning below). Spill-free in bf16 up to R_PAD 256.
CHAIN_MMA = [
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2),
]
# FMA (fp32 "ieee", R_PAD ≤ 128): spill-free; 64-row and 4-warp 32 × 64 tiles spill.
CHAIN_FMA = [
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2),
]
# SVDKERN_AUTOTUNE=0: the first one the launch's class keeps.
CHAIN_DEFAULTS = [
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2),
]


def chain_smem(cfg: dict, r_pad: int, elem: int, intermediates: int) -> int:
    """Shared memory of a chain program: the pipelined x·V operand tiles, the pipelined
    tiles of the second GEMM's operand (R_PAD × BLOCK_N), the BLOCK_M × R_PAD operand in
    the activation dtype, and `intermediates` fp32 BLOCK_M × R_PAD tiles converted
    between layouts, all counted as live at once."""
    bm, bn, bk, stages = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_stages"]
    pipelined = stages * (bm * bk + bk * r_pad + r_pad * bn) * elem
    return pipelined + bm * r_pad * elem + intermediates * bm * r_pad * 4


def _keep_chain(intermediates: int):
    """Keep configs of the launch's class that fit shared memory, hold at most 128 fp32
    values of the on-chip intermediates per thread, and are not far taller than ROWS."""

    def keep(cfg: dict, args: dict) -> bool:
        r_pad = args["R_PAD"]
        rows_ok = cfg["BLOCK_M"] <= max(16, args["ROWS_BUCKET"])
        space = CHAIN_FMA if fma(args) else CHAIN_MMA
        regs = intermediates * acc_per_thread({**cfg, "R_PAD": r_pad}, "BLOCK_M", "R_PAD")
        smem = chain_smem(cfg, r_pad, args["X"].element_size(), intermediates)
        return rows_ok and regs <= 128 and smem <= SMEM_BUDGET and member(cfg, space)

    return keep


@triton.jit
def _rows_dot(
    A, B, offs_m, mask_m, offs_r, mask_r, K,
    stride_am, stride_ak, stride_bk, stride_br,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """A[offs_m, :K]·B[:K, offs_r] as a (BLOCK_M × R_PAD) ACC tile, over K in BLOCK_K steps.

    The on-chip half of the chain: t = x·V (forward and backward) and gu = g·U.
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
    b_ptrs = B + offs_k[:, None].to(tl.int64) * stride_bk + offs_r[None, :].to(tl.int64) * stride_br
    step_a = tl.cast(stride_ak, tl.int64) * BLOCK_K
    step_b = tl.cast(stride_bk, tl.int64) * BLOCK_K
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = mma(a, b, acc, PRECISION)
        a_ptrs += step_a
        b_ptrs += step_b
    return acc


@autotune(
    union(CHAIN_MMA, CHAIN_FMA),
    CHAIN_DEFAULTS,
    key=["ROWS_BUCKET", "N_BUCKET", "M_BUCKET", "R_PAD", "PRECISION"],
    keep=_keep_chain(1),
)
@triton.jit
def _lowrank_fwd_kernel(
    X,
    V,
    S,
    U,
    BIAS,
    Y,
    stride_xm,
    stride_xk,
    stride_vk,
    stride_vr,
    stride_um,
    stride_ur,
    ROWS,
    N,
    M,
    R,
    ROWS_BUCKET,
    N_BUCKET,
    M_BUCKET,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y = ((x·V)·diag(s))·Uᵀ + bias for BLOCK_M rows; t = x·V stays in registers.

    Layout: x (ROWS×N), V (N×R), U (M×R) by strides; s (R,), bias (M,)
    contiguous; y (ROWS×M) row-major. Grid (row blocks, splits of M): program
    (i, j) computes t for row block i once and the y column tiles j, j + splits, ….
    """
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < ROWS
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    t = _rows_dot(
        X, V, offs_m, mask_m, offs_r, mask_r, N, stride_xm, stride_xk, stride_vk, stride_vr,
        ACC, PRECISION, BLOCK_M, R_PAD, BLOCK_K,
    )  # fmt: skip
    sv = tl.load(S + offs_r, mask=mask_r, other=0.0).to(ACC)
    ts = (t * sv[None, :]).to(X.dtype.element_ty)

    offs_n0 = tl.arange(0, BLOCK_N)
    u_rows = U + offs_r[:, None].to(tl.int64) * stride_ur
    for j in range(tl.program_id(1), tl.cdiv(M, BLOCK_N), tl.num_programs(1)):
        offs_n = j * BLOCK_N + offs_n0
        mask_n = offs_n < M
        u_ptrs = u_rows + offs_n[None, :].to(tl.int64) * stride_um
        u = tl.load(u_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        y = mma(ts, u, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC), PRECISION)
        if HAS_BIAS:
            y += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
        y_ptrs = Y + offs_m[:, None].to(tl.int64) * M + offs_n[None, :]
        tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@autotune(
    union(CHAIN_MMA, CHAIN_FMA),
    CHAIN_DEFAULTS,
    key=["ROWS_BUCKET", "N_BUCKET", "M_BUCKET", "R_PAD", "PRECISION"],
    keep=_keep_chain(2),
    reset_to_zero=["DS_PART"],
)
@triton.jit
def _lowrank_bwd_rows_kernel(
    GY,
    X,
    U,
    S,
    V,
    DX,
    TS,
    DT,
    DS_PART,
    stride_gm,
    stride_gn,
    stride_xm,
    stride_xk,
    stride_um,
    stride_ur,
    stride_vk,
    stride_vr,
    ROWS,
    N,
    M,
    R,
    ROWS_BUCKET,
    N_BUCKET,
    M_BUCKET,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per BLOCK_M rows: t = x·V, gu = g·U (on chip); ds partial = colsum(t ⊙ gu);
    ts = t·diag(s), dt = gu·diag(s) stored; dx = dt·Vᵀ.

    Layout: g (ROWS×M), x (ROWS×N), U (M×R), V (N×R) by strides; s (R,);
    dx (ROWS×N), ts, dt (ROWS×R) row-major; DS_PART (row blocks × R, ACC).
    """
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < ROWS
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    t = _rows_dot(
        X, V, offs_m, mask_m, offs_r, mask_r, N, stride_xm, stride_xk, stride_vk, stride_vr,
        ACC, PRECISION, BLOCK_M, R_PAD, BLOCK_K,
    )  # fmt: skip
    gu = _rows_dot(
        GY, U, offs_m, mask_m, offs_r, mask_r, M, stride_gm, stride_gn, stride_um, stride_ur,
        ACC, PRECISION, BLOCK_M, R_PAD, BLOCK_K,
    )  # fmt: skip

    tl.store(DS_PART + pid.to(tl.int64) * R + offs_r, tl.sum(t * gu, axis=0), mask=mask_r)
    sv = tl.load(S + offs_r, mask=mask_r, other=0.0).to(ACC)
    mask_mr = mask_m[:, None] & mask_r[None, :]
    rows_r = offs_m[:, None].to(tl.int64) * R + offs_r[None, :]
    tl.store(TS + rows_r, (t * sv[None, :]).to(TS.dtype.element_ty), mask=mask_mr)
    dt = (gu * sv[None, :]).to(DT.dtype.element_ty)
    tl.store(DT + rows_r, dt, mask=mask_mr)

    v_rows = V + offs_r[:, None].to(tl.int64) * stride_vr
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        vt_ptrs = v_rows + offs_n[None, :].to(tl.int64) * stride_vk
        vt = tl.load(vt_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        dx = mma(dt, vt, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC), PRECISION)
        dx_ptrs = DX + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# dU = gᵀ·ts and dV = xᵀ·dt: P (m or n) × R outputs over K = rows. 16- and 32-column
# tiles for small ranks (a 64-wide tile would be mostly padding at r ≤ 32).
WEIGHTS_MMA = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=3),
]
# FMA (fp32 "ieee"): spill-free; 4-warp 64 × 64 and 128 × 32 tiles spill.
WEIGHTS_FMA = [
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=3),
]
# SVDKERN_AUTOTUNE=0: the first one the launch's class keeps.
WEIGHTS_DEFAULTS = [
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=3),
]


def _keep_weights(cfg: dict, args: dict) -> bool:
    """Column tiles no wider than R_PAD (16 at r ≤ 16, 32 at r ≤ 32), row tiles not far
    taller than m and n, the launch's class, within shared memory."""
    fit = cfg["BLOCK_N"] <= args["R_PAD"] and cfg["BLOCK_M"] <= max(
        64, args["M_BUCKET"], args["N_BUCKET"]
    )
    space = WEIGHTS_FMA if fma(args) else WEIGHTS_MMA
    smem = gemm_smem(cfg, args["X"].element_size()) <= SMEM_BUDGET
    return fit and smem and member(cfg, space)


@triton.jit
def _weight_grad_tile(
    A,
    B,
    OUT,
    DBIAS,
    stride_ar,
    stride_ap,
    local,
    ROWS,
    P,
    R,
    WITH_ROWSUM: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Tile `local` of OUT (P×R) = Aᵀ·B, A (ROWS×P) by strides, B (ROWS×R) row-major.

    WITH_ROWSUM: the first column tile also stores colsum(A) into DBIAS.
    """
    num_n = tl.cdiv(R, BLOCK_N)
    offs_p = (local // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (local % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_p = offs_p < P
    mask_n = offs_n < R
    a_ptrs = A + offs_k[None, :].to(tl.int64) * stride_ar + offs_p[:, None].to(tl.int64) * stride_ap
    b_ptrs = B + offs_k[:, None].to(tl.int64) * R + offs_n[None, :]
    step_a = tl.cast(stride_ar, tl.int64) * BLOCK_K
    step_b = tl.cast(R, tl.int64) * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    rowsum = tl.zeros((BLOCK_M,), dtype=ACC)
    for k0 in range(0, ROWS, BLOCK_K):
        mask_k = offs_k < ROWS - k0
        a = tl.load(a_ptrs, mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(a, b, acc, PRECISION)
        if WITH_ROWSUM:
            rowsum += tl.sum(a.to(ACC), axis=1)
        a_ptrs += step_a
        b_ptrs += step_b
    out_ptrs = OUT + offs_p[:, None].to(tl.int64) * R + offs_n[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask_p[:, None] & mask_n[None, :])
    if WITH_ROWSUM:  # noqa: SIM102  (compile-time flag, then a runtime test)
        if local % num_n == 0:
            tl.store(DBIAS + offs_p, rowsum.to(DBIAS.dtype.element_ty), mask=mask_p)


@autotune(
    union(WEIGHTS_MMA, WEIGHTS_FMA),
    WEIGHTS_DEFAULTS,
    key=["ROWS_BUCKET", "N_BUCKET", "M_BUCKET", "R_PAD", "PRECISION"],
    keep=_keep_weights,
)
@triton.jit
def _lowrank_bwd_weights_kernel(
    GY,
    X,
    TS,
    DT,
    DU,
    DV,
    DBIAS,
    stride_gm,
    stride_gn,
    stride_xm,
    stride_xk,
    ROWS,
    N,
    M,
    R,
    ROWS_BUCKET,
    N_BUCKET,
    M_BUCKET,
    R_PAD,
    HAS_DBIAS: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dU = gᵀ·ts (M×R), dV = xᵀ·dt (N×R), dbias = colsum(g) (M,); one grid, K = ROWS.

    Programs [0, tiles of dU) compute dU tiles, the rest dV tiles.
    g (ROWS×M), x (ROWS×N) by strides; ts, dt (ROWS×R), dU, dV row-major.
    *_BUCKET and R_PAD: the autotune key only.
    """
    pid = tl.program_id(0)
    tiles_u = tl.cdiv(M, BLOCK_M) * tl.cdiv(R, BLOCK_N)
    if pid < tiles_u:
        _weight_grad_tile(
            GY, TS, DU, DBIAS, stride_gm, stride_gn, pid, ROWS, M, R,
            HAS_DBIAS, ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    else:
        _weight_grad_tile(
            X, DT, DV, DBIAS, stride_xm, stride_xk, pid - tiles_u, ROWS, N, R,
            False, ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip


def _rows_of(x: torch.Tensor, n: int) -> torch.Tensor:
    """x (..., n) as a (rows × n) matrix, a view when the layout allows it."""
    return x.reshape(math.prod(x.shape[:-1]), n)


def lowrank_linear_fwd(
    x: torch.Tensor,
    U: torch.Tensor,
    s: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y (..., m) = ((x·V)·diag(s))·Uᵀ + bias; x (..., n), U (m×r), s (r,), V (n×r)."""
    check_lowrank_input("lowrank_linear", x, U, s, V, bias)
    check_device_dtype("lowrank_linear", U)
    m, r = U.shape
    n = V.shape[0]
    x2 = _rows_of(x, n)
    rows = x2.shape[0]
    if rows == 0:
        return x.new_empty((*x.shape[:-1], m))
    with device_guard(U):
        if r > r_max(x.dtype) or m == 0 or n == 0:  # two GEMMs (they handle empty sides)
            t, _ = matmul(x2, V, s, scale_n=True)
            y, _ = matmul(t, U.T, bias=bias)
            return y.view(*x.shape[:-1], m)
        y = torch.empty((rows, m), dtype=x.dtype, device=x.device)
        s = s.contiguous()
        bias_arg = bias.contiguous() if bias is not None else y
        sms = num_sms(x.device)

        def grid(meta):
            row_blocks = triton.cdiv(rows, meta["BLOCK_M"])
            splits = min(triton.cdiv(m, meta["BLOCK_N"]), max(1, 2 * sms // row_blocks))
            return (row_blocks, splits)

        _lowrank_fwd_kernel[grid](
            x2, V, s, U, bias_arg, y,
            x2.stride(0), x2.stride(1), V.stride(0), V.stride(1), U.stride(0), U.stride(1),
            rows, n, m, r, bucket(rows), bucket(n), bucket(m),
            HAS_BIAS=bias is not None, ACC=acc_dtype(x.dtype),
            PRECISION=input_precision(x.dtype), R_PAD=_r_pad(r),
        )  # fmt: skip
    return y.view(*x.shape[:-1], m)


def lowrank_linear_forward(
    x: torch.Tensor,
    U: torch.Tensor,
    s: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, empty): the forward used under autograd. The backward recomputes x·V on chip,
    which costs less than writing it out and reading it back."""
    return lowrank_linear_fwd(x, U, s, V, bias), x.new_empty((0,))


def lowrank_linear_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    U: torch.Tensor,
    s: torch.Tensor,
    V: torch.Tensor,
    xv: torch.Tensor,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dU, ds, dV, dbias) of y = ((x·V)·diag(s))·Uᵀ + b for upstream grad_y (..., m).

    dU = gᵀ·(t·diag(s)), ds = colsum(t ⊙ g·U), dV = xᵀ·(g·U·diag(s)),
    dx = (g·U·diag(s))·Vᵀ with t = x·V; dbias = colsum(g), or shape (0,) if not bias_grad.
    t is always recomputed on chip; `xv` (the op schema's saved x·V) is not read.
    """
    check_lowrank_input("lowrank_linear_backward", x, U, s, V, None)
    check_device_dtype("lowrank_linear_backward", U)
    m, r = U.shape
    n = V.shape[0]
    if tuple(grad_y.shape) != (*x.shape[:-1], m):
        raise ValueError(
            f"lowrank_linear_backward: grad_y must have shape {[*x.shape[:-1], m]}, "
            f"got {list(grad_y.shape)}"
        )
    dtype, device = U.dtype, U.device
    g2 = _rows_of(grad_y.to(dtype), m)
    x2 = _rows_of(x, n)
    rows = x2.shape[0]
    dbias = torch.empty((m,) if bias_grad else (0,), dtype=dtype, device=device)
    if rows == 0:
        dbias.zero_()
        return (
            torch.zeros_like(x),
            torch.zeros_like(U),
            torch.zeros_like(s),
            torch.zeros_like(V),
            dbias,
        )
    acc = acc_dtype(dtype)
    prec = input_precision(dtype)
    with device_guard(U):
        if r > r_max(dtype) or m == 0 or n == 0:  # two GEMMs (they handle empty sides)
            t, _ = matmul(x2, V)
            dt, ds = matmul(g2, U, s, scale_n=True, ds_with=t)
            dU, _ = matmul(g2.T, t, s, scale_n=True)
            dx, _ = matmul(dt, V.T)
            dV, _ = matmul(x2.T, dt)
            if bias_grad:
                dbias = g2.sum(0, dtype=torch.float32 if dtype != torch.float64 else dtype)
                dbias = dbias.to(dtype)
            return dx.view(x.shape), dU, ds, dV, dbias
        s = s.contiguous()
        dx = torch.empty((rows, n), dtype=dtype, device=device)
        ts = torch.empty((rows, r), dtype=dtype, device=device)
        dt = torch.empty((rows, r), dtype=dtype, device=device)
        part_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        ds_part = torch.zeros((triton.cdiv(rows, MIN_BLOCK_M), r), dtype=part_dtype, device=device)
        _lowrank_bwd_rows_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),)](
            g2, x2, U, s, V, dx, ts, dt, ds_part,
            g2.stride(0), g2.stride(1), x2.stride(0), x2.stride(1),
            U.stride(0), U.stride(1), V.stride(0), V.stride(1),
            rows, n, m, r, bucket(rows), bucket(n), bucket(m),
            ACC=acc, PRECISION=prec, R_PAD=_r_pad(r),
        )  # fmt: skip
        dU = torch.empty_like(U, memory_format=torch.contiguous_format)
        dV = torch.empty_like(V, memory_format=torch.contiguous_format)

        def grid(meta):
            tiles_n = triton.cdiv(r, meta["BLOCK_N"])
            return ((triton.cdiv(m, meta["BLOCK_M"]) + triton.cdiv(n, meta["BLOCK_M"])) * tiles_n,)

        _lowrank_bwd_weights_kernel[grid](
            g2, x2, ts, dt, dU, dV, dbias if bias_grad else dU,
            g2.stride(0), g2.stride(1), x2.stride(0), x2.stride(1),
            rows, n, m, r, bucket(rows), bucket(n), bucket(m), _r_pad(r),
            HAS_DBIAS=bias_grad, ACC=acc, PRECISION=prec,
        )  # fmt: skip
    return dx.view(x.shape), dU, ds_part.sum(0).to(dtype), dV, dbias
