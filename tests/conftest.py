"""Shared fixtures: every test starts from the same seed; `cuda` tests skip without a GPU;
`interp` tests run only when the Triton kernels serve the tensors they get, and skip, with
the reason, where this triton's interpreter is known to be broken. `run_cli` and `kill_at`
run `svdkern train` in a subprocess, to its end or to a kill -9 at a checkpoint."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = Path(__file__).resolve().parents[1]
# The command line of `svdkern train` run as a subprocess of the tests.
TRAIN = [sys.executable, "-m", "svdkern", "train"]

# A Triton kernel that fails in a test raises instead of falling back to the reference
# (svdkern.ops): the tests must see it. Subprocesses of the tests inherit it.
os.environ["SVDKERN_STRICT"] = "1"

# The transformers models of test_real_models.py are built from config classes with random
# weights; with these flags any attempt to reach the model hub fails at once instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# triton ≤ 3.6's interpreter turns a runtime scalar into a 1-element numpy array; numpy ≥ 2.4
# refuses int() of such an array, so every `range()` over a runtime bound raises this.
INTERP_BUG = "only 0-dimensional arrays can be converted to Python scalars"


# Hypothesis budgets: `make test` runs a third of each property test's examples (at least
# 10, derandomized where the test says so); `make test-full` (SVDKERN_FULL_HYPOTHESIS=1) the
# whole budget, as a nightly run would.
FULL_HYPOTHESIS = os.environ.get("SVDKERN_FULL_HYPOTHESIS") == "1"


def budget(examples: int) -> int:
    """The number of examples a property test runs in this session (see FULL_HYPOTHESIS)."""
    return examples if FULL_HYPOTHESIS else max(10, examples // 3)


def cli_env() -> dict[str, str]:
    """The environment of a subprocess running svdkern: this checkout first on PYTHONPATH
    and one thread per process (the tests share a small machine)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(cmd: list[str]) -> subprocess.CompletedProcess:
    """`cmd` run to its end in the checkout with `cli_env()`, text output captured."""
    return subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)


def kill_at(
    cmd: list[str], run: Path, phases: Sequence[str], at: tuple[str, int], slice_s: float = 0.01
) -> dict:
    """Start `cmd` (an `svdkern train` writing into `run`) and kill -9 it as soon as its
    checkpoint.pt is at or past `at` = (phase, epoch), phases in the order of `phases`;
    returns the checkpoint left on disk.

    The process runs in slices of `slice_s` seconds, stopped (SIGSTOP) between them while
    its checkpoint is looked at, so the kill lands at most about a slice after the wanted
    checkpoint was written, wherever the process then is in its work. Fails if the process
    ends first.
    """
    from svdkern.train import checkpoint

    def position(state: dict) -> tuple[int, int]:
        return phases.index(state["phase"]), state["epoch"]

    path, target = run / "checkpoint.pt", (phases.index(at[0]), at[1])
    seen, deadline = None, time.monotonic() + 300
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            while True:
                time.sleep(slice_s)
                proc.send_signal(signal.SIGSTOP)
                if proc.poll() is not None:
                    err.seek(0)
                    raise AssertionError(
                        f"{cmd} ended (status {proc.returncode}) before a checkpoint at {at}:\n"
                        + err.read().decode(errors="replace")[-3000:]
                    )
                stat = path.stat() if path.exists() else None
                stamp = stat and (stat.st_mtime_ns, stat.st_ino)  # a new file at every save
                if stamp and stamp != seen:
                    seen = stamp
                    if position(checkpoint.load(path)) >= target:
                        break
                assert time.monotonic() < deadline, f"no checkpoint at {at} in 300 s"
                proc.send_signal(signal.SIGCONT)
        finally:
            proc.kill()
            proc.wait(timeout=60)
    return checkpoint.load(path)


def _version(text: str) -> tuple[int, int]:
    major, minor = [*text.split("+")[0].split("."), "0"][:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _is_interp_bug(error: BaseException | None) -> bool:
    """The bug's TypeError, raised directly or as the cause of triton's InterpreterError."""
    while error is not None:
        if isinstance(error, TypeError) and INTERP_BUG in str(error):
            return True
        error = error.__cause__
    return False


def interpreter_skip_reason(
    triton_version: str, numpy_version: str, probe: Callable[[], None]
) -> str | None:
    """Why the interpreter tests cannot run here, or None when they can.

    Only the known bug counts: triton < 3.7 with numpy ≥ 2.4, confirmed by `probe` (a tiny
    interpreted kernel looping over a runtime bound) failing with that bug's TypeError. Any
    other outcome returns None, so the tests run and show whatever else is wrong.
    """
    if _version(triton_version) >= (3, 7) or _version(numpy_version) < (2, 4):
        return None
    try:
        probe()
    except Exception as e:  # any other failure is left to the tests to show
        if _is_interp_bug(e):
            return (
                f"triton {triton_version}'s interpreter fails with numpy {numpy_version} "
                f"(range() over a runtime scalar: TypeError: {INTERP_BUG}; fixed after "
                "triton 3.6): use numpy < 2.4 with triton 3.6 (as `make test-compat` does)"
            )
    return None


def _probe_interpreter() -> None:
    """Run one interpreted kernel whose loop bound is a runtime scalar."""
    import triton
    import triton.language as tl

    @triton.jit
    def _count(out_ptr, n):
        acc = 0.0
        for _ in range(0, n):
            acc += 1.0
        tl.store(out_ptr, acc)

    out = torch.zeros(1)
    _count[(1,)](out, 3)
    if out.item() != 3.0:
        raise AssertionError(f"interpreter probe counted {out.item()} iterations, expected 3")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _keep_threads():
    """`svdkern train` run in-process sets torch's thread count (--threads): restore it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if INTERPRET and any("interp" in item.keywords for item in items):
        import triton

        reason = interpreter_skip_reason(triton.__version__, np.__version__, _probe_interpreter)
        if reason is not None:
            for item in items:
                if "interp" in item.keywords:
                    item.add_marker(pytest.mark.skip(reason=reason))
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (run `make gpu-test` on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)
