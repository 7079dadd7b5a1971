"""The five svdkern ops against svdkern.reference: values, gradients, opcheck, compile, errors.

Tests marked `interp` check kernel results; `make test` runs them twice: through the C++
CPU kernels, and through the Triton kernels under TRITON_INTERPRET=1 (SVDKERN_BACKEND=triton).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import budget
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import svdkern
from svdkern import ops, reference

interp = pytest.mark.interp
TRITON_CPU = svdkern.backend()["cpu"] == "triton"

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float64, id="fp64"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]

# Unit roundoff u of each dtype: rounding a real to it changes it by at most u·|value|.
UNIT = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


def acc_unit(dtype: torch.dtype) -> float:
    """Unit roundoff of the accumulator the ops use: fp64 for fp64 inputs, else fp32."""
    return UNIT[torch.float64 if dtype == torch.float64 else torch.float32]


def check_bound(actual, expected, dtype, *, R=None, A=None, K=0, roundings=3, name=""):
    """Assert |actual − expected| ≤ 2·(roundings·u·R + K·u_acc·A + u·|expected|) elementwise.

    `expected` is the fp64 reference evaluated on the same values the op got (inputs already
    rounded to `dtype`), so only the op's own rounding is measured. Derivation of the bound:
    - the ops accumulate in fp32 (fp64 for fp64; u_acc): a sum of at most K terms errs by at
      most K·u_acc·Σ|terms| (Higham, γ_K); A is Σ|terms| along the whole chain (the op
      evaluated on |inputs|). Products of bf16/fp16 values are exact in fp32.
    - an intermediate stored in `dtype` (s·U inside compose's GEMM, x·V and its scaling by s
      in lowrank_linear, G = dW·V, ...) is rounded by at most u·|intermediate|, which reaches
      the output as u·R, with R the output computed from the |intermediates|; at most
      `roundings` such roundings lie on any path.
    - the output's own rounding adds u·|expected|.
    The factor 2 covers the second-order terms. A bug that drops a factor s, sums the wrong
    rows or weights a tile wrongly moves an element by a fraction of R or |expected| itself,
    far above 2·(roundings + 1)·u, so it fails here in bf16 and fp16 as well.
    """
    u = UNIT[dtype]
    expected = expected.detach().double()
    bound = u * expected.abs()
    if R is not None:
        bound = bound + roundings * u * R.detach().double().abs()
    if A is not None:
        bound = bound + K * acc_unit(dtype) * A.detach().double().abs()
    bound = 2 * bound
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = (actual.detach().double() - expected).abs()
    over = err > bound
    if over.any():
        i = int((err - bound).flatten().argmax())
        raise AssertionError(
            f"{name} ({dtype}): {int(over.sum())} of {err.numel()} elements off by more than the "
            f"bound; worst at flat index {i}: |error| {err.flatten()[i].item():.3g} > bound "
            f"{bound.flatten()[i].item():.3g} (expected {expected.flatten()[i].item():.4g})"
        )


# (m, n, r): rank 1, m < n, m > n, odd sizes, one row, r not a multiple of 16, and a layer
# of several tiles in every direction (m, n > 128 and r > 64: several blocks of every
# config, on the GPU and in the interpreter).
SHAPES = [
    pytest.param(1, 1, 1, id="M1-N1-R1"),
    pytest.param(37, 29, 13, id="M37-N29-R13"),
    pytest.param(5, 40, 5, id="M5-N40-R5"),
    pytest.param(40, 6, 6, id="M40-N6-R6"),
    pytest.param(1, 17, 1, id="M1-N17-R1"),
    pytest.param(33, 65, 19, id="M33-N65-R19"),
    pytest.param(16, 16, 16, id="M16-N16-R16"),
    pytest.param(150, 133, 70, id="M150-N133-R70"),
]

# A grouped list with a layer larger than the biggest block (150 × 133, r = 70).
GROUP = [(37, 29, 13), (1, 1, 1), (5, 40, 5), (150, 133, 70), (16, 16, 16), (40, 6, 6), (9, 70, 3)]


def factors(m, n, r, dtype=torch.float64, requires_grad=True):
    """U (m×r), s (r,), V (n×r) with O(1) entries; s in [0.5, 1.5)."""
    U = torch.randn(m, r, dtype=dtype) / max(r, 1) ** 0.5
    s = torch.rand(r, dtype=dtype) + 0.5
    V = torch.randn(n, r, dtype=dtype) / max(r, 1) ** 0.5
    return [t.requires_grad_(requires_grad) for t in (U, s, V)]


def versions(tensors, dtype):
    """(inputs in dtype, fp64 copies of the same rounded values, their absolute values), all
    leaves requiring grad; None stays None."""

    def leaf(t):
        return None if t is None else t.detach().requires_grad_(True)

    inputs = [leaf(t.detach().to(dtype)) if t is not None else None for t in tensors]
    exact = [leaf(t.double()) if t is not None else None for t in inputs]
    absolute = [leaf(t.double().abs()) if t is not None else None for t in inputs]
    return inputs, exact, absolute


def grads_of(out, inputs, grad_out):
    """Gradients of `out` (tensor or list) w.r.t. inputs for the given upstream gradient."""
    outs = out if isinstance(out, (list, tuple)) else [out]
    gos = grad_out if isinstance(grad_out, (list, tuple)) else [grad_out]
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(outs, inputs, [g.to(o.dtype) for o, g in zip(outs, gos)])


def check_compose(U, s, V, grad_W, W, grads, dtype, name=""):
    """W and (dU, ds, dV) of compose on inputs in dtype against the fp64 reference."""
    _, exact, absolute = versions((U, s, V), dtype)
    m, n, r = U.shape[0], V.shape[0], U.shape[1]
    K = m + n + r
    g = grad_W.detach().double()
    W_ref = reference.compose(*exact)
    A_W = reference.compose(*absolute)
    check_bound(W, W_ref, dtype, R=A_W, A=A_W, K=K, name=f"{name}W")
    want = grads_of(W_ref, exact, g)
    A = grads_of(reference.compose(*absolute), absolute, g.abs())
    Ue, se, Ve = (t.detach() for t in exact)
    G = g @ Ve  # the rounded intermediate dW·V (m×r) of dU and ds; dV's is dWᵀ·U
    R = ((G * se).abs(), (Ue * G).abs().sum(0), ((g.T @ Ue) * se).abs())
    for label, got, w, r_mag, a_mag in zip(("dU", "ds", "dV"), grads, want, R, A):
        assert got.dtype == dtype, label
        check_bound(got, w, dtype, R=r_mag, A=a_mag, K=K, name=f"{name}{label}")


# ---------------------------------------------------------------- values and gradients


@interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, r", SHAPES)
def test_compose_matches_reference(m, n, r, dtype):
    inputs, _, _ = versions(factors(m, n, r), dtype)
    W = ops.compose(*inputs)
    assert W.dtype == dtype and W.shape == (m, n)
    grad_W = torch.randn(m, n).to(dtype)  # representable in dtype: both sides see the same
    check_compose(*inputs, grad_W, W, grads_of(W, inputs, grad_W), dtype)


@interp
@pytest.mark.parametrize("dtype", DTYPES)
def test_compose_grouped_matches_reference(dtype):
    layers = [versions(factors(m, n, r), dtype)[0] for m, n, r in GROUP]
    Us, ss, Vs = (list(t) for t in zip(*layers))
    Ws = ops.compose_grouped(Us, ss, Vs)
    assert len(Ws) == len(GROUP)
    grad_Ws = [torch.randn(m, n).to(dtype) for m, n, _ in GROUP]
    got = grads_of(Ws, [t for f in layers for t in f], grad_Ws)
    for i, (f, W, gW) in enumerate(zip(layers, Ws, grad_Ws)):
        assert W.dtype == dtype and W.shape == gW.shape
        check_compose(*f, gW, W, got[3 * i : 3 * i + 3], dtype, name=f"layer {i} ")


@interp
def test_compose_grouped_backward_with_unused_output():
    layers = [factors(m, n, r, dtype=torch.float32) for m, n, r in GROUP[:4]]
    Ws = ops.compose_grouped(*(list(t) for t in zip(*layers)))
    Ws[1].sum().backward()
    for i in (0, 2, 3):
        assert all(torch.count_nonzero(t.grad) == 0 for t in layers[i])
    want = grads_of(reference.compose(*layers[1]), layers[1], torch.ones(Ws[1].shape))
    for t, w in zip(layers[1], want):
        torch.testing.assert_close(t.grad, w, atol=1e-5, rtol=1e-4)


@interp
def test_compose_grouped_outputs_are_views_of_one_packed_output():
    """One launch writes every layer: the layers' W are views of the packed op's output, and
    the op outputs themselves alias nothing (the custom-op contract)."""
    layers = [factors(m, n, r, dtype=torch.float32) for m, n, r in GROUP[:3]]
    Us, ss, Vs = (list(t) for t in zip(*layers))
    Ws = ops.compose_grouped(Us, ss, Vs)
    packed = torch.ops.svdkern.compose_grouped_packed(Us, ss, Vs)
    assert packed.shape == (sum(m * n for m, n, _ in GROUP[:3]),)
    assert len({W.untyped_storage().data_ptr() for W in Ws}) == 1
    torch.testing.assert_close(torch.cat([W.reshape(-1) for W in Ws]), packed)
    dF, ds = torch.ops.svdkern.compose_grouped_backward(packed.detach(), Us, ss, Vs)
    assert dF.untyped_storage().data_ptr() != ds.untyped_storage().data_ptr()


def check_lowrank(x, U, s, V, bias, grad_y, y, grads, dtype, name=""):
    """y and (dx, dU, ds, dV[, dbias]) of lowrank_linear against the fp64 reference."""
    _, exact, absolute = versions((x, U, s, V, bias), dtype)
    rows, n, m, r = x.shape[:-1].numel(), V.shape[0], U.shape[0], U.shape[1]
    K = rows + n + m + r
    g = grad_y.detach().double()
    y_ref = reference.lowrank_linear(*exact)
    xe, Ue, se, Ve = (t.detach() for t in exact[:4])
    be = exact[4].detach() if bias is not None else torch.zeros(m, dtype=torch.float64)
    t = (xe @ Ve).abs()  # x·V, rows × r (stored in dtype on the C++ path, then scaled by s)
    gu = (g @ Ue).abs()  # dy·U, rows × r
    R_y = (t * se.abs()) @ Ue.abs().T + be.abs()
    check_bound(y, y_ref, dtype, R=R_y, A=reference.lowrank_linear(*absolute), K=K, name=f"{name}y")
    leaves = [e for e in exact if e is not None]
    want = grads_of(y_ref, leaves, g)
    A = grads_of(
        reference.lowrank_linear(*absolute), [a for a in absolute if a is not None], g.abs()
    )
    g2, t2, gu2 = g.abs().reshape(rows, m), t.reshape(rows, r), gu.reshape(rows, r)
    R = [
        ((gu * se.abs()) @ Ve.abs().T).reshape(x.shape),  # dx = (dy·U·diag(s))·Vᵀ
        g2.T @ (t2 * se.abs()),  # dU = dyᵀ·(x·V·diag(s))
        (t2 * gu2).sum(0),  # ds = colsum(x·V ⊙ dy·U)
        xe.abs().reshape(rows, n).T @ (gu2 * se.abs()),  # dV = xᵀ·(dy·U·diag(s))
        g2.sum(0),  # dbias = colsum(dy): no intermediate in dtype
    ]
    for label, got, w, r_mag, a_mag in zip(("dx", "dU", "ds", "dV", "dbias"), grads, want, R, A):
        assert got.dtype == dtype and got.shape == w.shape, label
        check_bound(got, w, dtype, R=r_mag, A=a_mag, K=K, name=f"{name}{label}")


LOWRANK_CASES = [
    pytest.param((4,), 29, 37, 13, True, id="B4-N29-M37-R13-bias"),
    pytest.param((1,), 17, 1, 1, False, id="B1-N17-M1-R1"),
    pytest.param((2, 3), 12, 20, 5, True, id="B2x3-N12-M20-R5-bias"),
    pytest.param((0,), 8, 6, 3, True, id="B0-N8-M6-R3-bias"),
    pytest.param((2, 3), 0, 5, 2, True, id="B2x3-N0-M5-R2-bias"),
    pytest.param((4,), 0, 3, 2, False, id="B4-N0-M3-R2"),
    pytest.param((33,), 40, 7, 7, False, id="B33-N40-M7-R7"),
    pytest.param((70,), 150, 133, 70, True, id="B70-N150-M133-R70-bias"),
    pytest.param((5,), 40, 30, 300, True, id="B5-N40-M30-R300-bias-unfused"),
]


@interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, n, m, r, with_bias", LOWRANK_CASES)
def test_lowrank_linear_matches_reference(batch, n, m, r, with_bias, dtype):
    U, s, V = factors(m, n, r)
    x = torch.randn(*batch, n, dtype=torch.float64)
    bias = torch.randn(m, dtype=torch.float64) if with_bias else None
    inputs, _, _ = versions((x, U, s, V, bias), dtype)
    y = ops.lowrank_linear(*inputs)
    assert y.shape == (*batch, m) and y.dtype == dtype
    grad_y = torch.randn(*batch, m).to(dtype)
    check_lowrank(*inputs, grad_y, y, grads_of(y, inputs, grad_y), dtype)


def check_orth(mats, loss, grads, upstream, dtype, name=""):
    """orth_loss and its gradients against the fp64 reference on the same values.

    loss = Σ ‖D‖²/r², D = MᵀM − I, all in fp32 from the rounded M: the only error is the
    accumulation, K·u_acc times A = Σ (2|D|·(|M|ᵀ|M| + I) + D²)/r². dM = 4g/r²·M·D, rounded
    once to dtype: A = 4|g|/r²·|M|·(|M|ᵀ|M| + I).
    """
    _, exact, _ = versions(mats, dtype)
    loss_ref = reference.orth_loss(exact)
    A_loss, A_grads, K = 0.0, [], 0
    for M in exact:
        M = M.detach()
        k, r = M.shape
        gram_abs = M.abs().T @ M.abs() + torch.eye(r, dtype=M.dtype)
        D = M.T @ M - torch.eye(r, dtype=M.dtype)
        A_loss = A_loss + (2 * D.abs() * gram_abs + D**2).sum() / r**2
        A_grads.append(4 * abs(upstream) / r**2 * M.abs() @ gram_abs)
        K = max(K, k + r * r + len(mats))
    check_bound(
        loss,
        loss_ref,
        torch.float32 if dtype != torch.float64 else dtype,
        A=A_loss,
        K=K,
        name=f"{name}orth loss",
    )
    want = grads_of(loss_ref, exact, torch.tensor(upstream, dtype=torch.float64))
    for i, (got, w, a) in enumerate(zip(grads, want, A_grads)):
        assert got.dtype == dtype
        check_bound(got, w, dtype, A=a, K=K, name=f"{name}dM[{i}]")


# (k, r): one tile, rank 1, k < r, and r = 80 > 64 (several Gram tiles, weighted twice off
# the diagonal) with k = 130 (several row blocks in the backward).
ORTH_SHAPES = [(37, 13), (1, 1), (40, 5), (16, 16), (6, 6), (70, 3), (29, 13), (10, 20), (130, 80)]


@interp
@pytest.mark.parametrize("dtype", DTYPES)
def test_orth_loss_matches_reference(dtype):
    mats, _, _ = versions([torch.randn(k, r) for k, r in ORTH_SHAPES], dtype)
    loss = ops.orth_loss(mats)
    assert loss.shape == () and loss.dtype == reference.loss_dtype(dtype)
    check_orth(mats, loss, grads_of(loss, mats, torch.tensor(0.75)), 0.75, dtype)


@interp
def test_orth_loss_is_zero_for_orthonormal_columns():
    Q = torch.linalg.qr(torch.randn(30, 7, dtype=torch.float64)).Q
    loss = ops.orth_loss([Q, Q[:, :3]])
    assert loss.item() == pytest.approx(0.0, abs=1e-24)


def check_sparsity(svals, kind, loss, grads, upstream, dtype, name=""):
    """sparsity_loss and its gradients against the fp64 reference on the same values.

    Everything runs in fp32 (fp64) from the rounded s: l1 and ‖s‖₂² are sums of n terms
    (error ≤ n·u_acc of the sum), h = l1/l2 adds a few roundings: K = n + 8. The loss's A is
    Σ R(s) (times 2 for the square); a gradient element's A is |g|·(1/l2 + h·|s_i|/l2²)
    (times 2h for the square; |g| for l1), and the output rounds once to dtype.
    """
    _, exact, _ = versions(svals, dtype)
    loss_ref = reference.sparsity_loss(exact, kind)
    K = max(s.shape[0] for s in svals) + 8 + len(svals)
    A_loss, A_grads = 0.0, []
    for s in exact:
        s = s.detach()
        l1, l2 = s.abs().sum(), s.norm().clamp_min(torch.finfo(torch.float32).tiny)
        h = l1 / l2
        term = {"l1": l1, "hoyer": h, "hoyer_square": 2 * h * h}[kind]
        A_loss = A_loss + term
        if kind == "l1":
            A_grads.append(torch.full_like(s, abs(upstream)))
        else:
            d = abs(upstream) * (1 / l2 + h * s.abs() / l2**2)
            A_grads.append(d * (2 * h if kind == "hoyer_square" else 1))
    ldtype = torch.float32 if dtype != torch.float64 else dtype
    check_bound(loss, loss_ref, ldtype, A=A_loss, K=K, name=f"{name}{kind} loss")
    want = grads_of(loss_ref, exact, torch.tensor(upstream, dtype=torch.float64))
    for i, (got, w, a) in enumerate(zip(grads, want, A_grads)):
        assert got.dtype == dtype
        check_bound(got, w, dtype, A=a, K=K, name=f"{name}ds[{i}]")


# Lengths: one element, odd, a zero vector, repeated values, and 2 × 9000 (over 16k in all:
# the forward reduces over several programs).
def sparsity_vectors():
    return [
        torch.randn(13),
        torch.randn(1),
        torch.zeros(5),
        torch.tensor([0.5, 0.5, -0.5, 0.0, 2.0, 2.0]),
        torch.randn(64),
        torch.randn(300),
        torch.randn(9000),
        torch.randn(9000),
    ]


@interp
@pytest.mark.parametrize("kind", reference.SPARSITY_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparsity_loss_matches_reference(kind, dtype):
    svals, _, _ = versions(sparsity_vectors(), dtype)
    loss = ops.sparsity_loss(svals, kind)
    assert loss.shape == () and loss.dtype == reference.loss_dtype(dtype)
    grads = grads_of(loss, svals, torch.tensor(1.25))
    check_sparsity(svals, kind, loss, grads, 1.25, dtype)
    assert torch.equal(grads[2], torch.zeros_like(grads[2]))  # the all-zero vector


@interp
@pytest.mark.parametrize("kind", reference.SPARSITY_KINDS)
def test_sparsity_loss_of_zero_vector_is_zero_with_zero_gradient(kind):
    z = torch.zeros(6, requires_grad=True)
    s = torch.tensor([3.0, -4.0], requires_grad=True)
    loss = ops.sparsity_loss([z, s], kind)
    loss.backward()
    expected = {"l1": 7.0, "hoyer": 7.0 / 5.0, "hoyer_square": (7.0 / 5.0) ** 2}[kind]
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(z.grad, torch.zeros(6))


# ---------------------------------------------------------------- layouts and empty dimensions


def _strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as t in another layout: a transposed copy viewed back ("T"), or every
    other element of a twice-as-long buffer ("step")."""
    if how == "T":
        return t.detach().T.contiguous().T if t.dim() == 2 else t.detach()
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t.detach()
    return wide[..., ::2]


@interp
@pytest.mark.parametrize("how", ["T", "step"])
def test_ops_and_gradients_on_non_contiguous_inputs(how):
    """Forward and backward with transposed (column-major) or strided inputs and upstream
    gradients equal the contiguous case's reference."""
    dtype = torch.float32
    U, s, V = factors(37, 29, 13, dtype=dtype, requires_grad=False)
    x, b = torch.randn(11, 29), torch.randn(37)
    Un, sn, Vn, xn, bn = (_strided(t, how).requires_grad_() for t in (U, s, V, x, b))
    assert not all(t.is_contiguous() for t in (Un, sn, Vn, xn, bn))
    gW = _strided(torch.randn(37, 29), how)
    W = ops.compose(Un, sn, Vn)
    check_compose(Un, sn, Vn, gW, W, grads_of(W, (Un, sn, Vn), gW), dtype)
    gy = _strided(torch.randn(11, 37), how)
    y = ops.lowrank_linear(xn, Un, sn, Vn, bn)
    check_lowrank(xn, Un, sn, Vn, bn, gy, y, grads_of(y, (xn, Un, sn, Vn, bn), gy), dtype)
    U2, s2, V2 = (_strided(t, how).requires_grad_() for t in factors(9, 70, 3, dtype, False))
    Ws = ops.compose_grouped([Un, U2], [sn, s2], [Vn, V2])
    gW2 = _strided(torch.randn(9, 70), how)
    got = grads_of(Ws, (Un, sn, Vn, U2, s2, V2), [gW, gW2])
    check_compose(Un, sn, Vn, gW, Ws[0], got[:3], dtype, name="layer 0 ")
    check_compose(U2, s2, V2, gW2, Ws[1], got[3:], dtype, name="layer 1 ")
    loss = ops.orth_loss([Un, Vn, U2])
    check_orth([Un, Vn, U2], loss, grads_of(loss, (Un, Vn, U2), torch.tensor(0.75)), 0.75, dtype)
    for kind in reference.SPARSITY_KINDS:
        loss = ops.sparsity_loss([sn, s2], kind)
        grads = grads_of(loss, (sn, s2), torch.tensor(1.25))
        check_sparsity([sn, s2], kind, loss, grads, 1.25, dtype)


@interp
@pytest.mark.parametrize(
    "m, n, rows",
    [
        pytest.param(0, 7, 3, id="m0"),
        pytest.param(6, 0, 3, id="n0"),
        pytest.param(0, 0, 0, id="m0-n0-rows0"),
    ],
)
def test_ops_on_empty_dimensions(m, n, rows):
    """m, n or the rows of x (k for orth_loss) of size 0: the empty results and the gradients
    of the reference (zeros, or bias and orth terms that do not depend on the empty side)."""
    dtype, r = torch.float32, 3
    U, s, V = factors(m, n, r, dtype=dtype)
    x, b = torch.randn(rows, n, requires_grad=True), torch.randn(m, requires_grad=True)
    gW = torch.randn(m, n)
    W = ops.compose(U, s, V)
    check_compose(U, s, V, gW, W, grads_of(W, (U, s, V), gW), dtype)
    gy = torch.randn(rows, m)
    y = ops.lowrank_linear(x, U, s, V, b)
    check_lowrank(x, U, s, V, b, gy, y, grads_of(y, (x, U, s, V, b), gy), dtype)
    # A grouped list with an empty layer between two others.
    layers = [factors(5, 4, 2, dtype=dtype), [U, s, V], factors(3, 8, 4, dtype=dtype)]
    Ws = ops.compose_grouped(*(list(t) for t in zip(*layers)))
    assert [tuple(W.shape) for W in Ws] == [(5, 4), (m, n), (3, 8)]
    gWs = [torch.randn(W.shape) for W in Ws]
    got = grads_of(Ws, [t for f in layers for t in f], gWs)
    for i, (f, W, g) in enumerate(zip(layers, Ws, gWs)):
        check_compose(*f, g, W, got[3 * i : 3 * i + 3], dtype, name=f"layer {i} ")
    mats = [U, V, torch.randn(rows, 4, requires_grad=True)]  # k = 0: ‖−I‖²/r² = 1/r each
    loss = ops.orth_loss(mats)
    check_orth(mats, loss, grads_of(loss, mats, torch.tensor(0.75)), 0.75, dtype)


# ---------------------------------------------------------------- extreme values

_FP32_MAX = torch.finfo(torch.float32).max


@interp
def test_losses_beyond_fp32_range_are_inf_like_the_reference():
    """A loss whose value exceeds fp32's range is inf on every path (the C++ kernels sum in
    fp64 and used to refuse to narrow the sum), and the reference agrees."""
    cases = [
        (lambda m: m.orth_loss([torch.full((4, 2), 1e15)]), "orth 1e15"),  # Σ (D/r)² ≈ 1.6e61
        (lambda m: m.sparsity_loss([torch.full((2,), 2e38)], "l1"), "l1 2 × 2e38"),
    ]
    for call, name in cases:
        for impl in (ops, reference):
            got = call(impl)
            assert got.dtype == torch.float32 and got.item() == float("inf"), (name, impl, got)
    # Just below the range the sum is finite on every path.
    for impl in (ops, reference):
        got = impl.sparsity_loss([torch.full((2,), 1.5e38)], "l1")
        assert got.item() == pytest.approx(3e38, rel=1e-6) and got.item() <= _FP32_MAX


@interp
def test_orth_loss_is_finite_where_only_squared_residuals_overflow():
    """D = MᵀM − I with D₀₀ ≈ 1e20: D₀₀² overflows fp32 but the loss D₀₀²/r² + (r − 1)/r²
    (r = 64) does not; every path sums (D/r)² and returns it."""
    M = torch.zeros(1, 64)
    M[0, 0] = 1e10
    want = reference.orth_loss([M.double()]).item()  # fp64: no overflow anywhere
    assert want == pytest.approx(((1e20 - 1) ** 2 + 63) / 64**2, rel=1e-12)
    for impl in (ops, reference):
        got = impl.orth_loss([M])
        assert got.item() == pytest.approx(want, rel=1e-6), impl


# Hoyer measures of s = base·2^k for exponents whose squares overflow (k > 0) or underflow
# (k < 0) in the dtype; h is scale invariant, so h(s) = h(base) and ∇h(s) = 2^-k·∇h(base).
HOYER_EXTREMES = [
    pytest.param(torch.float32, 125, id="fp32-2^125"),
    pytest.param(torch.float32, -125, id="fp32-2^-125"),
    pytest.param(torch.float64, 1000, id="fp64-2^1000"),
    pytest.param(torch.float64, -1000, id="fp64-2^-1000"),
]


@interp
@pytest.mark.parametrize("kind", ["hoyer", "hoyer_square"])
@pytest.mark.parametrize("dtype, k", HOYER_EXTREMES)
def test_hoyer_is_scale_invariant_at_the_ends_of_the_range(dtype, k, kind):
    """Values near the dtype's largest (their squares overflow) or smallest normal (their
    squares underflow): the Hoyer measures and gradients are those of the same vector at a
    moderate scale, on every path and in the reference (not nan, 0 or a clamped ratio)."""
    base = torch.tensor([3.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    s = (base * 2.0**k).to(dtype)  # exact: a power-of-two scaling of small integers
    assert torch.equal(s.double() * 2.0**-k, base)
    sq = (s * s).sum()
    assert not (torch.isfinite(sq) and sq >= torch.finfo(dtype).tiny)  # overflows or underflows
    leaf = base.clone().requires_grad_()
    want = reference.sparsity_loss([leaf], kind)
    (want_grad,) = torch.autograd.grad(want, leaf)
    # ‖base‖₁/‖base‖₂ from the definition, not through the reference.
    h = float(base.abs().sum() / base.norm())
    assert want.item() == pytest.approx(h if kind == "hoyer" else h * h, rel=1e-12)
    for impl in (ops, reference):
        x = s.clone().requires_grad_()
        got = impl.sparsity_loss([x], kind)
        assert got.item() == pytest.approx(want.item(), rel=1e-6), impl
        (grad,) = torch.autograd.grad(got, x)
        # fp32's gradients at 2^125 are subnormal (~2^-127): allow a few of their spacings.
        torch.testing.assert_close(
            grad.double(), want_grad * 2.0**-k, rtol=1e-5, atol=8 * 2.0**-149, msg=str(impl)
        )


@interp
def test_hoyer_of_a_constant_vector_near_fp32_max_is_its_definition():
    """The reported case: four values of 3e38. ‖s‖₁/‖s‖₂ = 4/2 = 2 (and 4 squared)."""
    s = torch.full((4,), 3e38)
    for impl in (ops, reference):
        assert impl.sparsity_loss([s], "hoyer").item() == pytest.approx(2.0, rel=1e-6), impl
        assert impl.sparsity_loss([s], "hoyer_square").item() == pytest.approx(4.0, rel=1e-6)


# ---------------------------------------------------------------- C++ autograd, opcheck, compile


def _op_cases():
    """(name, fn, fp64 inputs) for every op: fn takes the inputs positionally."""
    U, s, V = factors(7, 5, 3)
    U2, s2, V2 = factors(4, 9, 2)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    cases = [
        ("compose", ops.compose, (U, s, V)),
        (
            "compose_grouped",
            lambda *t: ops.compose_grouped(t[0::3], t[1::3], t[2::3]),
            (U, s, V, U2, s2, V2),
        ),
        ("lowrank_linear", ops.lowrank_linear, (x, U, s, V, b)),
        ("lowrank_linear_nobias", lambda *t: ops.lowrank_linear(*t, None), (x, U, s, V)),
        ("orth_loss", lambda *t: ops.orth_loss(t), (U, V, U2)),
    ]
    cases += [
        (f"sparsity_loss_{kind}", lambda *t, k=kind: ops.sparsity_loss(t, k), (s, s2))
        for kind in reference.SPARSITY_KINDS
    ]
    return [pytest.param(fn, inputs, id=name) for name, fn, inputs in cases]


@interp
@pytest.mark.parametrize("fn, inputs", _op_cases())
def test_gradcheck_fp64(fn, inputs):
    # The interpreter runs every kernel program in Python: there gradcheck compares the
    # Jacobians along random directions (fast mode) instead of column by column.
    assert torch.autograd.gradcheck(fn, inputs, atol=1e-8, rtol=1e-6, fast_mode=TRITON_CPU)


@interp
@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("fn, inputs", _op_cases())
def test_double_backward_raises_naming_the_op(fn, inputs, request):
    """The ops support first derivatives only. With create_graph=True the gradients are the
    usual ones, and differentiating them again raises an error naming the op instead of
    returning a second derivative that is wrong (orth_loss) or missing (sparsity_loss)."""
    op = request.node.callspec.id.removesuffix("_nobias")
    op = "sparsity_loss" if op.startswith("sparsity_loss") else op
    inputs = [t.detach().requires_grad_() for t in inputs]

    def scalar(out):
        outs = out if isinstance(out, (list, tuple)) else [out]
        return sum((o * torch.linspace(0.5, 1.5, o.numel()).view(o.shape)).sum() for o in outs)

    want = torch.autograd.grad(scalar(fn(*inputs)), inputs)
    first = torch.autograd.grad(scalar(fn(*inputs)), inputs, create_graph=True)
    for g, w in zip(first, want):
        torch.testing.assert_close(g.detach(), w, rtol=0, atol=0)
    second = sum((g**2).sum() for g in first)
    message = rf"svdkern::{op} supports first derivatives only"
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(second, inputs)
    # The same through .backward(create_graph=True) and the leaves' .grad.
    scalar(fn(*inputs)).backward(create_graph=True)
    with pytest.raises(RuntimeError, match=message):
        sum((t.grad**2).sum() for t in inputs).backward()
    for t in inputs:
        t.grad = None  # .grad refers to the graph that holds t: break the cycle


def test_reference_second_derivative_of_orth_loss_is_supported():
    """The reference (plain PyTorch) differentiates twice; a second derivative through the
    C++ op raises (above) rather than disagreeing with it."""
    M = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda m: reference.orth_loss([m]), (M,))
    for kind in reference.SPARSITY_KINDS:
        s = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
        assert torch.autograd.gradgradcheck(lambda t, k=kind: reference.sparsity_loss([t], k), (s,))


def _opcheck_cases():
    U, s, V = factors(7, 5, 3, dtype=torch.float32)
    U2, s2, V2 = factors(4, 9, 2, dtype=torch.float32)
    x = torch.randn(2, 3, 5, requires_grad=True)
    b = torch.randn(7, requires_grad=True)
    g = torch.tensor(1.5)
    nd = [t.detach() for t in (U, s, V, U2, s2, V2, x)]
    Us, ss, Vs = [nd[0], nd[3]], [nd[1], nd[4]], [nd[2], nd[5]]
    return [
        pytest.param("compose", (U, s, V), id="compose"),
        pytest.param("compose_backward", (torch.randn(7, 5), *nd[:3]), id="compose_backward"),
        pytest.param("compose_grouped", ([U, U2], [s, s2], [V, V2]), id="compose_grouped"),
        pytest.param(
            "compose_grouped_packed", ([U, U2], [s, s2], [V, V2]), id="compose_grouped_packed"
        ),
        pytest.param(
            "compose_grouped_backward",
            (torch.randn(7 * 5 + 4 * 9), Us, ss, Vs),
            id="compose_grouped_backward",
        ),
        pytest.param("lowrank_linear", (x, U, s, V, b), id="lowrank_linear"),
        pytest.param("lowrank_linear", (x, U, s, V, None), id="lowrank_linear_nobias"),
        pytest.param(
            "lowrank_linear_forward", (nd[6], *nd[:3], b.detach()), id="lowrank_linear_forward"
        ),
        pytest.param(
            "lowrank_linear_backward",
            (torch.randn(2, 3, 7), nd[6], *nd[:3], torch.randn(6, 3), True),
            id="lowrank_linear_backward",
        ),
        pytest.param(
            "lowrank_linear_backward",
            (torch.randn(2, 3, 7), nd[6], *nd[:3], torch.empty(0), False),
            id="lowrank_linear_backward_recompute_nobias",
        ),
        pytest.param("orth_loss", ([U, V, U2],), id="orth_loss"),
        pytest.param("orth_loss_forward", ([nd[0], nd[2]],), id="orth_loss_forward"),
        pytest.param(
            "orth_loss_backward", (g, [nd[0], nd[2]], torch.randn(18)), id="orth_loss_backward"
        ),
        pytest.param("sparsity_loss", ([s, s2], "hoyer"), id="sparsity_loss"),
        pytest.param(
            "sparsity_loss_backward",
            (g, [nd[1], nd[4]], "hoyer_square"),
            id="sparsity_loss_backward",
        ),
    ]


@interp
@pytest.mark.parametrize("name, args", _opcheck_cases())
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.svdkern, name).default, args)


def _to_cuda(obj):
    """The same arguments on the GPU (leaves that required grad still do)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cuda().requires_grad_(obj.requires_grad)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cuda(o) for o in obj)
    return obj


@pytest.mark.cuda
@pytest.mark.parametrize("name, args", _opcheck_cases())
def test_opcheck_cuda(name, args):
    torch.library.opcheck(getattr(torch.ops.svdkern, name).default, _to_cuda(args))


def _compile_cases():
    U, s, V = factors(7, 5, 3, dtype=torch.float32)
    U2, s2, V2 = factors(4, 9, 2, dtype=torch.float32)
    x = torch.randn(6, 5, requires_grad=True)
    b = torch.randn(7, requires_grad=True)

    def train_step(U, s, V, U2, s2, V2, x, b):
        W, W2 = ops.compose_grouped([U, U2], [s, s2], [V, V2])
        y = torch.tanh(x @ W.T) + ops.lowrank_linear(x, U, s, V, b)
        reg = ops.orth_loss([U, V, U2, V2]) + 0.1 * ops.sparsity_loss([s, s2], "hoyer")
        return (y**2).mean() + W2.sum() + ops.compose(U, s, V).sum() + reg

    return train_step, (U, s, V, U2, s2, V2, x, b)


@interp
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    fn, inputs = _compile_cases()
    eager = fn(*inputs)
    eager_grads = torch.autograd.grad(eager, inputs)
    # On CPU tensors the C++ kernels and the Triton kernels (interpreter pass) trace to the same
    # graph with different shapes of lowrank_linear_forward's saved x·V, and inductor's
    # on-disk caches do not key on which kernels serve the device: compile afresh here, so
    # one pass never runs the other's cached code.
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        compiled = torch.compile(fn, fullgraph=True, backend=backend)(*inputs)
        compiled_grads = torch.autograd.grad(compiled, inputs)
    torch.testing.assert_close(compiled, eager)
    for g, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager_cuda(backend):
    torch._dynamo.reset()
    fn, inputs = _compile_cases()
    inputs = _to_cuda(inputs)
    eager = fn(*inputs)
    eager_grads = torch.autograd.grad(eager, inputs)
    compiled = torch.compile(fn, fullgraph=True, backend=backend)(*inputs)
    compiled_grads = torch.autograd.grad(compiled, inputs)
    torch.testing.assert_close(compiled, eager)
    for g, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, e)


# ---------------------------------------------------------------- autocast and dtypes


@pytest.mark.skipif(TRITON_CPU, reason="CPU autocast exercised on the C++ path")
def test_autocast_runs_matmul_ops_in_autocast_dtype_and_losses_in_fp32():
    U, s, V = factors(8, 6, 4, dtype=torch.float32)
    x = torch.randn(3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        W = ops.compose(U, s, V)
        (W_grouped,) = ops.compose_grouped([U], [s], [V])
        y = ops.lowrank_linear(x, U, s, V, None)
        orth = ops.orth_loss([U, V])
        sparsity = ops.sparsity_loss([s])
    assert W.dtype == W_grouped.dtype == y.dtype == torch.bfloat16
    assert orth.dtype == sparsity.dtype == torch.float32
    # The Gram inside orth_loss stays fp32: autocast must not reach the kernel's own GEMMs.
    torch.testing.assert_close(orth, reference.orth_loss([U, V]))
    (W.float().sum() + y.float().sum() + W_grouped.float().sum()).backward()
    assert U.grad.dtype == torch.float32  # gradients flow back through the autocast cast


# ---------------------------------------------------------------- hypothesis fuzzing

# Enough examples to reach odd corners in both passes; the interpreter runs each kernel
# program in Python, so it gets fewer and smaller sizes (still several tiles: > 32 rows, > 64
# columns).
FUZZ = settings(
    max_examples=budget(15 if TRITON_CPU else 120),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
FUZZ_SINGLE = settings(FUZZ, max_examples=budget(40 if TRITON_CPU else 150))
SIZE = 72 if TRITON_CPU else 96


def _svals_with_zeros_and_repeats(r: int, zeros: int, repeats: int) -> torch.Tensor:
    """s in [0.5, 1.5) with `zeros` entries set to 0 and `repeats` copies of one value."""
    s = torch.rand(r) + 0.5
    s[torch.randperm(r)[: min(zeros, r)]] = 0.0
    if repeats and r > 1:
        s[torch.randperm(r)[: min(repeats + 1, r)]] = s[0].item()
    return s


@interp
@FUZZ_SINGLE
@given(
    m=st.integers(0, SIZE),
    n=st.integers(0, SIZE),
    r=st.integers(1, 40),
    rows=st.integers(0, 40),
    zeros=st.integers(0, 4),
    repeats=st.integers(0, 4),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_compose_and_lowrank_linear_with_gradients(
    m, n, r, rows, zeros, repeats, with_bias, seed
):
    torch.manual_seed(seed)
    dtype = torch.float32
    U, _, V = factors(m, n, r, dtype=dtype, requires_grad=False)
    s = _svals_with_zeros_and_repeats(r, zeros, repeats)
    U, s, V = (t.requires_grad_() for t in (U, s, V))
    gW = torch.randn(m, n)
    W = ops.compose(U, s, V)
    check_compose(U, s, V, gW, W, grads_of(W, (U, s, V), gW), dtype)
    x = torch.randn(rows, n, requires_grad=True)
    b = torch.randn(m, requires_grad=True) if with_bias else None
    gy = torch.randn(rows, m)
    y = ops.lowrank_linear(x, U, s, V, b)
    check_lowrank(x, U, s, V, b, gy, y, grads_of(y, (x, U, s, V, b), gy), dtype)


@interp
@FUZZ
@given(
    shapes=st.lists(st.tuples(st.integers(1, 70), st.integers(1, 24)), min_size=1, max_size=5),
    zeros=st.integers(0, 4),
    repeats=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_fuzz_grouped_and_losses_with_gradients(shapes, zeros, repeats, seed):
    torch.manual_seed(seed)
    dtype = torch.float32
    layers = []
    for k, r in shapes:
        U, _, V = factors(k, max(1, k // 2), r, dtype=dtype, requires_grad=False)
        s = _svals_with_zeros_and_repeats(r, zeros, repeats)
        layers.append([t.requires_grad_() for t in (U, s, V)])
    Ws = ops.compose_grouped(*(list(t) for t in zip(*layers)))
    gWs = [torch.randn(W.shape) for W in Ws]
    got = grads_of(Ws, [t for f in layers for t in f], gWs)
    for i, (f, W, g) in enumerate(zip(layers, Ws, gWs)):
        check_compose(*f, g, W, got[3 * i : 3 * i + 3], dtype, name=f"layer {i} ")
    mats = [t for f in layers for t in (f[0], f[2])]
    loss = ops.orth_loss(mats)
    check_orth(mats, loss, grads_of(loss, mats, torch.tensor(0.75)), 0.75, dtype)
    svals = [f[1] for f in layers]
    for kind in reference.SPARSITY_KINDS:
        loss = ops.sparsity_loss(svals, kind)
        grads = grads_of(loss, svals, torch.tensor(1.25))
        check_sparsity(svals, kind, loss, grads, 1.25, dtype)


# ---------------------------------------------------------------- bad input


def _bad_inputs():
    U, s, V = factors(6, 5, 3, dtype=torch.float32, requires_grad=False)
    x = torch.randn(4, 5)
    return [
        pytest.param(
            lambda: ops.compose(U[:, :2], s, V),
            ValueError,
            r"s must have shape \(2,\)",
            id="compose-rank-mismatch",
        ),
        pytest.param(
            lambda: ops.compose(U, s, V[:, :2]),
            ValueError,
            r"V must have 3 columns",
            id="compose-V-columns",
        ),
        pytest.param(
            lambda: ops.compose(U[:, 0], s, V),
            ValueError,
            r"U must be a 2-D tensor",
            id="compose-1d-U",
        ),
        pytest.param(
            lambda: ops.compose(U.long(), s, V),
            TypeError,
            r"U must be a floating-point",
            id="compose-int-U",
        ),
        pytest.param(
            lambda: ops.compose(U, s.double(), V),
            TypeError,
            r"s has dtype",
            id="compose-mixed-dtype",
        ),
        pytest.param(
            lambda: ops.compose(U[:, :0], s[:0], V[:, :0]),
            ValueError,
            r"rank must be >= 1",
            id="compose-rank-0",
        ),
        pytest.param(
            lambda: ops.compose_grouped([U], [s], []),
            ValueError,
            r"same length",
            id="grouped-lengths",
        ),
        pytest.param(
            lambda: ops.compose_grouped([], [], []),
            ValueError,
            r"Us must be a non-empty list",
            id="grouped-empty",
        ),
        pytest.param(
            lambda: ops.compose_grouped([U, U.double()], [s, s.double()], [V, V.double()]),
            TypeError,
            r"Us\[1\] has dtype",
            id="grouped-mixed-dtype",
        ),
        pytest.param(
            lambda: ops.lowrank_linear(torch.randn(4, 6), U, s, V),
            ValueError,
            r"x must have last dimension 5",
            id="lowrank-x-shape",
        ),
        pytest.param(
            lambda: ops.lowrank_linear(x, U, s, V, torch.randn(5)),
            ValueError,
            r"bias must have shape \(6,\)",
            id="lowrank-bias-shape",
        ),
        pytest.param(
            lambda: ops.lowrank_linear(x.double(), U, s, V),
            TypeError,
            r"x has dtype",
            id="lowrank-x-dtype",
        ),
        pytest.param(
            lambda: ops.orth_loss([]), ValueError, r"mats must be a non-empty list", id="orth-empty"
        ),
        pytest.param(
            lambda: ops.orth_loss([U, s]),
            ValueError,
            r"mats\[1\] must be a 2-D tensor",
            id="orth-1d",
        ),
        pytest.param(
            lambda: ops.orth_loss([U.int()]),
            TypeError,
            r"mats\[0\] must be a floating-point",
            id="orth-int",
        ),
        pytest.param(
            lambda: ops.sparsity_loss([s], "l2"),
            ValueError,
            r"kind must be one of",
            id="sparsity-kind",
        ),
        pytest.param(
            lambda: ops.sparsity_loss([], "l1"),
            ValueError,
            r"svals must be a non-empty list",
            id="sparsity-empty",
        ),
        pytest.param(
            lambda: ops.sparsity_loss([U], "l1"),
            ValueError,
            r"svals\[0\] must be a 1-D tensor",
            id="sparsity-2d",
        ),
        pytest.param(
            lambda: ops.sparsity_loss([s, s[:0]], "l1"),
            ValueError,
            r"svals\[1\] must have at least one element",
            id="sparsity-empty-vector",
        ),
        pytest.param(
            lambda: ops.orth_loss([U, U[:, :0]]),
            ValueError,
            r"mats\[1\] must have at least one column",
            id="orth-no-columns",
        ),
        pytest.param(
            lambda: ops.sparsity_loss([s, s.double()], "l1"),
            TypeError,
            r"svals\[1\] has dtype",
            id="sparsity-mixed-dtype",
        ),
    ]


@interp
@pytest.mark.parametrize("call, error, match", _bad_inputs())
def test_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------- backends


@interp
def test_backend_reports_the_serving_implementation():
    expected_cpu = "triton" if os.environ.get("SVDKERN_BACKEND") == "triton" else "cpp"
    assert svdkern.backend()["cpu"] == expected_cpu
    for name in ops.OP_NAMES:  # the CUDA kernels stay registered whatever serves the CPU
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"svdkern::{name}", "CUDA"), name


@pytest.mark.skipif(TRITON_CPU, reason="checks the C++ build itself")
def test_extension_defines_every_op_with_autograd():
    for name in ops.OP_NAMES:
        assert hasattr(torch.ops.svdkern, name), name
    U, s, V = factors(3, 2, 2, dtype=torch.float32)
    assert ops.compose(U, s, V).grad_fn.name().endswith("::Compose>")


def test_reference_fallback_without_extension_warns_once_and_works():
    code = (
        "import importlib.abc, sys, warnings, torch\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'svdkern._C':\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    import svdkern\n"
        "print(svdkern.backend()['cpu'], len([x for x in w if 'reference' in str(x.message)]))\n"
        "U = torch.randn(5, 2, requires_grad=True)\n"
        "W = svdkern.ops.compose(U, torch.ones(2), torch.randn(3, 2))\n"
        "W.sum().backward()\n"
        "print(tuple(W.shape), U.grad is not None)\n"
        "try:\n"
        "    svdkern.ops.sparsity_loss([torch.ones(2)], 'l3')\n"
        "except ValueError as e:\n"
        "    print('ValueError', 'kind must be one of' in str(e))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("SVDKERN_BACKEND", "TRITON_INTERPRET")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split("\n")[:3] == ["reference 1", "(5, 3) True", "ValueError True"]


def test_reference_mode_routes_every_op_to_the_reference():
    U, s, V = factors(5, 4, 3, dtype=torch.float32)
    with ops.reference_mode():
        W = ops.compose(U, s, V)
        loss = ops.orth_loss([U, V]) + ops.sparsity_loss([s], "l1")
    assert W.grad_fn.name() == "MmBackward0"
    assert "svdkern" not in loss.grad_fn.name()
    assert ops.compose(U, s, V).grad_fn.name().endswith("::Compose>")
