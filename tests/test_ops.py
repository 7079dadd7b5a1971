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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import svdkern
from svdkern import ops, reference

interp = pytest.mark.interp
TRITON_CPU = svdkern.backend()["cpu"] == "triton"

# (dtype, atol, rtol) against the fp64 reference; bf16/fp16 bounds are those of a matmul
# of the same size in that dtype (inputs are O(1), reductions of up to ~64 terms).
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-4, id="fp32"),
    pytest.param(torch.float64, 1e-12, 1e-10, id="fp64"),
    pytest.param(torch.bfloat16, 1e-1, 3e-2, id="bf16"),
    pytest.param(torch.float16, 2e-2, 1e-2, id="fp16"),
]

# (m, n, r): rank 1, m < n, m > n, odd sizes, one row, r not a multiple of 16.
SHAPES = [
    pytest.param(1, 1, 1, id="M1-N1-R1"),
    pytest.param(37, 29, 13, id="M37-N29-R13"),
    pytest.param(5, 40, 5, id="M5-N40-R5"),
    pytest.param(40, 6, 6, id="M40-N6-R6"),
    pytest.param(1, 17, 1, id="M1-N17-R1"),
    pytest.param(33, 65, 19, id="M33-N65-R19"),
    pytest.param(16, 16, 16, id="M16-N16-R16"),
]

GROUP = [(37, 29, 13), (1, 1, 1), (5, 40, 5), (16, 16, 16), (40, 6, 6), (9, 70, 3)]


def factors(m, n, r, dtype=torch.float64, requires_grad=True):
    """U (m×r), s (r,), V (n×r) with O(1) entries."""
    U = torch.randn(m, r, dtype=dtype) / r**0.5
    s = torch.rand(r, dtype=dtype) + 0.5
    V = torch.randn(n, r, dtype=dtype) / r**0.5
    return [t.requires_grad_(requires_grad) for t in (U, s, V)]


def cast(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_(True) for t in tensors]


def grads_of(out, inputs, grad_out):
    """Gradients of `out` (tensor or list) w.r.t. inputs for the given upstream gradient."""
    outs = out if isinstance(out, (list, tuple)) else [out]
    gos = grad_out if isinstance(grad_out, (list, tuple)) else [grad_out]
    return torch.autograd.grad(outs, inputs, [g.to(o.dtype) for o, g in zip(outs, gos)])


def assert_close(actual, expected, atol, rtol):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------- values and gradients


@interp
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("m, n, r", SHAPES)
def test_compose_matches_reference(m, n, r, dtype, atol, rtol):
    exact = factors(m, n, r)
    inputs = cast(exact, dtype)
    W = ops.compose(*inputs)
    W_ref = reference.compose(*exact)
    assert W.dtype == dtype and W.shape == (m, n)
    assert_close(W, W_ref, atol, rtol)

    grad_W = torch.randn(m, n, dtype=torch.float64)
    got = grads_of(W, inputs, grad_W)
    want = grads_of(W_ref, exact, grad_W)
    for name, g, w in zip("Usv", got, want):
        assert g.dtype == dtype, name
        assert_close(g, w, atol * r**0.5 * 4, rtol * 4)


@interp
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_compose_grouped_matches_reference(dtype, atol, rtol):
    exact = [factors(m, n, r) for m, n, r in GROUP]
    inputs = [cast(f, dtype) for f in exact]
    Us, ss, Vs = (list(t) for t in zip(*inputs))
    Ws = ops.compose_grouped(Us, ss, Vs)
    Ws_ref = reference.compose_grouped(*(list(t) for t in zip(*exact)))
    assert len(Ws) == len(GROUP)
    for W, W_ref in zip(Ws, Ws_ref):
        assert W.dtype == dtype
        assert_close(W, W_ref, atol, rtol)

    grad_Ws = [torch.randn(m, n, dtype=torch.float64) for m, n, _ in GROUP]
    got = grads_of(Ws, [t for f in inputs for t in f], grad_Ws)
    want = grads_of(Ws_ref, [t for f in exact for t in f], grad_Ws)
    for g, w in zip(got, want):
        assert_close(g, w, atol * 16, rtol * 4)


@interp
def test_compose_grouped_backward_with_unused_output():
    exact = [factors(m, n, r, dtype=torch.float32) for m, n, r in GROUP[:3]]
    Ws = ops.compose_grouped(*(list(t) for t in zip(*exact)))
    Ws[1].sum().backward()
    assert torch.count_nonzero(exact[0][0].grad) == 0
    want = grads_of(reference.compose(*exact[1]), exact[1], torch.ones(Ws[1].shape))
    assert_close(exact[1][0].grad, want[0], 1e-5, 1e-4)


LOWRANK_CASES = [
    pytest.param((4,), 29, 37, 13, True, id="B4-N29-M37-R13-bias"),
    pytest.param((1,), 17, 1, 1, False, id="B1-N17-M1-R1"),
    pytest.param((2, 3), 12, 20, 5, True, id="B2x3-N12-M20-R5-bias"),
    pytest.param((0,), 8, 6, 3, True, id="B0-N8-M6-R3-bias"),
    pytest.param((33,), 40, 7, 7, False, id="B33-N40-M7-R7"),
]


@interp
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("batch, n, m, r, with_bias", LOWRANK_CASES)
def test_lowrank_linear_matches_reference(batch, n, m, r, with_bias, dtype, atol, rtol):
    U, s, V = factors(m, n, r)
    x = torch.randn(*batch, n, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(m, dtype=torch.float64, requires_grad=True) if with_bias else None
    exact = [x, U, s, V] + ([bias] if with_bias else [])
    inputs = cast(exact, dtype)
    args = inputs if with_bias else [*inputs, None]
    y = ops.lowrank_linear(*args)
    y_ref = reference.lowrank_linear(*exact if with_bias else [*exact, None])
    assert y.shape == (*batch, m) and y.dtype == dtype
    scale = (n * r) ** 0.5  # the chain sums n·r products
    assert_close(y, y_ref, atol * scale, rtol)

    grad_y = torch.randn(*batch, m, dtype=torch.float64)
    got = grads_of(y, inputs, grad_y)
    want = grads_of(y_ref, exact, grad_y)
    for g, w, t in zip(got, want, inputs):
        assert g.shape == t.shape and g.dtype == dtype
        assert_close(g, w, atol * scale * 8, rtol * 4)


def _loss_inputs(shapes, dtype):
    exact = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in shapes]
    return exact, cast(exact, dtype)


ORTH_SHAPES = [(37, 13), (1, 1), (40, 5), (16, 16), (6, 6), (70, 3), (29, 13)]


@interp
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_orth_loss_matches_reference(dtype, atol, rtol):
    exact, mats = _loss_inputs(ORTH_SHAPES, dtype)
    loss = ops.orth_loss(mats)
    loss_ref = reference.orth_loss(exact)
    assert loss.shape == () and loss.dtype == reference.loss_dtype(dtype)
    # The loss is a sum of squares of Gram entries of size ~k: relative error dominates.
    assert_close(loss, loss_ref, atol, rtol * 10)
    got = grads_of(loss, mats, torch.tensor(0.7))
    want = grads_of(loss_ref, exact, torch.tensor(0.7))
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert_close(g, w, atol * 100, rtol * 10)


@interp
def test_orth_loss_is_zero_for_orthonormal_columns():
    Q = torch.linalg.qr(torch.randn(30, 7, dtype=torch.float64)).Q
    loss = ops.orth_loss([Q, Q[:, :3]])
    assert loss.item() == pytest.approx(0.0, abs=1e-24)


@interp
@pytest.mark.parametrize("kind", reference.SPARSITY_KINDS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_sparsity_loss_matches_reference(kind, dtype, atol, rtol):
    exact, svals = _loss_inputs([(13,), (1,), (5,), (64,), (7,), (300,)], dtype)
    loss = ops.sparsity_loss(svals, kind)
    loss_ref = reference.sparsity_loss(exact, kind)
    assert loss.shape == () and loss.dtype == reference.loss_dtype(dtype)
    assert_close(loss, loss_ref, atol * 10, rtol)
    got = grads_of(loss, svals, torch.tensor(1.3))
    want = grads_of(loss_ref, exact, torch.tensor(1.3))
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert_close(g, w, atol * 10, rtol * 2)


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


@interp
def test_ops_accept_non_contiguous_inputs():
    U = torch.randn(6, 24).T  # (24, 6), column-major
    s = torch.rand(12)[::2]  # stride 2
    V = torch.randn(36, 6)[::2]  # (18, 6), every other row
    x = torch.randn(18, 5).T  # (5, 18), transposed view
    assert not (U.is_contiguous() or s.is_contiguous() or V.is_contiguous() or x.is_contiguous())
    torch.testing.assert_close(ops.compose(U, s, V), reference.compose(U, s, V))
    torch.testing.assert_close(ops.lowrank_linear(x, U, s, V), reference.lowrank_linear(x, U, s, V))
    torch.testing.assert_close(ops.orth_loss([U, V]), reference.orth_loss([U, V]))
    torch.testing.assert_close(ops.sparsity_loss([s]), reference.sparsity_loss([s]))


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


@pytest.mark.skipif(TRITON_CPU, reason="gradcheck runs the fp64 C++ path; see test_kernels")
@pytest.mark.parametrize("fn, inputs", _op_cases())
def test_gradcheck_fp64(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs, atol=1e-8, rtol=1e-6)


def _opcheck_cases():
    U, s, V = factors(7, 5, 3, dtype=torch.float32)
    U2, s2, V2 = factors(4, 9, 2, dtype=torch.float32)
    x = torch.randn(2, 3, 5, requires_grad=True)
    b = torch.randn(7, requires_grad=True)
    g = torch.tensor(1.5)
    no_grad = [t.detach() for t in (U, s, V, U2, s2, V2, x)]
    return [
        pytest.param("compose", (U, s, V), id="compose"),
        pytest.param("compose_backward", (torch.randn(7, 5), *no_grad[:3]), id="compose_backward"),
        pytest.param("compose_grouped", ([U, U2], [s, s2], [V, V2]), id="compose_grouped"),
        pytest.param(
            "compose_grouped_backward",
            (
                [torch.randn(7, 5), torch.randn(4, 9)],
                no_grad[0::3][:2],
                no_grad[1::3][:2],
                no_grad[2::3][:2],
            ),
            id="compose_grouped_backward",
        ),
        pytest.param("lowrank_linear", (x, U, s, V, b), id="lowrank_linear"),
        pytest.param("lowrank_linear", (x, U, s, V, None), id="lowrank_linear_nobias"),
        pytest.param(
            "lowrank_linear_forward",
            (no_grad[6], *no_grad[:3], b.detach()),
            id="lowrank_linear_forward",
        ),
        pytest.param(
            "lowrank_linear_backward",
            (torch.randn(2, 3, 7), no_grad[6], *no_grad[:3], torch.randn(6, 3), True),
            id="lowrank_linear_backward",
        ),
        pytest.param(
            "lowrank_linear_backward",
            (torch.randn(2, 3, 7), no_grad[6], *no_grad[:3], torch.empty(0), False),
            id="lowrank_linear_backward_recompute_nobias",
        ),
        pytest.param("orth_loss", ([U, V, U2],), id="orth_loss"),
        pytest.param("orth_loss_forward", ([no_grad[0], no_grad[2]],), id="orth_loss_forward"),
        pytest.param(
            "orth_loss_backward",
            (g, [no_grad[0], no_grad[2]], [torch.randn(3, 3), torch.randn(3, 3)]),
            id="orth_loss_backward",
        ),
        pytest.param("sparsity_loss", ([s, s2], "hoyer"), id="sparsity_loss"),
        pytest.param(
            "sparsity_loss_backward",
            (g, [no_grad[1], no_grad[4]], "hoyer_square"),
            id="sparsity_loss_backward",
        ),
    ]


@pytest.mark.skipif(
    TRITON_CPU, reason="opcheck runs on the C++ path; the Triton path is covered on CUDA"
)
@pytest.mark.parametrize("name, args", _opcheck_cases())
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.svdkern, name).default, args)


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


@pytest.mark.skipif(
    TRITON_CPU, reason="compile runs on the C++ path; the Triton path is covered on CUDA"
)
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    fn, inputs = _compile_cases()
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
    (W.float().sum() + y.float().sum()).backward()
    assert U.grad.dtype == torch.float32  # gradients flow back through the autocast cast


# ---------------------------------------------------------------- hypothesis fuzzing


@interp
@settings(
    max_examples=15 if TRITON_CPU else 60, deadline=None, suppress_health_check=list(HealthCheck)
)
@given(m=st.integers(1, 48), n=st.integers(1, 48), r=st.integers(1, 24), rows=st.integers(0, 9))
def test_fuzz_compose_and_lowrank_linear_match_reference(m, n, r, rows):
    U, s, V = factors(m, n, r, dtype=torch.float32, requires_grad=False)
    torch.testing.assert_close(
        ops.compose(U, s, V), reference.compose(U, s, V), atol=1e-5, rtol=1e-4
    )
    x = torch.randn(rows, n)
    torch.testing.assert_close(
        ops.lowrank_linear(x, U, s, V), reference.lowrank_linear(x, U, s, V), atol=1e-5, rtol=1e-4
    )


@interp
@settings(
    max_examples=10 if TRITON_CPU else 40, deadline=None, suppress_health_check=list(HealthCheck)
)
@given(shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 20)), min_size=1, max_size=6))
def test_fuzz_losses_match_reference(shapes):
    mats = [torch.randn(k, r) for k, r in shapes]
    torch.testing.assert_close(ops.orth_loss(mats), reference.orth_loss(mats), rtol=1e-4, atol=1e-5)
    svals = [M[:, 0] for M in mats]
    for kind in reference.SPARSITY_KINDS:
        torch.testing.assert_close(
            ops.sparsity_loss(svals, kind),
            reference.sparsity_loss(svals, kind),
            rtol=1e-5,
            atol=1e-5,
        )


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
