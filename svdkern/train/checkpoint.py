"""Atomic, checksummed checkpoints that load with `torch.load(weights_only=True)`.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only: model
and optimizer state_dicts, the scheduler's state_dict, the RNG states stored as
tensors, the run's configuration as a plain dict, the phase and epoch. It is
serialized in memory, written to a temporary file `.<name>.<pid>.tmp` in the same
directory, fsynced and moved over the old one with `os.replace`, so a crash or a
full disk leaves either the old or the new file, and a failed write raises an
`OSError` carrying its own errno (ENOSPC, EROFS, ...) rather than torch's zip
writer error. A dict also carries `sha256`, a digest of its contents: `load`
recomputes it, so a bit flip that torch's zip reader lets through (it checks no
CRC) is refused instead of resuming from silently wrong weights.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "digest",
    "get_rng_state",
    "load",
    "save_atomic",
    "set_rng_state",
    "temp_files",
    "write_atomic",
]

DIGEST_KEY = "sha256"
# The temporary files of `write_atomic`: `.<name>.<pid>.tmp`.
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint; the message names the file and why."""


def _feed(h: Any, obj: Any) -> None:
    """Hash `obj` (tensors, numbers, strings, None, lists, tuples, dicts) into `h`."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"S{type(obj).__name__}:{obj!r};".encode())


def digest(obj: Any) -> str:
    """sha256 (hex) of a checkpoint's contents: tensors by dtype, shape and bytes, the rest by
    type and repr, dicts in insertion order (which torch.save and torch.load keep)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save(obj) to `path` with `write_atomic`; a dict gets its `sha256` digest."""
    if isinstance(obj, dict):
        obj = {**{k: v for k, v in obj.items() if k != DIGEST_KEY}, DIGEST_KEY: digest(obj)}
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getbuffer())


def write_atomic(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write `data` to `path` through the temporary file `.<name>.<pid>.tmp` beside it, fsync,
    os.replace and fsync of the directory: a crash or a full disk leaves the old file or the
    new one. On any failure the temporary file is removed and `path` is as it was; an OSError
    (ENOSPC, EROFS, ...) is raised with `filename` set to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _write(tmp, data)
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes | memoryview) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def load(path: str | os.PathLike) -> Any:
    """torch.load(path, map_location="cpu", weights_only=True), its digest checked and removed.

    Raises CheckpointError naming the file for a missing, empty, truncated, foreign or damaged
    file (torch's own errors span many lines and name no file)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file") from None
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        size = path.stat().st_size if path.is_file() else 0
        why = "empty file" if size == 0 else _first_line(exc)
        raise CheckpointError(f"{path}: not a readable checkpoint ({why})") from None
    if isinstance(obj, dict) and DIGEST_KEY in obj:
        saved = obj.pop(DIGEST_KEY)
        if saved != digest(obj):
            raise CheckpointError(
                f"{path}: damaged (its contents do not match the sha256 digest written with it)"
            )
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0].split(". ")[0] if text else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def temp_files(directory: str | os.PathLike) -> list[tuple[Path, int]]:
    """The temporary files `.<name>.<pid>.tmp` in `directory`, with the writer's pid."""
    out = []
    for p in sorted(Path(directory).iterdir()):
        m = _TEMP.match(p.name)
        if m and p.is_file():
            out.append((p, int(m["pid"])))
    return out


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
