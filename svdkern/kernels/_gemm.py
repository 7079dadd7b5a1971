"""The GEMM shared by compose, its backward and the long (r > 256) low-rank chain.

    C = (A · diag(s)) · B          SCALE_K: s scales A's columns inside the K loop
    C = (A · B) · diag(s) + bias   SCALE_N, HAS_BIAS: epilogue
    ds_part[i, :] = Σ_{rows of tile i} (A · B) ⊙ D      HAS_DS: epilogue, before the scale

A (M×K), B (K×N), C (M×N), D (M×N) are addressed by strides, so transposed
views are read in place. ds partials are one fp32 row per BLOCK_M rows of C,
summed afterwards (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from svdkern.kernels._common import INTERPRET, acc_dtype, configs, input_precision, prune

# Every config's BLOCK_M is a multiple of this: ds partial buffers have cdiv(M, MIN_BLOCK_M) rows.
MIN_BLOCK_M = 16


if INTERPRET:

    @triton.jit
    def mma(a, b, acc, PRECISION: tl.constexpr):
        """acc + a·b. The interpreter's tl.dot reads bf16 as raw integers, so widen bf16 to
        fp32 first: bf16 products are exact in fp32, as on the GPU's tensor cores."""
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)

else:

    @triton.jit
    def mma(a, b, acc, PRECISION: tl.constexpr):
        """acc + a·b on tensor cores (fp32 accumulation for bf16/fp16)."""
        return tl.dot(a, b, acc, input_precision=PRECISION)


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
    a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if SCALE_K:
            sk = tl.load(S + k0 + offs_k, mask=mask_k, other=0.0).to(ACC)
            a = (a.to(ACC) * sk[None, :]).to(A.dtype.element_ty)
        acc = mma(a, b, acc, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


def _keep(cfg: dict, args: dict) -> bool:
    """Drop tiles far larger than the problem and tiles that overflow shared memory."""
    M, N, K = args["M"], args["N"], args["K"]
    fit = (
        cfg["BLOCK_M"] <= max(32, triton.next_power_of_2(M))
        and cfg["BLOCK_N"] <= max(32, triton.next_power_of_2(N))
        and cfg["BLOCK_K"] <= max(32, triton.next_power_of_2(K))
    )
    elem = args["A"].element_size()
    smem = cfg["num_stages"] * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * elem
    return fit and smem <= 160 * 1024


def _matmul_configs() -> list[triton.Config]:
    space = [
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
        dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=2, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=2, num_stages=4),
        dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=2, num_stages=3),
    ]
    default = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    return configs(space, default)


@triton.autotune(
    configs=_matmul_configs(),
    key=["M", "N", "K", "SCALE_K", "HAS_DS"],
    prune_configs_by=prune(_keep),
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
    grouped ordering (GROUP_M tile-rows share B tiles in L2).
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
        d_ptrs = D + offs_m[:, None].to(tl.int64) * stride_dm + offs_n[None, :] * stride_dn
        d = tl.load(d_ptrs, mask=mask, other=0.0).to(ACC)
        tl.store(DS_PART + pid_m.to(tl.int64) * N + offs_n, tl.sum(acc * d, axis=0), mask=mask_n)
    if SCALE_N:
        acc = acc * tl.load(S + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    c_ptrs = C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
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
        M, N, K,
        SCALE_K=scale_k, SCALE_N=scale_n, HAS_BIAS=bias is not None, HAS_DS=ds_part is not None,
        ACC=acc, PRECISION=input_precision(dtype),
    )  # fmt: skip
    return c, None if ds_part is None else ds_part.sum(0).to(dtype)
