"""The five ops as users call them (svdkern.ops → C++ autograd → Triton kernels) on CUDA,
against svdkern.reference: the output and every input's gradient, for the same upstream
gradient, in fp32, bf16 and fp16 at odd sizes, rank 1 and shapes of several tiles.

`make gpu-check` runs these first (at fixed kernel configs, SVDKERN_AUTOTUNE=0); the
kernels' own tests are in test_kernels.py, opcheck and torch.compile on CUDA in
test_ops.py. The reference runs in fp32 on the same (rounded) input values.
"""

from __future__ import annotations

import pytest
import torch

from svdkern import ops, reference

pytestmark = pytest.mark.cuda

# dtype and tolerance (atol, rtol) travel together; atol is scaled by the expected tensor's
# largest magnitude (sums over hundreds of terms).
DTYPES = [
    pytest.param(torch.float32, 1e-4, 1e-4, id="fp32"),
    pytest.param(torch.bfloat16, 6e-2, 3e-2, id="bf16"),
    pytest.param(torch.float16, 1e-2, 1e-2, id="fp16"),
]
# odd sizes, rank 1 and one row, several tiles in every direction (m, n > 128, r > 64)
SHAPES = [
    pytest.param(37, 29, 13, id="M37-N29-R13"),
    pytest.param(1, 17, 1, id="M1-N17-R1"),
    pytest.param(150, 133, 70, id="M150-N133-R70"),
]
GROUP = [(37, 29, 13), (1, 1, 1), (150, 133, 70), (16, 16, 16), (9, 70, 3)]
LOWRANK = [
    pytest.param((3, 5), 29, 37, 13, True, id="B3x5-N29-M37-R13-bias"),
    pytest.param((1,), 17, 9, 1, False, id="rows1-N17-M9-R1"),
    pytest.param((300,), 133, 150, 70, True, id="rows300-N133-M150-R70-bias"),
    pytest.param((6,), 24, 20, 300, True, id="rows6-N24-M20-R300-unfused"),
]
ORTH = [(37, 13), (1, 1), (5, 9), (150, 70), (64, 64)]


def _inputs(*shapes, dtype: torch.dtype) -> list[torch.Tensor]:
    """Leaves on the GPU with entries of size 1/sqrt(last dim) (sums stay O(1))."""
    return [
        (torch.randn(*shape, device="cuda") / max(shape[-1], 1) ** 0.5).to(dtype).requires_grad_()
        for shape in shapes
    ]


def _fp32(tensors) -> list[torch.Tensor]:
    """The same values in fp32, leaves of the reference's graph."""
    return [t.detach().float().requires_grad_() for t in tensors]


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str):
    expected = expected.detach()
    mag = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().float(), expected, atol=atol * max(1.0, mag), rtol=rtol, msg=name
    )


def _check(out, ref_out, inputs, ref_inputs, dtype, atol, rtol) -> None:
    """Outputs equal; the gradients of every input for one upstream gradient equal."""
    outs = out if isinstance(out, (list, tuple)) else [out]
    ref_outs = ref_out if isinstance(ref_out, (list, tuple)) else [ref_out]
    upstream = [torch.randn_like(o, dtype=torch.float32) for o in ref_outs]
    for i, (o, e) in enumerate(zip(outs, ref_outs)):
        assert o.shape == e.shape, f"output {i}: shape {o.shape} != {e.shape}"
        _close(o, e, atol, rtol, f"output {i}")
    grads = torch.autograd.grad(outs, inputs, [g.to(o.dtype) for o, g in zip(outs, upstream)])
    want = torch.autograd.grad(ref_outs, ref_inputs, upstream)
    for i, (g, w) in enumerate(zip(grads, want)):
        assert g.dtype == dtype, f"gradient {i}: dtype {g.dtype}"
        _close(g, w, atol, rtol, f"gradient of input {i}")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("m, n, r", SHAPES)
def test_compose_cuda_matches_reference(m, n, r, dtype, atol, rtol):
    inputs = _inputs((m, r), (r,), (n, r), dtype=dtype)
    ref_inputs = _fp32(inputs)
    W = ops.compose(*inputs)
    assert W.dtype == dtype and W.is_cuda
    _check(W, reference.compose(*ref_inputs), inputs, ref_inputs, dtype, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_compose_grouped_cuda_matches_reference(dtype, atol, rtol):
    layers = [_inputs((m, r), (r,), (n, r), dtype=dtype) for m, n, r in GROUP]
    Us, ss, Vs = (list(t) for t in zip(*layers))
    inputs = [*Us, *ss, *Vs]
    ref = _fp32(inputs)
    G = len(GROUP)
    Ws = ops.compose_grouped(Us, ss, Vs)
    want = reference.compose_grouped(ref[:G], ref[G : 2 * G], ref[2 * G :])
    _check(Ws, want, inputs, ref, dtype, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("batch, n, m, r, has_bias", LOWRANK)
def test_lowrank_linear_cuda_matches_reference(batch, n, m, r, has_bias, dtype, atol, rtol):
    shapes = [(*batch, n), (m, r), (r,), (n, r)] + ([(m,)] if has_bias else [])
    inputs = _inputs(*shapes, dtype=dtype)
    ref_inputs = _fp32(inputs)
    y = ops.lowrank_linear(*inputs)
    assert y.dtype == dtype and y.shape == (*batch, m)
    _check(y, reference.lowrank_linear(*ref_inputs), inputs, ref_inputs, dtype, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_orth_loss_cuda_matches_reference(dtype, atol, rtol):
    mats = _inputs(*ORTH, dtype=dtype)
    ref = _fp32(mats)
    loss = ops.orth_loss(mats)
    assert loss.dtype == torch.float32 and loss.shape == ()
    _check(loss, reference.orth_loss(ref), mats, ref, dtype, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("kind", reference.SPARSITY_KINDS)
def test_sparsity_loss_cuda_matches_reference(kind, dtype, atol, rtol):
    svals = _inputs((13,), (1,), (70,), (2500,), dtype=dtype)
    zeros = torch.zeros(5, device="cuda", dtype=dtype, requires_grad=True)
    svals.insert(1, zeros)  # Hoyer of an all-zero vector: 0, with zero gradient
    ref = _fp32(svals)
    loss = ops.sparsity_loss(svals, kind)
    assert loss.dtype == torch.float32 and loss.shape == ()
    _check(loss, reference.sparsity_loss(ref, kind), svals, ref, dtype, atol, rtol)
