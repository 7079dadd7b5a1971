"""Atomic checkpoints that load with `torch.load(weights_only=True)`.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only: model
and optimizer state_dicts, the scheduler's state_dict, the RNG states stored as
tensors, the run's configuration as a plain dict, the phase and epoch. It is
written to a temporary file in the same directory, fsynced and moved over the
old one with `os.replace`, so a crash leaves either the old or the new file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["get_rng_state", "load", "save_atomic", "set_rng_state"]


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save(obj) to `path` through a temporary file, fsync and os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load(path, map_location="cpu", weights_only=True)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def get_rng_state() -> dict[str, torch.Tensor]:
    """torch, CUDA, numpy and Python RNG states as tensors."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor(np_state[4], dtype=torch.float64),
        "python": torch.tensor(py_internal, dtype=torch.int64),
        "python_meta": torch.tensor([py_version, 0 if py_gauss is None else 1], dtype=torch.int64),
        "python_gauss": torch.tensor(0.0 if py_gauss is None else py_gauss, dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore the states saved by `get_rng_state`."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    pos, has_gauss = state["numpy_meta"].tolist()
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            int(pos),
            int(has_gauss),
            float(state["numpy_gauss"]),
        )
    )
    version, has_py_gauss = state["python_meta"].tolist()
    random.setstate(
        (
            int(version),
            tuple(int(v) for v in state["python"].tolist()),
            float(state["python_gauss"]) if has_py_gauss else None,
        )
    )
