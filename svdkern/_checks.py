"""Input checks shared by the Python paths (fake kernels, Triton launchers, fallback).

They mirror the TORCH_CHECKs of csrc/checks.h: each error names the op, the
argument, what it got (shape, dtype, device) and what was expected.
Shape errors are ValueError, dtype errors TypeError.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from svdkern.reference import SPARSITY_KINDS

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _check_tensor(op: str, name: str, t, ndim: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be a {ndim}-D tensor {what}, got shape {_shape(t)}")
    if t.dtype not in _FLOATS:
        raise TypeError(
            f"{op}: {name} must be a floating-point tensor (float32, float64, float16, "
            f"bfloat16), got dtype {t.dtype}"
        )


def _check_same(op: str, ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; "
            "all inputs must share one dtype"
        )
    if t.device != ref.device:
        raise ValueError(
            f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
            "all inputs must be on one device"
        )


def check_factors(op: str, U, s, V) -> None:
    """U (m×r), s (r,), V (n×r), one floating dtype and device, r ≥ 1."""
    _check_tensor(op, "U", U, 2, "(m, r)")
    _check_tensor(op, "s", s, 1, "(r,)")
    _check_tensor(op, "V", V, 2, "(n, r)")
    r = U.shape[1]
    if r < 1:
        raise ValueError(f"{op}: rank must be >= 1, got U of shape {_shape(U)}")
    if s.shape[0] != r:
        raise ValueError(
            f"{op}: s must have shape ({r},) to match U of shape {_shape(U)}, got shape {_shape(s)}"
        )
    if V.shape[1] != r:
        raise ValueError(
            f"{op}: V must have {r} columns to match U of shape {_shape(U)}, got shape {_shape(V)}"
        )
    _check_same(op, "U", U, "s", s)
    _check_same(op, "U", U, "V", V)


def check_nonempty(op: str, name: str, items: Sequence) -> None:
    if len(items) == 0:
        raise ValueError(f"{op}: {name} must be a non-empty list of tensors, got an empty list")


def check_grouped(op: str, Us: Sequence, ss: Sequence, Vs: Sequence) -> None:
    """Lists of equal length ≥ 1, each triple valid, one dtype and device for all."""
    check_nonempty(op, "Us", Us)
    if not len(Us) == len(ss) == len(Vs):
        raise ValueError(
            f"{op}: Us, ss and Vs must have the same length, got {len(Us)}, {len(ss)}, {len(Vs)}"
        )
    for i, (U, s, V) in enumerate(zip(Us, ss, Vs)):
        check_factors(f"{op}[{i}]", U, s, V)
        if i:
            _check_same(op, "Us[0]", Us[0], f"Us[{i}]", U)


def check_lowrank_input(op: str, x, U, s, V, bias) -> None:
    """x (..., n) with n = V.shape[0]; bias (m,) or None; one dtype and device."""
    check_factors(op, U, s, V)
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        got = _shape(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a tensor of shape (..., n), got {got}")
    if x.shape[-1] != V.shape[0]:
        raise ValueError(
            f"{op}: x must have last dimension {V.shape[0]} (the rows of V of shape "
            f"{_shape(V)}), got shape {_shape(x)}"
        )
    _check_same(op, "U", U, "x", x)
    if bias is not None:
        _check_tensor(op, "bias", bias, 1, "(m,)")
        if bias.shape[0] != U.shape[0]:
            raise ValueError(
                f"{op}: bias must have shape ({U.shape[0]},) to match U of shape "
                f"{_shape(U)}, got shape {_shape(bias)}"
            )
        _check_same(op, "U", U, "bias", bias)


def check_mats(op: str, mats: Sequence) -> None:
    """A non-empty list of 2-D floating matrices (k×r, r ≥ 1), one dtype and device."""
    check_nonempty(op, "mats", mats)
    for i, M in enumerate(mats):
        _check_tensor(op, f"mats[{i}]", M, 2, "(k, r)")
        if M.shape[1] < 1:
            raise ValueError(f"{op}: mats[{i}] must have at least one column, got {_shape(M)}")
        if i:
            _check_same(op, "mats[0]", mats[0], f"mats[{i}]", M)


def check_svals(op: str, svals: Sequence, kind: str) -> None:
    """A non-empty list of 1-D floating vectors, one dtype and device; kind known."""
    if kind not in SPARSITY_KINDS:
        raise ValueError(f"{op}: kind must be one of {SPARSITY_KINDS}, got {kind!r}")
    check_nonempty(op, "svals", svals)
    for i, s in enumerate(svals):
        _check_tensor(op, f"svals[{i}]", s, 1, "(r,)")
        if s.shape[0] < 1:
            raise ValueError(f"{op}: svals[{i}] must have at least one element, got {_shape(s)}")
        if i:
            _check_same(op, "svals[0]", svals[0], f"svals[{i}]", s)
