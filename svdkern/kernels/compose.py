"""compose: W = (U·diag(s))·Vᵀ, single and grouped, forward and backward.

Single layer: the GEMM of `_gemm` (s scales the U tile inside the K loop;
backward: one GEMM gives G = dW·V with dU = G·diag(s) and the ds partials
colsum(U ⊙ G) in its epilogue, a second GEMM gives dV = dWᵀ·U·diag(s)).

Grouped: every layer in one persistent launch over a device-side problem
table (Triton tutorial 08), the factors packed into one buffer and addressed
by int64 offsets. Backward: 2·layers problems (dU and dV of each) in one launch.
Autotune key: the number of problems, the largest m, n (or P), r bucketed to
powers of two, precision. Configs: tensor-core or FMA (fp32 "ieee") tiles within
shared memory, with 16- and 32-column tiles for small ranks (and narrow layers);
the backward (ds epilogue) at most 64 accumulators per thread.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from svdkern._checks import check_factors, check_grouped
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
from svdkern.kernels._gemm import MIN_BLOCK_M, _tile_dot, acc_per_thread, gemm_smem, matmul

# Persistent tiles hold more live values than a plain GEMM's (the problem table, int64
# offsets): 128-row and 128-column tiles need 8 warps, and 4-warp 64 × 128 tiles spill.
# Every config is spill-free on sm_90 (triton 3.6) in both directions.
GROUPED_MMA = [
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
]
GROUPED_FMA = [
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
]
# Narrow tiles: the backward's outputs are P × r (small ranks), the forward's m × n.
NARROW_MMA = [
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, num_warps=2, num_stages=3),
]
NARROW_FMA = [
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=3),
]
# SVDKERN_AUTOTUNE=0: the first one the launch keeps (each is in both classes).
GROUPED_DEFAULTS = [
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=3),
]


def _keep_grouped(backward: bool):
    """Tiles not far larger than the largest problem (MAX_* are buckets), of the launch's
    class, within shared memory; the backward's ds epilogue holds a second tile, so at most
    64 accumulators per thread there."""

    def keep(cfg: dict, args: dict) -> bool:
        fit = cfg["BLOCK_M"] <= max(64, args["MAX_M"]) and cfg["BLOCK_N"] <= max(16, args["MAX_N"])
        space = GROUPED_FMA + NARROW_FMA if fma(args) else GROUPED_MMA + NARROW_MMA
        regs = not backward or acc_per_thread(cfg) <= 64
        smem = gemm_smem(cfg, args["F"].element_size()) <= SMEM_BUDGET
        return fit and regs and smem and member(cfg, space)

    return keep


@autotune(
    union(GROUPED_MMA, GROUPED_FMA, NARROW_MMA, NARROW_FMA),
    GROUPED_DEFAULTS,
    key=["NUM_PROBLEMS", "MAX_M", "MAX_N", "MAX_K", "PRECISION"],
    keep=_keep_grouped(backward=False),
)
@triton.jit
def _compose_grouped_fwd_kernel(
    F,
    S,
    W,
    TABLE,
    NUM_PROBLEMS,
    MAX_M,
    MAX_N,
    MAX_K,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """W_g = (U_g·diag(s_g))·V_gᵀ for every problem g, persistent over all tiles.

    TABLE (NUM_PROBLEMS × 7, int64): m, n, r, off_U, off_V, off_s, off_W.
    U_g (m×r) and V_g (n×r) are row-major in the packed buffer F, s_g in S,
    W_g (m×n) row-major in W. Program p takes tiles p, p + programs, …, in
    problem order; MAX_* (largest m, n, r, as buckets) only key the autotuner.
    """
    tile = tl.program_id(0).to(tl.int64)
    step = tl.num_programs(0)
    tile_end = tile * 0
    for g in range(NUM_PROBLEMS):
        row = TABLE + g * 7
        m = tl.load(row)
        n = tl.load(row + 1)
        r = tl.load(row + 2)
        num_n = tl.cdiv(n, BLOCK_N)
        tile_start = tile_end
        tile_end = tile_start + tl.cdiv(m, BLOCK_M) * num_n
        while tile < tile_end:
            local = tile - tile_start
            offs_m = (local // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = (local % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = _tile_dot(
                F + tl.load(row + 3), F + tl.load(row + 4), S + tl.load(row + 5),
                r, 1, 1, r, offs_m, offs_n, m, n, r,
                True, ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            w_ptrs = W + tl.load(row + 6) + offs_m[:, None] * n + offs_n[None, :]
            mask = (offs_m[:, None] < m) & (offs_n[None, :] < n)
            tl.store(w_ptrs, acc.to(W.dtype.element_ty), mask=mask)
            tile += step


@autotune(
    union(GROUPED_MMA, GROUPED_FMA, NARROW_MMA, NARROW_FMA),
    GROUPED_DEFAULTS,
    key=["NUM_PROBLEMS", "MAX_M", "MAX_N", "MAX_K", "PRECISION"],
    keep=_keep_grouped(backward=True),
    reset_to_zero=["DS_PART"],
)
@triton.jit
def _compose_grouped_bwd_kernel(
    GW,
    F,
    S,
    OUT,
    DS_PART,
    TABLE,
    stride_part,
    NUM_PROBLEMS,
    MAX_M,
    MAX_N,
    MAX_K,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """OUT_g = (A_g · B_g)·diag(s_g) for every problem g; ds partials where D_g is given.

    TABLE (NUM_PROBLEMS × 10, int64): P, K, r, off_A, stride_ap, stride_ak, off_B,
    off_D (−1: none), off_s, off_out. A_g (P×K) is a strided view of the packed
    upstream gradients GW (dW_l for dU_l, dW_lᵀ for dV_l: stride_ak or stride_ap
    is 1); B_g (K×r) and D_g (P×r)
    are row-major in the packed factors F; OUT_g (P×r) row-major. DS_PART
    (rows × Σr, ACC): row i, columns off_s.. hold Σ over tile-row i of (A·B) ⊙ D.
    """
    tile = tl.program_id(0).to(tl.int64)
    step = tl.num_programs(0)
    tile_end = tile * 0
    for g in range(NUM_PROBLEMS):
        row = TABLE + g * 10
        P = tl.load(row)
        K = tl.load(row + 1)
        r = tl.load(row + 2)
        off_d = tl.load(row + 7)
        off_s = tl.load(row + 8)
        num_n = tl.cdiv(r, BLOCK_N)
        tile_start = tile_end
        tile_end = tile_start + tl.cdiv(P, BLOCK_M) * num_n
        while tile < tile_end:
            local = tile - tile_start
            pid_m = local // num_n
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = (local % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
            a = GW + tl.load(row + 3)
            b = F + tl.load(row + 6)
            stride_ap = tl.load(row + 4)
            stride_ak = tl.load(row + 5)
            # One of A's strides is 1 (dW_l or dW_lᵀ): a literal 1 lets the loads vectorize.
            if stride_ak == 1:
                acc = _tile_dot(
                    a, b, S, stride_ap, 1, r, 1, offs_m, offs_n, P, r, K,
                    False, ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
                )  # fmt: skip
            else:
                acc = _tile_dot(
                    a, b, S, 1, stride_ak, r, 1, offs_m, offs_n, P, r, K,
                    False, ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
                )  # fmt: skip
            mask_n = offs_n < r
            mask = (offs_m[:, None] < P) & mask_n[None, :]
            if off_d >= 0:
                d = tl.load(F + off_d + offs_m[:, None] * r + offs_n[None, :], mask=mask, other=0.0)
                part_ptrs = DS_PART + pid_m * stride_part + off_s + offs_n
                tl.store(part_ptrs, tl.sum(acc * d.to(ACC), axis=0), mask=mask_n)
            sv = tl.load(S + off_s + offs_n, mask=mask_n, other=0.0).to(ACC)
            out_ptrs = OUT + tl.load(row + 9) + offs_m[:, None] * r + offs_n[None, :]
            tl.store(out_ptrs, (acc * sv[None, :]).to(OUT.dtype.element_ty), mask=mask)
            tile += step


def _check_grad(op: str, name: str, grad: torch.Tensor, shape: tuple, like: torch.Tensor) -> None:
    if not isinstance(grad, torch.Tensor) or tuple(grad.shape) != tuple(shape):
        got = list(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {got}")
    if grad.device != like.device:
        raise ValueError(f"{op}: {name} is on {grad.device} but the factors are on {like.device}")


def compose_fwd(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """W (m×n) = (U·diag(s))·Vᵀ; U (m×r), s (r,), V (n×r), any strides."""
    check_factors("compose", U, s, V)
    check_device_dtype("compose", U)
    with device_guard(U):
        W, _ = matmul(U, V.T, s, scale_k=True)
    return W


def compose_bwd(
    grad_W: torch.Tensor, U: torch.Tensor, s: torch.Tensor, V: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dU = (dW·V)·diag(s), ds = colsum(U ⊙ dW·V), dV = (dWᵀ·U)·diag(s); two GEMMs."""
    check_factors("compose_backward", U, s, V)
    check_device_dtype("compose_backward", U)
    _check_grad("compose_backward", "grad_W", grad_W, (U.shape[0], V.shape[0]), U)
    grad_W = grad_W.to(U.dtype)
    with device_guard(U):
        dU, ds = matmul(grad_W, V, s, scale_n=True, ds_with=U)
        dV, _ = matmul(grad_W.T, U, s, scale_n=True)
    return dU, ds, dV


def _grid(shapes: Sequence[tuple[int, int]], device: torch.device):
    """Persistent grid: all tiles of all problems (P×r shapes), at most 4 programs per SM."""
    cap = 4 * num_sms(device)

    def grid(meta):
        tiles = sum(
            triton.cdiv(p, meta["BLOCK_M"]) * triton.cdiv(q, meta["BLOCK_N"]) for p, q in shapes
        )
        return (max(1, min(tiles, cap)),)

    return grid


def compose_grouped_fwd(
    Us: Sequence[torch.Tensor], ss: Sequence[torch.Tensor], Vs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """W = [W_0, W_1, ...] packed (each W_l = (U_l·diag(s_l))·V_lᵀ, m_l×n_l row-major, back to
    back) in one launch; the op compose_grouped takes the layers' views of it."""
    Us, ss, Vs = list(Us), list(ss), list(Vs)
    check_grouped("compose_grouped", Us, ss, Vs)
    check_device_dtype("compose_grouped", Us[0])
    dtype, device = Us[0].dtype, Us[0].device
    G = len(Us)
    dims = [(U.shape[0], V.shape[0], U.shape[1]) for U, V in zip(Us, Vs)]
    f_off = offsets([U.numel() for U in Us] + [V.numel() for V in Vs])
    s_off = offsets([r for _, _, r in dims])
    w_off = offsets([m * n for m, n, _ in dims])
    table = problem_table(
        [(m, n, r, f_off[g], f_off[G + g], s_off[g], w_off[g]) for g, (m, n, r) in enumerate(dims)],
        device,
    )
    W = torch.empty(sum(m * n for m, n, _ in dims), dtype=dtype, device=device)
    if W.numel():
        with device_guard(Us[0]):
            _compose_grouped_fwd_kernel[_grid([(m, n) for m, n, _ in dims], device)](
                pack(Us + Vs), pack(ss), W, table,
                G, *(bucket(max(d[i] for d in dims)) for i in range(3)),
                ACC=acc_dtype(dtype), PRECISION=input_precision(dtype),
            )  # fmt: skip
    return W


def compose_grouped_bwd(
    grad_W: torch.Tensor,
    Us: Sequence[torch.Tensor],
    ss: Sequence[torch.Tensor],
    Vs: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """compose_bwd of every layer in one launch (2·layers GEMM problems).

    grad_W is packed like compose_grouped_fwd's W. Returns (dF, ds) packed:
    dF = [dU_0, ..., dU_last, dV_0, ..., dV_last] (row-major), ds = [ds_0, ds_1, ...].
    """
    Us, ss, Vs = list(Us), list(ss), list(Vs)
    check_grouped("compose_grouped_backward", Us, ss, Vs)
    check_device_dtype("compose_grouped_backward", Us[0])
    dtype, device = Us[0].dtype, Us[0].device
    G = len(Us)
    dims = [(U.shape[0], V.shape[0], U.shape[1]) for U, V in zip(Us, Vs)]
    _check_grad(
        "compose_grouped_backward", "grad_W", grad_W, (sum(m * n for m, n, _ in dims),), Us[0]
    )
    gw_off = offsets([m * n for m, n, _ in dims])
    f_off = offsets([m * r for m, _, r in dims] + [n * r for _, n, r in dims])
    s_off = offsets([r for _, _, r in dims])
    total_u, total_r = sum(m * r for m, _, r in dims), sum(r for _, _, r in dims)
    rows, shapes = [], []
    for g, (m, n, r) in enumerate(dims):
        # dU_g = (dW_g · V_g)·diag(s_g), with ds partials against U_g
        rows.append((m, n, r, gw_off[g], n, 1, f_off[G + g], f_off[g], s_off[g], f_off[g]))
        shapes.append((m, r))
    for g, (m, n, r) in enumerate(dims):
        # dV_g = (dW_gᵀ · U_g)·diag(s_g)
        rows.append((n, m, r, gw_off[g], 1, n, f_off[g], -1, s_off[g], f_off[G + g]))
        shapes.append((n, r))
    table = problem_table(rows, device)
    out = torch.empty(total_u + sum(n * r for _, n, r in dims), dtype=dtype, device=device)
    part_rows = max(triton.cdiv(m, MIN_BLOCK_M) for m, _, _ in dims)
    part_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ds_part = torch.zeros((part_rows, total_r), dtype=part_dtype, device=device)
    with device_guard(Us[0]):
        _compose_grouped_bwd_kernel[_grid(shapes, device)](
            grad_W.to(dtype).contiguous(), pack(Us + Vs), pack(ss), out, ds_part, table,
            total_r, 2 * G, bucket(max(max(d[0], d[1]) for d in dims)),
            bucket(max(d[2] for d in dims)), bucket(max(max(d[0], d[1]) for d in dims)),
            ACC=acc_dtype(dtype), PRECISION=input_precision(dtype),
        )  # fmt: skip
    return out, ds_part.sum(0).to(dtype)
