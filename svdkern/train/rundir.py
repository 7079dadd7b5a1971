"""The run directory: what a run writes there, one run at a time, leftovers of dead runs.

A run writes checkpoint.pt after every epoch, each phase's model file (`<result>.pt`), one
metrics.jsonl row per epoch (`RunFiles`), and at the end its report.

A run holds an exclusive `fcntl.flock` on `RUN/.lock` for its whole life (under torchrun,
process 0 only) with `pid host start-time` written in it. The kernel drops the lock when
its holder dies, however it dies, so a lock file left by a killed run is free: the next run
takes it over and says whose it was. While the lock is held no other run writes into the
directory, so every `.<name>.<pid>.tmp` file there was left by a writer that died.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from svdkern.train import checkpoint

__all__ = [
    "CHECKPOINT",
    "LOCK",
    "METRICS",
    "RunDirError",
    "RunFiles",
    "RunLock",
    "TrainingError",
    "claim",
    "read_metrics",
    "remove_dead_temp_files",
    "unique_dir",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
LOCK = ".lock"


class RunDirError(ValueError):
    """A run directory that cannot be used; the message names it and what to do."""


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, unusable checkpoint, failed write); the
    message says why."""


def _why(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "read-only file system"
    return exc.strerror or str(exc)


class RunLock:
    """The exclusive lock of one run directory, held until `release` or the process's end."""

    def __init__(self, directory: Path, fd: int, previous: str):
        self.directory = directory
        self.fd = fd
        self.previous = previous  # the stale holder's line ("" if none)

    @classmethod
    def acquire(cls, directory: str | os.PathLike) -> RunLock:
        """Lock `directory` (which exists) or raise RunDirError naming the live holder."""
        directory = Path(directory)
        path = directory / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(f"{directory}: cannot create {LOCK} ({_why(exc)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunDirError(
                f"{directory} is in use by another run ({holder}); wait for it to end or "
                "choose another --out"
            ) from None
        except OSError as exc:  # a file system without flock
            os.close(fd)
            raise RunDirError(f"{directory}: cannot lock {path} ({_why(exc)})") from None
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        line = f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, line, 0)
        except OSError as exc:
            os.close(fd)
            raise RunDirError(f"{directory}: cannot write {path} ({_why(exc)})") from None
        return cls(directory, fd, previous)

    def release(self) -> None:
        """Unlock (the file stays: removing it would let two runs lock different inodes)."""
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = -1


def unique_dir(base: str | os.PathLike) -> Path:
    """Create and return `base`, or `base-2`, `base-3`, ... if taken: mkdir is atomic, so two
    runs started in the same second get different directories."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RunDirError(f"{base}: no free name {base.name}-N; choose --out")


def claim(directory: str | os.PathLike, *, create: bool, flag: str = "--out") -> RunLock:
    """Make sure `directory` is a writable directory (creating it if `create`) and lock it.
    Raises RunDirError with one line naming the directory for anything in the way: a regular
    file, a read-only or pseudo file system, no permission, or another live run."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise RunDirError(f"{directory} is a file, not a directory; choose another {flag}")
    if create:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(
                f"cannot create the run directory {directory} ({_why(exc)}); choose another {flag}"
            ) from None
    elif not directory.is_dir():
        raise RunDirError(f"{directory}: no such directory")
    if os.statvfs(directory).f_flag & os.ST_RDONLY:
        raise RunDirError(f"{directory} is on a read-only file system; choose another {flag}")
    if not os.access(directory, os.W_OK):
        raise RunDirError(f"{directory} is not writable; choose another {flag}")
    return RunLock.acquire(directory)


def remove_dead_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of dead writers (call with the directory's lock held, so
    that none is a live writer's); returns them. A pid that is alive belongs to this process
    or to an unrelated process that reused a dead writer's pid: its file goes too, unless it
    is this process's own."""
    removed = []
    for path, pid in checkpoint.temp_files(directory):
        if pid == os.getpid():
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def read_metrics(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The rows of metrics.jsonl as (line, row). A last line cut short (a crash or a full disk
    in the middle of a write) is dropped; a damaged line before it is an error naming it."""
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    out = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        if number == len(lines):  # no newline after it: the write did not finish
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or "phase" not in row or "epoch" not in row:
            raise TrainingError(
                f"{path}, line {number}: not a metrics row; remove that line (or the run "
                "directory) and resume again"
            )
        out.append((line, row))
    return out


class RunFiles:
    """What a run writes into its directory: checkpoints and phase files (atomic) and
    metrics.jsonl rows. Only the process that owns the directory writes (`write`; process 0
    under torchrun). A failed write (disk full, read-only file system) raises TrainingError
    naming the file and the cause, and which checkpoint is intact to resume from."""

    def __init__(self, directory: Path, write: bool, saved: tuple[str, int] | None = None):
        self.directory = directory
        self.write = write
        # (phase, epoch) of the checkpoint on disk, for the message of a failed write.
        self.saved = saved

    def save(self, obj: Any, name: str) -> None:
        """Write `obj` (torch.save) to `name` atomically."""
        if self.write:
            try:
                checkpoint.save_atomic(obj, self.directory / name)
            except OSError as exc:
                raise self._write_failed(exc, self.directory / name) from None

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write checkpoint.pt: `state` holds the "phase" and "epoch" it was taken at."""
        self.save(state, CHECKPOINT)
        self.saved = (state["phase"], state["epoch"])

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one row (an epoch's figures) to metrics.jsonl."""
        if self.write:
            try:
                with open(self.directory / METRICS, "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as exc:
                raise self._write_failed(exc, self.directory / METRICS) from None

    def metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl ([] before the first)."""
        path = self.directory / METRICS
        return [row for _, row in read_metrics(path)] if path.exists() else []

    def trim_metrics(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Keep only the rows of metrics.jsonl that `keep` accepts (a resumed run drops those
        written after the checkpoint it starts from), and a cut last line drops too."""
        path = self.directory / METRICS
        if not self.write or not path.exists():
            return
        kept = "".join(line + "\n" for line, row in read_metrics(path) if keep(row))
        try:
            checkpoint.write_atomic(path, kept.encode())
        except OSError as exc:
            raise self._write_failed(exc, path) from None

    def _write_failed(self, exc: OSError, path: Path) -> TrainingError:
        if self.saved is not None:
            where = (
                f"the previous {self.directory / CHECKPOINT} is intact ({self.saved[0]}, epoch "
                f"{self.saved[1]}): make room and continue with --resume {self.directory}"
            )
        else:
            where = f"no checkpoint yet: make room and start again with --resume {self.directory}"
        cause = exc.strerror or str(exc)
        return TrainingError(f"cannot write {exc.filename or path}: {cause}; {where}")
