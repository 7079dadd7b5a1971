"""The GEMM shared by compose, its backward and the long low-rank chain (two-GEMM path).

    C = (A · diag(s)) · B          SCALE_K: s scales A's columns inside the K loop
    C = (A · B) · diag(s) + bias   SCALE_N, HAS_BIAS: epilogue
    ds_part[i, :] = Σ_{rows of tile i} (A · B) ⊙ D      HAS_DS: epilogue, before the scale

A (M×K), B (K×N), C (M×N), D (M×N) are addressed by strides (int64 offsets), so
transposed views are read in place. ds partials are one fp32 row per BLOCK_M rows
of C, summed afterwards (deterministic, no atomics).

Configs: tensor-core tiles (bf16, fp16, fp32 with TF32) and FMA tiles (fp32 "ieee"),
each space spill-free on sm_90; with the ds epilogue (it holds a second BLOCK_M × BLOCK_N
tile) at most 64 accumulators per thread, so no 128×256 tiles there. Autotune key: M, N,
K bucketed to powers of two, precision, SCALE_K, HAS_DS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from svdkern.kernels._common import (
    INTERPRET,
    SMEM_BUDGET,
    acc_dtype,
    autotune,
    bucket,
    fma,
    input_precision,
    member,
    union,
)

# Every config's BLOCK_M is a multiple of this: ds partial buffers have cdiv(M, MIN_BLOCK_M) rows.
MIN_BLOCK_M = 16


@triton.jit
def tf32_hi(x):
    """fp32 x with its 13 low mantissa bits cleared: exact in TF32, and what a TF32 tensor
    core reads of x."""
    return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


if INTERPRET:

    @triton.jit
    def mma(a, b, acc, PRECISION: tl.constexpr):
        """acc + a·b. The interpreter's tl.dot reads bf16 as raw integers, so widen bf16 to
        fp32 first: bf16 products are exact in fp32, as on the GPU's tensor cores. TF32 is
        emulated (the interpreter's dot is exact fp32) by truncating the operands."""
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
        if PRECISION == "tf32":
            a = tf32_hi(a)
            b = tf32_hi(b)
        return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)

else:

    @triton.jit
    def mma(a, b, acc, PRECISION: tl.constexpr):
        """acc + a·b on tensor cores (fp32 accumulation for bf16/fp16), in acc's dtype."""
        return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _tile_dot(
    A,
    B,
    S,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    offs_m,
    offs_n,
    M,
    N,
    K,
    SCALE_K: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc (BLOCK_M×BLOCK_N, ACC) = A[offs_m, :] · diag(s)? · B[:, offs_n], K loop with masks."""
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
    b_ptrs = B + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    step_a = tl.cast(stride_ak, tl.int64) * BLOCK_K
    step_b = tl.cast(stride_bk, tl.int64) * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if SCALE_K:
            sk = tl.load(S + k0 + offs_k, mask=mask_k, other=0.0).to(ACC)
            a = (a.to(ACC) * sk[None, :]).to(A.dtype.element_ty)
        acc = mma(a, b, acc, PRECISION)
        a_ptrs += step_a
        b_ptrs += step_b
    return acc


def gemm_smem(cfg: dict, elem: int) -> int:
    """Shared memory of a K-pipelined GEMM tile: A and B tiles of every stage."""
    return cfg["num_stages"] * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * elem


def acc_per_thread(cfg: dict, block_m: str = "BLOCK_M", block_n: str = "BLOCK_N") -> int:
    """fp32 accumulators each thread holds for a BLOCK_M × BLOCK_N tile."""
    return cfg[block_m] * cfg[block_n] // (32 * cfg["num_warps"])


# Tensor cores (bf16, fp16, fp32 with TF32). 2 warps or BLOCK_M < 64 lower to mma.sync,
# the rest to wgmma on sm_90. Spill-free in bf16 (sm_90, triton 3.6); the 2-warp tiles
# spill with 4 stages, so they have 3.
MMA_SPACE = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=2, num_stages=3),
]
# FMA (fp32 "ieee"): the dot's operands live in registers, so shorter K steps and more
# warps per tile; all spill-free (sm_90, triton 3.6).
FMA_SPACE = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
]
# SVDKERN_AUTOTUNE=0: the first one the launch's class keeps.
DEFAULTS = [
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=2, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
]


def _keep(cfg: dict, args: dict) -> bool:
    """Tiles of the launch's class (tensor cores or FMA) not far larger than the problem,
    within shared memory; with the ds epilogue at most 64 accumulators per thread."""
    M, N, K = args["M_BUCKET"], args["N_BUCKET"], args["K_BUCKET"]
    fit = (
        cfg["BLOCK_M"] <= max(32, M)
        and cfg["BLOCK_N"] <= max(32, N)
        and cfg["BLOCK_K"] <= max(32, K)
    )
    space = FMA_SPACE if fma(args) else MMA_SPACE
    regs = not args["HAS_DS"] or acc_per_thread(cfg) <= 64
    smem = gemm_smem(cfg, args["A"].element_size()) <= SMEM_BUDGET
    return fit and regs and smem and member(cfg, space)


@autotune(
    union(MMA_SPACE, FMA_SPACE),
    DEFAULTS,
    key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "SCALE_K", "HAS_DS", "PRECISION"],
    keep=_keep,
    reset_to_zero=["DS_PART"],
)
@triton.jit
def _matmul_kernel(
    A,
    B,
    C,
    S,
    BIAS,
    D,
    DS_PART,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_dm,
    stride_dn,
    M,
    N,
    K,
    M_BUCKET,
    N_BUCKET,
    K_BUCKET,
    SCALE_K: tl.constexpr,
    SCALE_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DS: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C (M×N) = (A · diag(s)^SCALE_K) · B · diag(s)^SCALE_N + bias; ds partials of (A·B) ⊙ D.

    Layout: A (M×K), B (K×N), C, D (M×N) by strides; s contiguous of length K
    (SCALE_K) or N (SCALE_N); bias (N,); DS_PART (≥ cdiv(M, BLOCK_M) × N, ACC)
    row-major, row i = Σ over the rows of tile-row i. One program per C tile,
    grouped ordering (GROUP_M tile-rows share B tiles in L2). *_BUCKET: the
    autotune key only.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _tile_dot(
        A, B, S, stride_am, stride_ak, stride_bk, stride_bn, offs_m, offs_n, M, N, K,
        SCALE_K, ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip

    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_DS:
        d_ptrs = (
            D + offs_m[:, None].to(tl.int64) * stride_dm + offs_n[None, :].to(tl.int64) * stride_dn
        )
        d = tl.load(d_ptrs, mask=mask, other=0.0).to(ACC)
        tl.store(DS_PART + pid_m.to(tl.int64) * N + offs_n, tl.sum(acc * d, axis=0), mask=mask_n)
    if SCALE_N:
        acc = acc * tl.load(S + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    c_ptrs = C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :].to(tl.int64) * stride_cn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask)


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    s: torch.Tensor | None = None,
    *,
    scale_k: bool = False,
    scale_n: bool = False,
    bias: torch.Tensor | None = None,
    ds_with: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """C = (a·diag(s)?)·b·diag(s)? + bias in a's dtype, and ds = colsum((a·b) ⊙ ds_with).

    a (M×K), b (K×N), ds_with (M×N) may be any strided views; s, bias are made
    contiguous. Returns (C contiguous (M×N), ds (N,) in a's dtype or None).
    """
    M, K = a.shape
    N = b.shape[1]
    dtype = a.dtype
    c = torch.empty((M, N), dtype=dtype, device=a.device)
    acc = acc_dtype(dtype)
    part_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ds_part = None
    if ds_with is not None:
        ds_part = torch.zeros((triton.cdiv(M, MIN_BLOCK_M), N), dtype=part_dtype, device=a.device)
    if M == 0 or N == 0 or K == 0:
        c.zero_()
        if bias is not None:
            c += bias
        return c, None if ds_part is None else ds_part.sum(0).to(dtype)
    s = s.contiguous() if s is not None else c
    bias_arg = bias.contiguous() if bias is not None else c
    d = ds_with if ds_with is not None else c

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _matmul_kernel[grid](
        a, b, c, s, bias_arg, d, ds_part if ds_part is not None else c,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        d.stride(0), d.stride(1),
        M, N, K, bucket(M), bucket(N), bucket(K),
        SCALE_K=scale_k, SCALE_N=scale_n, HAS_BIAS=bias is not None, HAS_DS=ds_part is not None,
        ACC=acc, PRECISION=input_precision(dtype),
    )  # fmt: skip
    return c, None if ds_part is None else ds_part.sum(0).to(dtype)
