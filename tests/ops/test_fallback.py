"""The fallback of an op whose Triton kernel fails on a device (svdkern.ops): one warning
naming the op, the device and the error, then the op's plain-PyTorch form on that device,
listed by `svdkern.backend()`; `SVDKERN_STRICT=1` raises instead.

The plain-PyTorch forms and the fallback logic are checked in every run; the `interp` tests
make the real kernels fail (Triton's launch raises, as it does for a config out of shared
memory) and run the ops through the dispatcher, autograd and torch.compile: on CPU under
TRITON_INTERPRET=1 with SVDKERN_BACKEND=triton, or on a GPU.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import svdkern
from svdkern import ops, reference

triton = pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402

SUITE_STRICT = os.environ.get("SVDKERN_STRICT")  # as conftest left it
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS_SERVE_DEVICE = DEVICE == "cuda" or svdkern.backend()["cpu"] == "triton"
SMEM_ERROR = OutOfResources(262144, 232448, "shared memory")


@pytest.fixture(autouse=True)
def _restore_fallbacks(monkeypatch):
    """Every test starts without fallbacks and leaves the state as it found it; the suite
    runs strict (conftest), these tests choose per test."""
    saved = dict(ops._FALLBACKS)
    ops._FALLBACKS.clear()
    monkeypatch.delenv("SVDKERN_STRICT", raising=False)
    yield
    ops._FALLBACKS.clear()
    ops._FALLBACKS.update(saved)


def _fallback_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "runs the plain-PyTorch reference" in str(w.message)]


def _split(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    sizes = [torch.Size(shape).numel() for shape in shapes]
    return [t.view(shape) for t, shape in zip(flat.split(sizes), shapes)]


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


# ------------------------------------------------------------------- the plain-PyTorch forms

DTYPES = [
    pytest.param(torch.float64, 1e-12, id="fp64"),
    pytest.param(torch.float32, 1e-5, id="fp32"),
]
FORMS = ops._REFERENCE_IMPLS


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize(
    "m, n, r",
    [
        pytest.param(37, 29, 13, id="M37-N29-R13"),
        pytest.param(1, 17, 1, id="M1-N17-R1"),
        pytest.param(0, 5, 3, id="M0-N5-R3"),
    ],
)
def test_fallback_compose_matches_reference_and_its_gradients(m, n, r, dtype, tol):
    U, s, V = (torch.randn(*shape, dtype=dtype) for shape in ((m, r), (r,), (n, r)))
    grad_W = torch.randn(m, n, dtype=dtype)
    leaves = _leaves(U, s, V)
    W = reference.compose(*leaves)
    want = torch.autograd.grad(W, leaves, grad_W)
    torch.testing.assert_close(FORMS["compose"](U, s, V), W.detach(), atol=tol, rtol=tol)
    for got, w in zip(FORMS["compose_backward"](grad_W, U, s, V), want):
        torch.testing.assert_close(got, w, atol=tol, rtol=tol)
    # the grouped forms: packed outputs, gradients [dU..., dV...] and [ds...]
    layers = [(U, s, V), tuple(torch.randn(*sh, dtype=dtype) for sh in ((4, 2), (2,), (9, 2)))]
    Us, ss, Vs = (list(t) for t in zip(*layers))
    shapes = [(A.shape[0], B.shape[0]) for A, B in zip(Us, Vs)]
    packed = FORMS["compose_grouped_packed"](Us, ss, Vs)
    for got, (A, c, B) in zip(_split(packed, shapes), layers):
        torch.testing.assert_close(got, reference.compose(A, c, B), atol=tol, rtol=tol)
    grads = [torch.randn(shape, dtype=dtype) for shape in shapes]
    dF, ds = FORMS["compose_grouped_backward"](
        torch.cat([g.reshape(-1) for g in grads]), Us, ss, Vs
    )
    dUV = _split(dF, [A.shape for A in Us] + [B.shape for B in Vs])
    dss = _split(ds, [c.shape for c in ss])
    for i, ((A, c, B), g) in enumerate(zip(layers, grads)):
        leaves = _leaves(A, c, B)
        want = torch.autograd.grad(reference.compose(*leaves), leaves, g)
        for got, w in zip((dUV[i], dss[i], dUV[len(layers) + i]), want):
            torch.testing.assert_close(got, w, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize(
    "batch, n, m, r, bias",
    [
        pytest.param((3, 5), 29, 37, 13, True, id="B3x5-N29-M37-R13-bias"),
        pytest.param((1,), 17, 9, 1, False, id="rows1-N17-M9-R1"),
        pytest.param((), 12, 10, 4, True, id="no-batch"),
        pytest.param((0,), 6, 4, 2, True, id="empty-batch"),
    ],
)
def test_fallback_lowrank_linear_matches_reference_and_its_gradients(
    batch, n, m, r, bias, dtype, tol
):
    x = torch.randn(*batch, n, dtype=dtype)
    U, s, V = (torch.randn(*shape, dtype=dtype) for shape in ((m, r), (r,), (n, r)))
    b = torch.randn(m, dtype=dtype) if bias else None
    grad_y = torch.randn(*batch, m, dtype=dtype)
    leaves = _leaves(x, U, s, V, *([b] if bias else []))
    y = reference.lowrank_linear(*leaves)
    want = torch.autograd.grad(y, leaves, grad_y)
    got_y, xv = FORMS["lowrank_linear_forward"](x, U, s, V, b)
    assert xv.shape == (0,)  # as the fake kernel says for the devices Triton serves
    torch.testing.assert_close(got_y, y.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(
        FORMS["lowrank_linear"](x, U, s, V, b), y.detach(), atol=tol, rtol=tol
    )
    got = FORMS["lowrank_linear_backward"](grad_y, x, U, s, V, xv, bias)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)
    assert got[4].shape == ((m,) if bias else (0,))


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_fallback_losses_match_reference_and_their_gradients(dtype, tol):
    mats = [torch.randn(k, r, dtype=dtype) / k**0.5 for k, r in ((37, 13), (1, 1), (5, 9))]
    grad = torch.tensor(0.7, dtype=dtype)
    leaves = _leaves(*mats)
    loss = reference.orth_loss(leaves)
    want = torch.autograd.grad(loss, leaves, grad)
    got_loss, residuals = FORMS["orth_loss_forward"](mats)
    torch.testing.assert_close(got_loss, loss.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(FORMS["orth_loss"](mats), loss.detach(), atol=tol, rtol=tol)
    got = _split(FORMS["orth_loss_backward"](grad, mats, residuals), [M.shape for M in mats])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)
    # zeros (Hoyer: 0 with zero gradient), one value, values near the smallest normal, mixed signs
    svals = [
        torch.randn(13, dtype=dtype),
        torch.zeros(5, dtype=dtype),
        torch.tensor([2.5], dtype=dtype),
        torch.tensor([3.0, -1.0, 2.0], dtype=dtype) * 16 * torch.finfo(dtype).tiny,
        torch.tensor([0.0, -2.0, 3.0], dtype=dtype),
    ]
    for kind in reference.SPARSITY_KINDS:
        leaves = _leaves(*svals)
        loss = reference.sparsity_loss(leaves, kind)
        want = torch.autograd.grad(loss, leaves, grad)
        torch.testing.assert_close(FORMS["sparsity_loss"](svals, kind), loss.detach())
        flat = FORMS["sparsity_loss_backward"](grad, svals, kind)
        for g, w in zip(_split(flat, [t.shape for t in svals]), want):
            torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=kind)


def test_every_op_has_a_plain_pytorch_form():
    assert set(FORMS) == set(ops.OP_NAMES)


# ------------------------------------------------------------------- the fallback logic


def _failing_launchers(monkeypatch, error: Exception) -> list[str]:
    """Every launcher raises `error`; returns the names of the launchers called."""
    calls: list[str] = []

    def launcher(name):
        def fail(*args):
            calls.append(name)
            raise error

        return fail

    monkeypatch.setattr(ops, "_triton_impls", lambda: {n: launcher(n) for n in ops.OP_NAMES})
    return calls


def test_a_failing_kernel_warns_once_and_the_op_runs_the_reference(monkeypatch):
    calls = _failing_launchers(monkeypatch, SMEM_ERROR)
    compose = ops._triton_impl("compose")
    U, s, V = torch.randn(7, 3), torch.randn(3), torch.randn(5, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = compose(U, s, V)
        second = compose(U, s, V)
    (message,) = _fallback_warnings(caught)
    assert "svdkern::compose failed on cpu" in message
    assert "OutOfResources: out of resource: shared memory" in message
    assert calls == ["compose"]  # the kernel is not tried again on that device
    torch.testing.assert_close(first, reference.compose(U, s, V))
    torch.testing.assert_close(second, first)
    fallbacks = svdkern.backend()["fallbacks"]
    assert list(fallbacks) == ["cpu"] and list(fallbacks["cpu"]) == ["compose"]
    assert fallbacks["cpu"]["compose"].startswith("OutOfResources: out of resource")


def test_an_error_raised_inside_triton_counts_as_a_kernel_failure(monkeypatch):
    from triton.runtime import jit

    def inside_triton(*args):  # e.g. an MLIR pass or the driver: a RuntimeError from triton's code
        code = compile("raise RuntimeError('PassManager::run failed')", jit.__file__, "exec")
        exec(code)

    monkeypatch.setattr(ops, "_triton_impls", lambda: {"compose": inside_triton})
    with pytest.warns(RuntimeWarning, match=r"svdkern::compose failed on cpu \(RuntimeError: Pass"):
        ops._triton_impl("compose")(torch.randn(2, 1), torch.randn(1), torch.randn(3, 1))
    assert "compose" in svdkern.backend()["fallbacks"]["cpu"]


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(ValueError("compose: s must have shape (3,)"), id="input-check"),
        pytest.param(torch.OutOfMemoryError("CUDA out of memory"), id="out-of-memory"),
    ],
)
def test_input_errors_and_out_of_memory_are_not_kernel_failures(monkeypatch, error):
    _failing_launchers(monkeypatch, error)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(type(error)):
            ops._triton_impl("compose")(torch.randn(7, 3), torch.randn(3), torch.randn(5, 3))
    assert not _fallback_warnings(caught)
    assert "fallbacks" not in svdkern.backend()


def test_strict_mode_raises_the_kernel_failure(monkeypatch):
    _failing_launchers(monkeypatch, SMEM_ERROR)
    monkeypatch.setenv("SVDKERN_STRICT", "1")
    with pytest.raises(OutOfResources, match="shared memory"):
        ops._triton_impl("orth_loss")([torch.randn(4, 2)])
    assert "fallbacks" not in svdkern.backend()


def test_the_suite_runs_strict():
    """conftest sets SVDKERN_STRICT=1 for the whole suite (this module's fixture unsets it
    per test): a kernel that fails in a test raises instead of falling back."""
    assert SUITE_STRICT == "1"


# ------------------------------------------------------------------- real kernels made to fail

needs_kernels = pytest.mark.skipif(
    not KERNELS_SERVE_DEVICE,
    reason="needs the Triton kernels serving the device: a GPU, or TRITON_INTERPRET=1 with "
    "SVDKERN_BACKEND=triton",
)


@pytest.fixture
def failing_kernels(monkeypatch):
    """Every Triton kernel launch raises what Triton raises for a config out of shared memory
    (every kernel is a JITFunction, or an InterpretedFunction under TRITON_INTERPRET=1)."""
    from svdkern.kernels import sparsity

    def launch(self, *args, **kwargs):
        raise SMEM_ERROR

    monkeypatch.setattr(type(sparsity._sparsity_fwd_kernel), "run", launch)


def _all_ops_step(U, s, V, U2, s2, V2, x, b):
    W, W2 = ops.compose_grouped([U, U2], [s, s2], [V, V2])
    y = torch.tanh(x @ W.T) + ops.lowrank_linear(x, U, s, V, b)
    reg = ops.orth_loss([U, V, U2, V2]) + 0.1 * ops.sparsity_loss([s, s2], "hoyer")
    return (y**2).mean() + W2.sum() + ops.compose(U, s, V).sum() + reg


def _all_ops_inputs():
    shapes = [(7, 3), (3,), (5, 3), (4, 2), (2,), (9, 2), (6, 5), (7,)]
    return [torch.randn(*shape, device=DEVICE) for shape in shapes]


@pytest.mark.interp
@needs_kernels
def test_failing_kernels_fall_back_once_per_op_with_reference_results(failing_kernels):
    inputs = _all_ops_inputs()
    with ops.reference_mode():
        leaves = _leaves(*inputs)
        want = _all_ops_step(*leaves)
        want_grads = torch.autograd.grad(want, leaves)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            leaves = _leaves(*inputs)
            got = _all_ops_step(*leaves)
            grads = torch.autograd.grad(got, leaves)
            torch.testing.assert_close(got, want)
            for g, w in zip(grads, want_grads):
                torch.testing.assert_close(g, w)
    messages = _fallback_warnings(caught)
    device = str(inputs[0].device)
    fell_back = {
        "compose",
        "compose_backward",
        "compose_grouped_packed",
        "compose_grouped_backward",
        "lowrank_linear_forward",
        "lowrank_linear_backward",
        "orth_loss_forward",
        "orth_loss_backward",
        "sparsity_loss",
        "sparsity_loss_backward",
    }
    assert len(messages) == len(fell_back)  # once per op, though every op ran twice
    assert set(svdkern.backend()["fallbacks"][device]) == fell_back
    for name in fell_back:
        assert any(f"svdkern::{name} failed on {device} (OutOfResources" in m for m in messages)


@pytest.mark.interp
@needs_kernels
def test_failing_kernels_fall_back_under_torch_compile(failing_kernels):
    torch._dynamo.reset()
    inputs = _all_ops_inputs()
    with ops.reference_mode():
        leaves = _leaves(*inputs)
        want = _all_ops_step(*leaves)
        want_grads = torch.autograd.grad(want, leaves)
    leaves = _leaves(*inputs)
    with pytest.warns(RuntimeWarning, match="runs the plain-PyTorch reference"):
        got = torch.compile(_all_ops_step, fullgraph=True, backend="aot_eager")(*leaves)
        grads = torch.autograd.grad(got, leaves)
    torch.testing.assert_close(got, want)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
    assert "compose_grouped_backward" in svdkern.backend()["fallbacks"][str(inputs[0].device)]


@pytest.mark.interp
@needs_kernels
def test_failing_kernel_raises_in_strict_mode(failing_kernels, monkeypatch):
    monkeypatch.setenv("SVDKERN_STRICT", "1")
    U, s, V = _leaves(*_all_ops_inputs()[:3])
    with pytest.raises(OutOfResources, match="shared memory"):
        ops.compose(U, s, V)
    assert "fallbacks" not in svdkern.backend()
