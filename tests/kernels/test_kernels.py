"""The Triton kernels (svdkern.kernels.IMPLS) against svdkern.reference, forward and backward.

`interp` tests run small, odd shapes: on CPU under TRITON_INTERPRET=1, or on a
GPU. `cuda` tests run real sizes, all dtypes, non-contiguous inputs, a side
stream and CUDA-graph capture; they skip without a GPU.

The reference runs in fp32 (fp64 for fp64) on the same input values; gradients
come from torch.autograd.grad of the reference with the same upstream gradient.
"""

from __future__ import annotations

import os

import pytest
import torch

from svdkern import reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
if not (INTERPRET or HAS_CUDA):
    pytest.skip("the Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

from svdkern.kernels import IMPLS  # noqa: E402  (after the skip: importing needs triton)

EMPTY = torch.empty(0)  # the xv of lowrank_linear_backward: the kernels recompute x·V on chip

DEVICE = "cuda" if HAS_CUDA else "cpu"

# dtype and tolerance (atol, rtol) travel together; fp64 only through the interpreter.
DTYPES = [
    pytest.param(torch.float32, 1e-4, 1e-4, id="fp32"),
    pytest.param(torch.bfloat16, 6e-2, 3e-2, id="bf16"),
    pytest.param(
        torch.float64,
        1e-10,
        1e-10,
        id="fp64",
        marks=pytest.mark.skipif(not INTERPRET, reason="fp64 kernels are checked in interpreter"),
    ),
]


def _ref_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _randn(*shape: int, dtype: torch.dtype, device: str = DEVICE) -> torch.Tensor:
    return torch.randn(*shape, device=device).to(dtype)


def _leaves(tensors, dtype: torch.dtype) -> list[torch.Tensor]:
    """Copies in the reference dtype that require grad (same values as the kernel inputs)."""
    return [t.detach().to(_ref_dtype(dtype)).requires_grad_() for t in tensors]


def _split(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    """The tensors of `shapes` packed row-major, back to back, in the 1-D `flat`."""
    sizes = [int(torch.Size(shape).numel()) for shape in shapes]
    assert flat.dim() == 1 and flat.numel() == sum(sizes)
    return [t.view(shape) for t, shape in zip(flat.split(sizes), shapes)]


def _grouped_backward(grads, Us, ss, Vs):
    """(dUs, dss, dVs) of the grouped backward launcher, from and to per-layer tensors."""
    packed = torch.cat([g.reshape(-1) for g in grads])
    dF, ds = IMPLS["compose_grouped_backward"](packed, Us, ss, Vs)
    dUV = _split(dF, [U.shape for U in Us] + [V.shape for V in Vs])
    return dUV[: len(Us)], _split(ds, [s.shape for s in ss]), dUV[len(Us) :]


def _close(actual, expected, atol: float, rtol: float, scale: bool = True) -> None:
    """assert_close with the tolerance scaled by the expected tensor's magnitude (for sums)."""
    actual = actual.to(expected.dtype)
    expected = expected.detach()
    mag = expected.abs().max().item() if scale and expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=atol * max(1.0, mag), rtol=rtol)


# ---------------------------------------------------------------------------------------------
# compose

COMPOSE_SHAPES = [
    pytest.param(37, 29, 13, id="M37-N29-R13"),
    pytest.param(1, 17, 1, id="M1-N17-R1"),
    pytest.param(16, 70, 5, id="M16-N70-R5"),
    pytest.param(70, 20, 20, id="M70-N20-R20"),
    pytest.param(9, 7, 40, id="M9-N7-R40"),
]


@pytest.mark.interp
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("m, n, r", COMPOSE_SHAPES)
def test_compose_matches_reference(m, n, r, dtype, atol, rtol):
    U, s, V = _randn(m, r, dtype=dtype), _randn(r, dtype=dtype), _randn(n, r, dtype=dtype)
    W = IMPLS["compose"](U, s, V)
    assert W.dtype == dtype and W.shape == (m, n)
    _close(W, reference.compose(*_leaves((U, s, V), dtype)), atol, rtol)


@pytest.mark.interp
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("m, n, r", COMPOSE_SHAPES)
def test_compose_backward_matches_reference(m, n, r, dtype, atol, rtol):
    U, s, V = _randn(m, r, dtype=dtype), _randn(r, dtype=dtype), _randn(n, r, dtype=dtype)
    grad_W = _randn(m, n, dtype=dtype)
    got = IMPLS["compose_backward"](grad_W, U, s, V)
    leaves = _leaves((U, s, V), dtype)
    expected = torch.autograd.grad(reference.compose(*leaves), leaves, grad_W.to(leaves[0].dtype))
    for name, a, e in zip(("dU", "ds", "dV"), got, expected):
        assert a.dtype == dtype and a.shape == e.shape, name
        _close(a, e, atol, rtol)


@pytest.mark.interp
def test_compose_non_contiguous_inputs():
    U = torch.randn(13, 37, device=DEVICE).T  # (37, 13), column-major
    s = torch.randn(26, device=DEVICE)[::2]
    V = torch.randn(29, 26, device=DEVICE)[:, ::2]
    grad_W = torch.randn(29, 37, device=DEVICE).T
    _close(IMPLS["compose"](U, s, V), reference.compose(U, s, V), 1e-4, 1e-4)
    leaves = _leaves((U, s, V), torch.float32)
    expected = torch.autograd.grad(reference.compose(*leaves), leaves, grad_W)
    for a, e in zip(IMPLS["compose_backward"](grad_W, U, s, V), expected):
        _close(a, e, 1e-4, 1e-4)


@pytest.mark.cuda
def test_compose_backward_is_deterministic():
    U, s, V = torch.randn(70, 20, device=DEVICE), torch.randn(20, device=DEVICE), None
    V = torch.randn(33, 20, device=DEVICE)
    grad_W = torch.randn(70, 33, device=DEVICE)
    first = IMPLS["compose_backward"](grad_W, U, s, V)
    second = IMPLS["compose_backward"](grad_W, U, s, V)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.interp
def test_compose_rejects_bad_shapes():
    U, s, V = torch.randn(5, 3), torch.randn(4), torch.randn(6, 3)
    with pytest.raises(ValueError, match="s must have shape"):
        IMPLS["compose"](U, s, V)
    with pytest.raises(ValueError, match="grad_W must have shape"):
        IMPLS["compose_backward"](torch.randn(6, 5), U, torch.randn(3), V)


# ---------------------------------------------------------------------------------------------
# compose_grouped

GROUPED_SHAPES = [(37, 29, 13), (1, 17, 1), (16, 70, 5), (70, 20, 20), (9, 7, 40), (32, 32, 32)]


def _grouped_inputs(dtype: torch.dtype, shapes=GROUPED_SHAPES, device: str = DEVICE):
    Us = [_randn(m, r, dtype=dtype, device=device) for m, _, r in shapes]
    ss = [_randn(r, dtype=dtype, device=device) for _, _, r in shapes]
    Vs = [_randn(n, r, dtype=dtype, device=device) for _, n, r in shapes]
    return Us, ss, Vs


@pytest.mark.interp
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_compose_grouped_matches_reference(dtype, atol, rtol):
    Us, ss, Vs = _grouped_inputs(dtype)
    Ws = _split(
        IMPLS["compose_grouped_packed"](Us, ss, Vs),
        [(U.shape[0], V.shape[0]) for U, V in zip(Us, Vs)],
    )
    G = len(Us)
    leaves = _leaves(Us + ss + Vs, dtype)
    expected = reference.compose_grouped(leaves[:G], leaves[G : 2 * G], leaves[2 * G :])
    assert len(Ws) == G
    for W, e in zip(Ws, expected):
        assert W.dtype == dtype
        _close(W, e, atol, rtol)


@pytest.mark.interp
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_compose_grouped_backward_matches_reference(dtype, atol, rtol):
    Us, ss, Vs = _grouped_inputs(dtype)
    grads = [_randn(U.shape[0], V.shape[0], dtype=dtype) for U, V in zip(Us, Vs)]
    dUs, dss, dVs = _grouped_backward(grads, Us, ss, Vs)
    G = len(Us)
    leaves = _leaves(Us + ss + Vs, dtype)
    outs = reference.compose_grouped(leaves[:G], leaves[G : 2 * G], leaves[2 * G :])
    expected = torch.autograd.grad(outs, leaves, [g.to(leaves[0].dtype) for g in grads])
    for a, e in zip([*dUs, *dss, *dVs], expected):
        assert a.dtype == dtype and a.shape == e.shape
        _close(a, e, atol, rtol)


# ---------------------------------------------------------------------------------------------
# lowrank_linear

LOWRANK_CASES = [
    pytest.param((3, 5), 29, 37, 13, True, id="B3x5-N29-M37-R13-bias"),
    pytest.param((1,), 17, 9, 1, False, id="rows1-N17-M9-R1"),
    pytest.param((40,), 20, 70, 16, True, id="rows40-N20-M70-R16-bias"),
    pytest.param((0,), 12, 10, 4, True, id="empty-batch"),
    pytest.param((2, 0), 12, 10, 4, False, id="empty-2d-batch"),
    pytest.param((), 12, 10, 4, True, id="no-batch"),
    pytest.param((6,), 24, 20, 300, True, id="rows6-N24-M20-R300-unfused"),
]


@pytest.mark.interp
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("batch, n, m, r, has_bias", LOWRANK_CASES)
def test_lowrank_linear_matches_reference(batch, n, m, r, has_bias, dtype, atol, rtol):
    x = _randn(*batch, n, dtype=dtype)
    U, s, V = _randn(m, r, dtype=dtype), _randn(r, dtype=dtype), _randn(n, r, dtype=dtype)
    bias = _randn(m, dtype=dtype) if has_bias else None
    y = IMPLS["lowrank_linear"](x, U, s, V, bias)
    assert y.dtype == dtype and y.shape == (*batch, m)
    leaves = _leaves((x, U, s, V) + ((bias,) if has_bias else ()), dtype)
    _close(y, reference.lowrank_linear(*leaves), atol, rtol)


@pytest.mark.interp
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("batch, n, m, r, has_bias", LOWRANK_CASES)
def test_lowrank_linear_backward_matches_reference(batch, n, m, r, has_bias, dtype, atol, rtol):
    x = _randn(*batch, n, dtype=dtype)
    U, s, V = _randn(m, r, dtype=dtype), _randn(r, dtype=dtype), _randn(n, r, dtype=dtype)
    bias = _randn(m, dtype=dtype)
    grad_y = _randn(*batch, m, dtype=dtype)
    dx, dU, ds, dV, dbias = IMPLS["lowrank_linear_backward"](grad_y, x, U, s, V, EMPTY, has_bias)
    leaves = _leaves((x, U, s, V, bias), dtype)
    y = reference.lowrank_linear(*leaves)
    expected = torch.autograd.grad(y, leaves, grad_y.to(y.dtype), allow_unused=True)
    for name, a, e in zip(("dx", "dU", "ds", "dV"), (dx, dU, ds, dV), expected):
        assert a.dtype == dtype and a.shape == e.shape, name
        _close(a, e, atol, rtol)
    if has_bias:
        _close(dbias, expected[4], atol, rtol)
    else:
        assert dbias.shape == (0,) and dbias.dtype == dtype


@pytest.mark.interp
def test_lowrank_linear_non_contiguous_inputs():
    x = torch.randn(29, 11, device=DEVICE).T  # (11, 29)
    U = torch.randn(13, 37, device=DEVICE).T
    s = torch.randn(26, device=DEVICE)[::2]
    V = torch.randn(29, 26, device=DEVICE)[:, ::2]
    bias = torch.randn(74, device=DEVICE)[::2]
    grad_y = torch.randn(37, 11, device=DEVICE).T
    _close(
        IMPLS["lowrank_linear"](x, U, s, V, bias),
        reference.lowrank_linear(x, U, s, V, bias),
        1e-4,
        1e-4,
    )
    leaves = _leaves((x, U, s, V, bias), torch.float32)
    expected = torch.autograd.grad(reference.lowrank_linear(*leaves), leaves, grad_y)
    for a, e in zip(IMPLS["lowrank_linear_backward"](grad_y, x, U, s, V, EMPTY, True), expected):
        _close(a, e, 1e-4, 1e-4)


# ---------------------------------------------------------------------------------------------
# orth_loss

ORTH_SHAPES = [(37, 13), (1, 1), (5, 9), (70, 40), (64, 64), (3, 1)]


@pytest.mark.interp
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_orth_loss_matches_reference(dtype, atol, rtol):
    mats = [_randn(k, r, dtype=dtype) / k**0.5 for k, r in ORTH_SHAPES]
    loss = IMPLS["orth_loss"](mats)
    expected = reference.orth_loss(mats)  # casts to the loss dtype itself
    assert loss.dtype == reference.loss_dtype(dtype) and loss.shape == ()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    loss2, packed = IMPLS["orth_loss_forward"](mats)
    torch.testing.assert_close(loss2, expected, atol=1e-5, rtol=1e-5)
    for M, R in zip(mats, _split(packed, [(M.shape[1], M.shape[1]) for M in mats])):
        A = M.to(reference.loss_dtype(dtype))
        eye = torch.eye(A.shape[1], dtype=A.dtype, device=A.device)
        assert R.dtype == A.dtype
        torch.testing.assert_close(R, A.T @ A - eye, atol=1e-5, rtol=1e-5)


@pytest.mark.interp
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_orth_loss_backward_matches_reference(dtype, atol, rtol):
    mats = [_randn(k, r, dtype=dtype) / k**0.5 for k, r in ORTH_SHAPES]
    grad = torch.tensor(0.7, dtype=reference.loss_dtype(dtype), device=DEVICE)
    _, residuals = IMPLS["orth_loss_forward"](mats)
    got = _split(IMPLS["orth_loss_backward"](grad, mats, residuals), [M.shape for M in mats])
    leaves = [M.detach().clone().requires_grad_() for M in mats]
    expected = torch.autograd.grad(reference.orth_loss(leaves), leaves, grad)
    for a, e in zip(got, expected):
        assert a.dtype == dtype and a.shape == e.shape
        _close(a, e, atol, rtol)


# ---------------------------------------------------------------------------------------------
# sparsity_loss

SPARSITY_KINDS = [pytest.param(k, id=k) for k in reference.SPARSITY_KINDS]


def _svals(dtype: torch.dtype) -> list[torch.Tensor]:
    return [
        _randn(13, dtype=dtype),
        torch.zeros(5, dtype=dtype, device=DEVICE),
        _randn(1, dtype=dtype),
        _randn(2500, dtype=dtype),
        torch.tensor([0.0, -2.0, 3.0], dtype=dtype, device=DEVICE),
    ]


@pytest.mark.interp
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("kind", SPARSITY_KINDS)
def test_sparsity_loss_matches_reference(kind, dtype, atol, rtol):
    svals = _svals(dtype)
    loss = IMPLS["sparsity_loss"](svals, kind)
    assert loss.dtype == reference.loss_dtype(dtype) and loss.shape == ()
    torch.testing.assert_close(loss, reference.sparsity_loss(svals, kind), atol=1e-5, rtol=1e-5)


@pytest.mark.interp
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("kind", SPARSITY_KINDS)
def test_sparsity_loss_backward_matches_reference(kind, dtype, atol, rtol):
    svals = _svals(dtype)
    grad = torch.tensor(1.3, dtype=reference.loss_dtype(dtype), device=DEVICE)
    got = _split(IMPLS["sparsity_loss_backward"](grad, svals, kind), [s.shape for s in svals])
    leaves = [s.detach().clone().requires_grad_() for s in svals]
    expected = torch.autograd.grad(reference.sparsity_loss(leaves, kind), leaves, grad)
    for a, e in zip(got, expected):
        assert a.dtype == dtype and a.shape == e.shape
        _close(a, e, atol, rtol)
    assert torch.equal(got[1], torch.zeros_like(got[1]))  # the all-zero vector


# ---------------------------------------------------------------------------------------------
# CUDA: real sizes, dtypes, layouts, streams, graphs

CUDA_DTYPES = [
    pytest.param(torch.float32, 2e-4, 1e-3, id="fp32"),
    pytest.param(torch.float16, 5e-3, 1e-2, id="fp16"),
    pytest.param(torch.bfloat16, 3e-2, 3e-2, id="bf16"),
]
BIG_COMPOSE = [
    pytest.param(1024, 1024, 1024, id="M1024-N1024-R1024"),
    pytest.param(4096, 2048, 256, id="M4096-N2048-R256"),
    pytest.param(512, 4608, 512, id="M512-N4608-R512"),
    pytest.param(4096, 4096, 4096, id="M4096-N4096-R4096"),
]


def _unit(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """Entries of size 1/sqrt(last dim): sums stay O(1) at every size."""
    return (torch.randn(*shape, device="cuda") / shape[-1] ** 0.5).to(dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, atol, rtol", CUDA_DTYPES)
@pytest.mark.parametrize("m, n, r", BIG_COMPOSE)
def test_compose_cuda_large(m, n, r, dtype, atol, rtol):
    U, s, V = (
        _unit(m, r, dtype=dtype),
        torch.rand(r, device="cuda").to(dtype),
        _unit(n, r, dtype=dtype),
    )
    _close(IMPLS["compose"](U, s, V), reference.compose(*_leaves((U, s, V), dtype)), atol, rtol)
    grad_W = _unit(m, n, dtype=dtype)
    leaves = _leaves((U, s, V), dtype)
    expected = torch.autograd.grad(reference.compose(*leaves), leaves, grad_W.float())
    for a, e in zip(IMPLS["compose_backward"](grad_W, U, s, V), expected):
        _close(a, e, atol, rtol)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, atol, rtol", CUDA_DTYPES)
@pytest.mark.parametrize(
    "rows, n, m, r",
    [
        pytest.param(4096, 2048, 1024, 128, id="rows4096-N2048-M1024-R128"),
        pytest.param(1, 4096, 4096, 256, id="rows1-N4096-M4096-R256"),
        pytest.param(2048, 1024, 1024, 512, id="rows2048-N1024-M1024-R512-unfused"),
    ],
)
def test_lowrank_linear_cuda_large(rows, n, m, r, dtype, atol, rtol):
    x, U, V = _unit(rows, n, dtype=dtype), _unit(m, r, dtype=dtype), _unit(n, r, dtype=dtype)
    s, bias = torch.rand(r, device="cuda").to(dtype), _unit(m, dtype=dtype)
    leaves = _leaves((x, U, s, V, bias), dtype)
    y = reference.lowrank_linear(*leaves)
    _close(IMPLS["lowrank_linear"](x, U, s, V, bias), y, atol, rtol)
    grad_y = _unit(rows, m, dtype=dtype)
    expected = torch.autograd.grad(y, leaves, grad_y.float())
    for a, e in zip(IMPLS["lowrank_linear_backward"](grad_y, x, U, s, V, EMPTY, True), expected):
        _close(a, e, atol, rtol)


def _resnet50_mats(dtype: torch.dtype) -> list[torch.Tensor]:
    """U and V of every ResNet-50 bottleneck conv, channel decomposition at full rank."""
    mats = []
    c_in = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            convs = [(width, c_in), (width, width * 9), (4 * width, width)]
            if b == 0:
                convs.append((4 * width, c_in))
            for m, n in convs:
                r = min(m, n)
                mats += [_unit(m, r, dtype=dtype), _unit(n, r, dtype=dtype)]
            c_in = 4 * width
    return mats


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, atol, rtol", CUDA_DTYPES)
def test_orth_and_sparsity_cuda_resnet50(dtype, atol, rtol):
    mats = _resnet50_mats(dtype)
    loss, residuals = IMPLS["orth_loss_forward"](mats)
    torch.testing.assert_close(loss, reference.orth_loss(mats), atol=0, rtol=1e-4)
    grad = torch.tensor(0.5, device="cuda")
    leaves = [M.detach().clone().requires_grad_() for M in mats]
    expected = torch.autograd.grad(reference.orth_loss(leaves), leaves, grad)
    got = _split(IMPLS["orth_loss_backward"](grad, mats, residuals), [M.shape for M in mats])
    for a, e in zip(got, expected):
        _close(a, e, atol, rtol)
    svals = [torch.randn(M.shape[1], device="cuda").to(dtype) for M in mats[::2]]
    for kind in reference.SPARSITY_KINDS:
        expected = reference.sparsity_loss(svals, kind)
        torch.testing.assert_close(IMPLS["sparsity_loss"](svals, kind), expected, rtol=1e-5, atol=0)


@pytest.mark.cuda
def test_grouped_cuda_many_layers():
    shapes = [(16 * (1 + i % 4), 144 * (1 + i % 3), 16 * (1 + i % 4)) for i in range(40)]
    Us, ss, Vs = _grouped_inputs(torch.bfloat16, shapes, "cuda")
    shapes_W = [(U.shape[0], V.shape[0]) for U, V in zip(Us, Vs)]
    Ws = _split(IMPLS["compose_grouped_packed"](Us, ss, Vs), shapes_W)
    for W, U, s, V in zip(Ws, Us, ss, Vs):
        _close(W, reference.compose(U.float(), s.float(), V.float()), 3e-2, 3e-2)
    grads = [torch.randn_like(W) for W in Ws]
    dUs, dss, dVs = _grouped_backward(grads, Us, ss, Vs)
    for i in (0, 17, 39):  # against the reference, not the single-layer kernel
        leaves = _leaves((Us[i], ss[i], Vs[i]), torch.bfloat16)
        expected = torch.autograd.grad(reference.compose(*leaves), leaves, grads[i].float())
        for a, e in zip((dUs[i], dss[i], dVs[i]), expected):
            _close(a.float(), e, 3e-2, 3e-2)


@pytest.mark.cuda
def test_tf32_flag_is_respected():
    U, s, V = _unit(512, 512, dtype=torch.float32), torch.rand(512, device="cuda"), None
    V = _unit(512, 512, dtype=torch.float32)
    exact = reference.compose(U.double(), s.double(), V.double())
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        ieee_err = (IMPLS["compose"](U, s, V).double() - exact).abs().max().item()
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32_err = (IMPLS["compose"](U, s, V).double() - exact).abs().max().item()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert ieee_err < 1e-5 < tf32_err


@pytest.mark.cuda
def test_cuda_non_contiguous_and_side_stream():
    U = torch.randn(300, 1024, device="cuda").T  # (1024, 300)
    s = torch.randn(600, device="cuda")[::2]
    V = torch.randn(2048, 600, device="cuda")[:, ::2]
    grad_W = torch.randn(2048, 1024, device="cuda").T
    expected = IMPLS["compose_backward"](grad_W, U.contiguous(), s.contiguous(), V.contiguous())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = IMPLS["compose_backward"](grad_W, U, s, V)
        W = IMPLS["compose"](U, s, V)
    torch.cuda.current_stream().wait_stream(side)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)
    torch.testing.assert_close(W, reference.compose(U, s, V), atol=1e-3, rtol=1e-3)


@pytest.mark.cuda
def test_cuda_graph_capture_compose_and_grouped():
    U, s, V = _unit(1024, 256, dtype=torch.bfloat16), torch.rand(256, device="cuda"), None
    s, V = s.to(torch.bfloat16), _unit(768, 256, dtype=torch.bfloat16)
    grad_W = _unit(1024, 768, dtype=torch.bfloat16)
    Us, ss, Vs = _grouped_inputs(torch.bfloat16, GROUPED_SHAPES, "cuda")

    def step():
        W = IMPLS["compose"](U, s, V)
        grads = IMPLS["compose_backward"](grad_W, U, s, V)
        Ws = IMPLS["compose_grouped_packed"](Us, ss, Vs)
        gWs = IMPLS["compose_grouped_backward"](Ws, Us, ss, Vs)
        return W, grads, [Ws], gWs

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # autotune and build the cached problem tables outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for t in (U, s, V, grad_W, *Us, *ss, *Vs):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    flat_static = [static[0], *static[1], *static[2], *static[3]]  # grouped: packed buffers
    flat_eager = [eager[0], *eager[1], *eager[2], *eager[3]]
    for a, e in zip(flat_static, flat_eager):
        torch.testing.assert_close(a, e)


@pytest.mark.interp
def test_autotune_prune_falls_back_to_the_smallest_tile():
    import triton

    from svdkern.kernels._common import prune

    cfgs = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_stages=4),
    ]
    seen = []

    def keep(cfg, args):
        seen.append(cfg["num_stages"])
        return cfg["BLOCK_M"] <= args["M"]

    early = prune(keep)["early_config_prune"]
    assert early(cfgs, {"M": 8}) == [cfgs[1]]  # none fits: the smallest, not the first
    assert early(cfgs, {"M": 64}) == [cfgs[1], cfgs[2]]
    assert seen[:3] == [3, 3, 4]  # keep() sees each config's num_stages
