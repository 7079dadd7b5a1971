"""The functional API of svdkern: five differentiable ops over SVD factors.

    compose(U, s, V)                  W = (U·diag(s))·Vᵀ
    compose_grouped(Us, ss, Vs)       [compose(U, s, V) for each layer], one call
    lowrank_linear(x, U, s, V, bias)  y = ((x·V)·diag(s))·Uᵀ + bias
    orth_loss(mats)                   Σ ‖MᵀM − I‖²_F / r²   (fp32 scalar)
    sparsity_loss(svals, kind)        Σ R(s), R ∈ {l1, hoyer, hoyer_square}   (fp32 scalar)

Each op is `torch.ops.svdkern.<name>`, defined in C++ (`svdkern._C`) with a
CPU kernel and autograd; this module adds the fake kernels that let
torch.compile trace the ops and registers the Triton kernels as their CUDA
implementation. The grouped ops' kernels return packed buffers (one tensor per
output: outputs of an operator must not alias each other); the per-layer tensors
are views of them taken by ATen view ops outside the kernels (compose_grouped is
a CompositeImplicitAutograd op over compose_grouped_packed). If `svdkern._C` cannot
be loaded, the functions run `svdkern.reference` instead (one warning);
`backend()` says which implementation serves each device.

If a Triton kernel fails on a device (Triton raises while compiling or launching it: an
unsupported GPU, a compiler bug, a config out of shared memory), the op warns once, naming
the op, the device and the error, and runs its plain-PyTorch form (`_REFERENCE_IMPLS`, the
math of `svdkern.reference` with the op schema's outputs) on that device from then on;
`backend()["fallbacks"]` lists those ops. Wrong results are not caught this way; input
errors (ValueError, TypeError from the checks) raise as always.

Environment:
    SVDKERN_BACKEND=triton   also serve CPU tensors with the Triton kernels
                             (with TRITON_INTERPRET=1: tests of the kernels
                             without a GPU).
    SVDKERN_BACKEND=reference  ignore `_C` and run the reference everywhere.
    SVDKERN_STRICT=1         no fallback: a failing Triton kernel raises (the tests and
                             `make gpu-check` set it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from svdkern import reference
from svdkern._checks import (
    check_factors,
    check_grouped,
    check_lowrank_input,
    check_mats,
    check_nonempty,
    check_svals,
)

__all__ = [
    "backend",
    "compose",
    "compose_grouped",
    "lowrank_linear",
    "orth_loss",
    "reference_mode",
    "sparsity_loss",
]

# The ops with a kernel per device (C++ on CPU, Triton on CUDA). compose_grouped has none: it
# is the layers' views of compose_grouped_packed (CompositeImplicitAutograd, in C++).
OP_NAMES = (
    "compose",
    "compose_backward",
    "compose_grouped_packed",
    "compose_grouped_backward",
    "lowrank_linear",
    "lowrank_linear_forward",
    "lowrank_linear_backward",
    "orth_loss",
    "orth_loss_forward",
    "orth_loss_backward",
    "sparsity_loss",
    "sparsity_loss_backward",
)

_BACKEND_ENV = os.environ.get("SVDKERN_BACKEND", "").strip().lower()
if _BACKEND_ENV not in ("", "triton", "reference", "cpp"):
    raise ValueError(
        f"SVDKERN_BACKEND must be one of 'cpp', 'triton', 'reference' or unset, "
        f"got {_BACKEND_ENV!r}"
    )


def _load_extension() -> bool:
    if _BACKEND_ENV == "reference":
        return False
    try:
        from svdkern import _C  # noqa: F401  (loading it registers torch.ops.svdkern.*)
    except ImportError as exc:
        warnings.warn(
            f"svdkern._C could not be loaded ({exc}); svdkern runs the plain-PyTorch "
            "reference ops instead. Rebuild with `make install` for the C++/Triton kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


_HAS_C = _load_extension()
_HAS_TRITON = importlib.util.find_spec("triton") is not None


@functools.cache
def _triton_impls() -> dict[str, Callable]:
    from svdkern import kernels

    return kernels.IMPLS


# (op name, device) → the error of the Triton kernel that failed there; the op runs its
# plain-PyTorch form on that device from then on.
_FALLBACKS: dict[tuple[str, str], str] = {}


@functools.cache
def _triton_dir() -> str:
    import triton

    return os.path.dirname(os.path.abspath(triton.__file__)) + os.sep


def _raised_by_triton(exc: Exception) -> bool:
    """Whether `exc` is a failure of Triton compiling or launching a kernel: a TritonError
    (compilation, out of resources, ptxas), or any error raised inside the triton package
    (an MLIR pass, the driver). Not the launchers' own input checks, nor running out of
    device memory (the reference would need that memory too)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    from triton.errors import TritonError

    if isinstance(exc, TritonError):
        return True
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(_triton_dir()):
            return True
        tb = tb.tb_next
    return False


def _strict() -> bool:
    return os.environ.get("SVDKERN_STRICT", "").strip() == "1"


def _device_of(args: Sequence) -> str:
    """The device of the first tensor among the op's arguments (lists included)."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return str(arg.device)
        if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor):
            return str(arg[0].device)
    raise ValueError("no tensor among the arguments")


def _fall_back(name: str, device: str, exc: Exception) -> None:
    lines = str(exc).strip().splitlines()
    error = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]
    _FALLBACKS[(name, device)] = error
    warnings.warn(
        f"svdkern: the Triton kernel of svdkern::{name} failed on {device} ({error}); "
        f"svdkern::{name} runs the plain-PyTorch reference on {device} from now on "
        "(SVDKERN_STRICT=1 raises instead)",
        RuntimeWarning,
        stacklevel=2,
    )


def _triton_impl(name: str) -> Callable:
    """The op's kernel for the devices Triton serves: the launcher, or the op's
    plain-PyTorch form where the launcher failed on that device (see the module docstring)."""
    fallback = _REFERENCE_IMPLS[name]

    def impl(*args):
        device = _device_of(args)
        if (name, device) not in _FALLBACKS:
            try:
                return _triton_impls()[name](*args)
            except Exception as exc:
                if _strict() or not _raised_by_triton(exc):
                    raise
                _fall_back(name, device, exc)
        return fallback(*args)

    impl.__name__ = f"{name}_triton"
    return impl


# ---------------------------------------------------------------------------------------------
# The ops in plain PyTorch, one function per name of OP_NAMES with its schema's arguments and
# outputs (packed buffers for the grouped ops, an empty x·V, Gram residuals): the math of
# svdkern.reference, with the gradients autograd would take of it.


def _compose(U, s, V):
    check_factors("compose", U, s, V)
    return reference.compose(U, s, V)


def _compose_backward(grad_W, U, s, V):
    check_factors("compose_backward", U, s, V)
    grad_W = grad_W.to(U.dtype)
    G = grad_W @ V
    return G * s, (G * U).sum(0), grad_W.T @ (U * s)


def _compose_grouped_packed(Us, ss, Vs):
    check_grouped("compose_grouped", Us, ss, Vs)
    return torch.cat([reference.compose(U, s, V).reshape(-1) for U, s, V in zip(Us, ss, Vs)])


def _compose_grouped_backward(grad_W, Us, ss, Vs):
    check_grouped("compose_grouped_backward", Us, ss, Vs)
    sizes = [U.shape[0] * V.shape[0] for U, V in zip(Us, Vs)]
    grads = [
        _compose_backward(g.reshape(U.shape[0], V.shape[0]), U, s, V)
        for g, U, s, V in zip(grad_W.split(sizes), Us, ss, Vs)
    ]
    dF = torch.cat([dU.reshape(-1) for dU, _, _ in grads] + [dV.reshape(-1) for *_, dV in grads])
    return dF, torch.cat([ds for _, ds, _ in grads])


def _lowrank_linear(x, U, s, V, bias=None):
    check_lowrank_input("lowrank_linear", x, U, s, V, bias)
    return reference.lowrank_linear(x, U, s, V, bias)


def _lowrank_linear_forward(x, U, s, V, bias=None):
    return _lowrank_linear(x, U, s, V, bias), x.new_empty((0,))


def _lowrank_linear_backward(grad_y, x, U, s, V, xv, bias_grad):
    check_lowrank_input("lowrank_linear_backward", x, U, s, V, None)
    m, n = U.shape[0], V.shape[0]
    x2 = x.reshape(-1, n)
    g = grad_y.to(x.dtype).reshape(-1, m)
    t = x2 @ V  # recomputed, as the Triton kernels do (xv is empty on their devices)
    h = g @ U
    dt = h * s
    dbias = g.sum(0) if bias_grad else U.new_empty((0,))
    return (dt @ V.T).reshape(x.shape), g.T @ (t * s), (h * t).sum(0), x2.T @ dt, dbias


def _orth_loss(mats):
    check_mats("orth_loss", mats)
    return reference.orth_loss(mats)


def _orth_loss_forward(mats):
    check_mats("orth_loss", mats)
    residuals = []
    for M in mats:
        A = M.to(reference.loss_dtype(M.dtype))
        residuals.append(A.T @ A - torch.eye(A.shape[1], dtype=A.dtype, device=A.device))
    return reference.orth_loss(mats), torch.cat([R.reshape(-1) for R in residuals])


def _orth_loss_backward(grad, mats, residuals):
    """d/dM Σ ‖(MᵀM − I)/r‖²_F = 4·M·R/r², R = MᵀM − I (symmetric), per matrix."""
    check_mats("orth_loss_backward", mats)
    acc = reference.loss_dtype(mats[0].dtype)
    g = grad.to(device=mats[0].device, dtype=acc)
    out, start = [], 0
    for M in mats:
        r = M.shape[1]
        R = residuals[start : start + r * r].reshape(r, r).to(acc)
        start += r * r
        out.append((4 * g / r**2 * (M.to(acc) @ R)).to(M.dtype).reshape(-1))
    return torch.cat(out)


def _sparsity_loss(svals, kind):
    check_svals("sparsity_loss", svals, kind)
    return reference.sparsity_loss(svals, kind)


def _sparsity_gradient(a: torch.Tensor, kind: str) -> torch.Tensor:
    """dR/da of reference._sparsity for one vector a (in the loss dtype): with c = ‖a‖_∞
    (constant), t = a/c and h = ‖t‖₁/max(‖t‖₂, tiny), dh/da = (sign(t)/l₂ − h·t/(‖t‖₂·l₂))/c,
    the second term only where ‖t‖₂ ≥ tiny (clamp_min passes no gradient below)."""
    sign = torch.sign(a)
    if kind == "l1":
        return sign
    amax = a.abs().amax()
    c = torch.where(amax > 0, amax, torch.ones_like(amax))
    t = a / c
    tiny = torch.finfo(a.dtype).tiny
    norm = torch.linalg.vector_norm(t)
    l2 = norm.clamp_min(tiny)
    h = t.abs().sum() / l2
    through_norm = torch.where(norm >= tiny, h / (l2 * l2), torch.zeros_like(h))
    dh = (sign / l2 - through_norm * t) / c
    return dh if kind == "hoyer" else 2 * h * dh


def _sparsity_loss_backward(grad, svals, kind):
    check_svals("sparsity_loss_backward", svals, kind)
    acc = reference.loss_dtype(svals[0].dtype)
    g = grad.to(device=svals[0].device, dtype=acc)
    return torch.cat([(g * _sparsity_gradient(s.to(acc), kind)).to(s.dtype) for s in svals])


_REFERENCE_IMPLS: dict[str, Callable] = {
    "compose": _compose,
    "compose_backward": _compose_backward,
    "compose_grouped_packed": _compose_grouped_packed,
    "compose_grouped_backward": _compose_grouped_backward,
    "lowrank_linear": _lowrank_linear,
    "lowrank_linear_forward": _lowrank_linear_forward,
    "lowrank_linear_backward": _lowrank_linear_backward,
    "orth_loss": _orth_loss,
    "orth_loss_forward": _orth_loss_forward,
    "orth_loss_backward": _orth_loss_backward,
    "sparsity_loss": _sparsity_loss,
    "sparsity_loss_backward": _sparsity_loss_backward,
}


def _register_fakes() -> None:
    def like_loss(t: torch.Tensor) -> torch.Tensor:
        return t.new_empty((), dtype=reference.loss_dtype(t.dtype))

    @torch.library.register_fake("svdkern::compose")
    def _(U, s, V):
        check_factors("compose", U, s, V)
        return U.new_empty((U.shape[0], V.shape[0]))

    @torch.library.register_fake("svdkern::compose_backward")
    def _(grad_W, U, s, V):
        return torch.empty_like(U), torch.empty_like(s), torch.empty_like(V)

    def numel(tensors) -> int:
        return sum(t.numel() for t in tensors)

    @torch.library.register_fake("svdkern::compose_grouped_packed")
    def _(Us, ss, Vs):
        check_grouped("compose_grouped", Us, ss, Vs)
        return Us[0].new_empty((sum(U.shape[0] * V.shape[0] for U, V in zip(Us, Vs)),))

    @torch.library.register_fake("svdkern::compose_grouped_backward")
    def _(grad_W, Us, ss, Vs):
        return Us[0].new_empty((numel(Us) + numel(Vs),)), ss[0].new_empty((numel(ss),))

    @torch.library.register_fake("svdkern::lowrank_linear")
    def _(x, U, s, V, bias=None):
        check_lowrank_input("lowrank_linear", x, U, s, V, bias)
        return x.new_empty((*x.shape[:-1], U.shape[0]))

    @torch.library.register_fake("svdkern::lowrank_linear_forward")
    def _(x, U, s, V, bias=None):
        check_lowrank_input("lowrank_linear", x, U, s, V, bias)
        rows = x.shape[:-1].numel()
        xv_shape = (rows, U.shape[1]) if _keeps_xv(x.device) else (0,)
        return x.new_empty((*x.shape[:-1], U.shape[0])), x.new_empty(xv_shape)

    @torch.library.register_fake("svdkern::lowrank_linear_backward")
    def _(grad_y, x, U, s, V, xv, bias_grad):
        grad_bias = U.new_empty((U.shape[0],) if bias_grad else (0,))
        return (
            torch.empty_like(x),
            torch.empty_like(U),
            torch.empty_like(s),
            torch.empty_like(V),
            grad_bias,
        )

    @torch.library.register_fake("svdkern::orth_loss")
    def _(mats):
        check_mats("orth_loss", mats)
        return like_loss(mats[0])

    @torch.library.register_fake("svdkern::orth_loss_forward")
    def _(mats):
        check_mats("orth_loss", mats)
        acc = reference.loss_dtype(mats[0].dtype)
        residuals = mats[0].new_empty((sum(M.shape[1] ** 2 for M in mats),), dtype=acc)
        return like_loss(mats[0]), residuals

    @torch.library.register_fake("svdkern::orth_loss_backward")
    def _(grad, mats, residuals):
        return mats[0].new_empty((numel(mats),))

    @torch.library.register_fake("svdkern::sparsity_loss")
    def _(svals, kind):
        check_svals("sparsity_loss", svals, kind)
        return like_loss(svals[0])

    @torch.library.register_fake("svdkern::sparsity_loss_backward")
    def _(grad, svals, kind):
        return svals[0].new_empty((numel(svals),))


def _register_flop_formulas() -> None:
    """Teach torch.utils.flop_counter.FlopCounterMode the ops' FLOPs (it counts an op it
    has no formula for as 0). As for aten's own formulas, FLOPs are 2 × the multiply-adds
    of the matrix products; elementwise work is not counted. With U (m×r), V (n×r), x of
    `rows` rows and a loss matrix M (d×r):

        compose                      2·m·n·r          (U·diag(s))·Vᵀ
        compose_backward             4·m·n·r          grad_W·V and grad_Wᵀ·(U·diag(s))
        compose_grouped_packed       Σ 2·m·n·r        over the layers
        compose_grouped_backward     Σ 4·m·n·r
        lowrank_linear(_forward)     2·rows·r·(n + m) x·V, then ·Uᵀ
        lowrank_linear_backward      4·rows·r·(n + m) (+ 2·rows·n·r where x·V is recomputed)
        orth_loss(_forward)          Σ 2·d·r²         the Grams MᵀM
        orth_loss_backward           Σ 2·d·r²         4·M·R/r², one product per matrix (the
                                                      autograd of the reference takes two)
        sparsity_loss(_backward)     0                elementwise

    Everything but the orthogonality backward equals the count of the plain-PyTorch
    reference (`reference_mode()`). Registered once per process; a formula already present
    (a second import of this module) is left alone."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    def products(Us, Vs, ss) -> int:
        return sum(U[0] * V[0] * s[0] for U, V, s in zip(Us, Vs, ss, strict=True))

    def lowrank(x, U, s, V) -> int:
        return 2 * math.prod(x[:-1]) * s[0] * (V[0] + U[0])

    def grams(mats) -> int:
        return sum(2 * M[0] * M[1] ** 2 for M in mats)

    def xv_recomputed(x, V, xv) -> int:
        return 0 if math.prod(xv) else 2 * math.prod(x[:-1]) * V[0] * V[1]

    formulas = {
        "compose": lambda U, s, V, **_: 2 * products([U], [V], [s]),
        "compose_backward": lambda g, U, s, V, **_: 4 * products([U], [V], [s]),
        "compose_grouped_packed": lambda Us, ss, Vs, **_: 2 * products(Us, Vs, ss),
        "compose_grouped_backward": lambda g, Us, ss, Vs, **_: 4 * products(Us, Vs, ss),
        "lowrank_linear": lambda x, U, s, V, bias=None, **_: lowrank(x, U, s, V),
        "lowrank_linear_forward": lambda x, U, s, V, bias=None, **_: lowrank(x, U, s, V),
        "lowrank_linear_backward": lambda g, x, U, s, V, xv, bias_grad, **_: (
            2 * lowrank(x, U, s, V) + xv_recomputed(x, V, xv)
        ),
        "orth_loss": lambda mats, **_: grams(mats),
        "orth_loss_forward": lambda mats, **_: grams(mats),
        "orth_loss_backward": lambda grad, mats, residuals, **_: grams(mats),
    }
    for name, formula in formulas.items():
        op = getattr(torch.ops.svdkern, name)
        if op not in flop_registry:
            register_flop_formula(op)(formula)


def _keeps_xv(device: torch.device) -> bool:
    """Whether lowrank_linear_forward on `device` returns x·V for the backward (the C++ CPU
    kernel) or an empty tensor (the Triton kernels recompute it on chip)."""
    return device.type == "cpu" and _BACKEND_ENV != "triton"


def _register_triton(dispatch_keys: Sequence[str]) -> torch.library.Library:
    """The Triton launchers as the ops' kernels for `dispatch_keys`. The returned Library
    holds the registrations: they last as long as it is referenced."""
    lib = torch.library.Library("svdkern", "IMPL")
    with warnings.catch_warnings():
        # Overriding the C++ CPU kernel (interpreter mode) warns once per op; that is the intent.
        warnings.simplefilter("ignore", UserWarning)
        for key in dispatch_keys:
            for name in OP_NAMES:
                lib.impl(name, _triton_impl(name), key)
    return lib


if _HAS_C:
    _register_fakes()
    _register_flop_formulas()
    if _HAS_TRITON:
        _LIB = _register_triton(["CUDA", "CPU"] if _BACKEND_ENV == "triton" else ["CUDA"])
elif _BACKEND_ENV == "triton":
    raise RuntimeError("SVDKERN_BACKEND=triton needs svdkern._C, which could not be loaded")


_REFERENCE_MODE = False


@contextlib.contextmanager
def reference_mode() -> Iterator[None]:
    """Run every op as its plain-PyTorch reference inside the block.

    For benchmarks and debugging: ``with svdkern.ops.reference_mode(): loss = model(x)``
    measures or checks the same model on the reference path.
    """
    global _REFERENCE_MODE
    previous, _REFERENCE_MODE = _REFERENCE_MODE, True
    try:
        yield
    finally:
        _REFERENCE_MODE = previous


def _use_reference() -> bool:
    return _REFERENCE_MODE or not _HAS_C


def backend() -> dict[str, Any]:
    """Which implementation serves each device: 'cpp', 'triton' or 'reference'; and, once a
    Triton kernel failed on a device, under "fallbacks" the ops that run the plain-PyTorch
    reference there instead, with the error (the key is absent while there are none).

    Example: ``svdkern.backend()`` → ``{'cpu': 'cpp', 'cuda': 'triton'}``; after a failure
    ``{'cpu': 'cpp', 'cuda': 'triton', 'fallbacks': {'cuda:0': {'compose_backward':
    'OutOfResources: out of resource: shared memory, ...'}}}``.
    """
    if not _HAS_C:
        return {"cpu": "reference", "cuda": "reference"}
    out: dict[str, Any] = {
        "cpu": "triton" if _BACKEND_ENV == "triton" else "cpp",
        "cuda": "triton" if _HAS_TRITON else "unavailable (install triton)",
    }
    if _FALLBACKS:
        fallbacks: dict[str, dict[str, str]] = {}
        for (name, device), error in sorted(_FALLBACKS.items()):
            fallbacks.setdefault(device, {})[name] = error
        out["fallbacks"] = fallbacks
    return out


def compose(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """W = (U·diag(s))·Vᵀ.

    Args:
        U: (m, r) left factor.  s: (r,) singular values.  V: (n, r) right factor.
    Returns:
        W: (m, n), in the factors' dtype.

    Example::

        W = svdkern.ops.compose(U, s, V)  # equals U @ torch.diag(s) @ V.T
    """
    if _use_reference():
        check_factors("compose", U, s, V)
        return reference.compose(U, s, V)
    return torch.ops.svdkern.compose(U, s, V)


def compose_grouped(
    Us: Sequence[torch.Tensor], ss: Sequence[torch.Tensor], Vs: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """[compose(U, s, V) for each layer] in one op call (one launch per direction on CUDA).

    All factors share one dtype and device; shapes may differ per layer.
    """
    Us, ss, Vs = list(Us), list(ss), list(Vs)
    if _use_reference():
        check_grouped("compose_grouped", Us, ss, Vs)
        return reference.compose_grouped(Us, ss, Vs)
    check_nonempty("compose_grouped", "Us", Us)  # the dispatcher needs a tensor to dispatch on
    return list(torch.ops.svdkern.compose_grouped(Us, ss, Vs))


def lowrank_linear(
    x: torch.Tensor,
    U: torch.Tensor,
    s: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = ((x·V)·diag(s))·Uᵀ + bias, without forming W.

    Args:
        x: (..., n) input.  U: (m, r).  s: (r,).  V: (n, r).  bias: (m,) or None.
    Returns:
        y: (..., m).
    """
    if _use_reference():
        check_lowrank_input("lowrank_linear", x, U, s, V, bias)
        return reference.lowrank_linear(x, U, s, V, bias)
    return torch.ops.svdkern.lowrank_linear(x, U, s, V, bias)


def orth_loss(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_M ‖MᵀM − I‖²_F / r² over 2-D matrices M (k×r) in one op call; fp32 scalar.

    Pass every layer's U and V: ``orth_loss([l.U for l in layers] + [l.V for l in layers])``.
    """
    mats = list(mats)
    if _use_reference():
        check_mats("orth_loss", mats)
        return reference.orth_loss(mats)
    check_nonempty("orth_loss", "mats", mats)
    return torch.ops.svdkern.orth_loss(mats)


def sparsity_loss(svals: Sequence[torch.Tensor], kind: str = "hoyer") -> torch.Tensor:
    """Σ_s R(s) over 1-D vectors s in one op call; fp32 scalar.

    kind: "l1" (‖s‖₁), "hoyer" (‖s‖₁/‖s‖₂) or "hoyer_square" (‖s‖₁²/‖s‖₂²).
    """
    svals = list(svals)
    if _use_reference():
        check_svals("sparsity_loss", svals, kind)
        return reference.sparsity_loss(svals, kind)
    check_nonempty("sparsity_loss", "svals", svals)
    return torch.ops.svdkern.sparsity_loss(svals, kind)
