"""`make gpu-check`: prove the kernels on a bare GPU machine in under five minutes.

    python tools/gpu_check.py [--deadline-s 280] [--jobs N] [--out DIR]

One command, written for an H100 machine that cannot download (Python 3.12, torch 2.11,
triton 3.6, ninja, pytest-xdist, 16 cores). Most valuable first, a line per result as it
completes, so a run cut off still says what it did:

    build   svdkern._C: reused if it imports and its sources are unchanged (a prebuilt one
            carried with the tree, `make gpu-prebuilt`), else built with ninja on every core;
            meanwhile the Triton kernels of the stages below are compiled into triton's cache
            in parallel processes (`tools/kernel_check.py --warm`)
    ops     every op forward and backward on CUDA against svdkern.reference (fp32, bf16,
            fp16; odd sizes, rank 1, several tiles), the kernels' own tests, opcheck and
            torch.compile(fullgraph=True) on CUDA: pytest in parallel processes at fixed
            kernel configs (SVDKERN_AUTOTUNE=0)
    model   beside ops: ResNet-20 decompose → 3 training steps with SVDRegularizer → prune
            → compress → torch.export, equal to the same run on the reference path
    bench   the headline ratios, each measured in one run (triton.testing.do_bench)
    rest    the remaining `cuda` and `interp` tests, until the deadline

Past the deadline no stage starts and a running one is stopped; what it did not report
counts as not reached. Every subprocess runs with SVDKERN_STRICT=1 (a failing kernel raises).
Writes gpu_check.log, gpu_check.json (a record per check) and gpu_check.md (the summary)
to $OUT when set, else to bench/results/; the JSON and summary are rewritten after every
result. The last line: `gpu-check: N passed, N failed, N not reached`. Exit status 1 when a
check failed or build, ops or model was not reached, 0 otherwise, and 2 at once, writing
nothing, without a CUDA device.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 280.0
STAGES = ("build", "ops", "model", "bench", "rest")
# Longest each stage may run (the deadline cuts it sooner): a hang in one stage must leave
# the later ones their time.
STAGE_CAPS_S = {"build": 150.0, "warm": 60.0, "ops": 150.0, "model": 90.0, "bench": 120.0}
FILES = ("gpu_check.log", "gpu_check.json", "gpu_check.md")
STAMP = ROOT / "build" / "svdkern_C.sources"  # what the extension in svdkern/ was built from
# Kernels compiled offline for sm_90 by `make gpu-cache` (carried with the tree): copied into
# triton's cache before the kernels are compiled, so that those whose key matches are hits.
SEED = ROOT / ".compat" / "gpu-triton-cache"
RESULT = "RESULT "  # prefix of a result line of the model and bench subprocesses

# The model run's SGD step: larger ones amplify rounding chaotically (at 0.05 with momentum
# 0.9 a 1e-7 change of the weights moves them by 1e-3 in three steps).
MODEL_LR = 0.002
MODEL_CHECKS = (
    "decompose equals the dense model",
    "3 training steps equal the reference path",
    "prune keeps the ranks of the reference path",
    "compress equals the pruned model and the reference path",
    "torch.export equals the compressed model",
)
BENCH_CHECKS = (
    "compose forward 4096³ bf16 vs torch.matmul",
    "lowrank_linear fwd+bwd 16384×4096² r128 bf16 vs the unfused matmul chain",
    "orth_loss fwd+bwd ResNet-50 fp32 vs eager reference",
    "ResNet-20 b128 bf16 training step: svdkern vs dense vs plain-PyTorch SVD",
    "orth_loss fwd+bwd ResNet-50 fp32 vs compiled reference",
    "ResNet-20 b128 bf16 training step vs compiled plain-PyTorch SVD",
)
# Tolerances of the model check (fp32, TF32 off): errors relative to the largest magnitude,
# for parameters to max(1, largest). Three steps amplify rounding differences ~50× at the
# model run's learning rate (a 1e-7 change of the weights moves them by 5e-6; on the CPU the
# C++ and reference paths end 8e-7 apart, their compressed models 3e-6).
MODEL_TOL = {
    "decompose": 1e-4,
    "losses": 1e-4,
    "parameters": 1e-4,
    "compress": 1e-4,
    "paths": 1e-3,
    "export": 1e-5,
}


# ---------------------------------------------------------------------------------------------
# Checks, the record and the summary


@dataclass
class Check:
    """One result: a test, a step of the model run, a benchmark, the build."""

    stage: str
    name: str
    status: str = "not reached"  # passed | failed | skipped | not reached
    seconds: float | None = None
    detail: str = ""
    values: dict = field(default_factory=dict)


def tally(checks: Iterable[Check]) -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "skipped": 0, "not reached": 0}
    for c in checks:
        counts[c.status] += 1
    return counts


def summary_line(checks: Iterable[Check]) -> str:
    n = tally(checks)
    return f"gpu-check: {n['passed']} passed, {n['failed']} failed, {n['not reached']} not reached"


class Run:
    """The checks of one run: planned up front (not reached until reported), reported as they
    complete (a line each), written to the JSON and the summary after every report."""

    def __init__(self, out: Path, deadline_s: float, clock: Callable[[], float] = time.monotonic):
        self.out, self.clock = out, clock
        self.start = clock()
        self.deadline_s = deadline_s
        self.checks: dict[tuple[str, str], Check] = {}
        self.notes: list[str] = []
        self.stage_seconds: dict[str, float] = {}
        self.meta: dict = {"started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        self.lock = threading.RLock()
        self.procs: list[Proc] = []  # stopped at the end if still running
        out.mkdir(parents=True, exist_ok=True)
        self.log = (out / FILES[0]).open("w", encoding="utf-8")

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.deadline_s - self.elapsed()

    def timeout(self, stage: str, ran_s: float = 0.0, reserve_s: float = 2.0) -> float:
        """Seconds `stage` may still run, having run `ran_s`: the rest of its cap, cut by the
        deadline (less a reserve for writing the results); 0 when the deadline has passed."""
        cap = STAGE_CAPS_S.get(stage, float("inf")) - ran_s
        return max(0.0, min(cap, self.remaining() - reserve_s))

    def say(self, text: str, echo: bool = True) -> None:
        with self.lock:
            line = f"gpu-check [{self.elapsed():6.1f}s] {text}"
            if echo:
                print(line, flush=True)
            self.log.write(line + "\n")
            self.log.flush()

    def raw(self, prefix: str, text: str) -> None:
        """A line of a subprocess: to the log only."""
        with self.lock:
            self.log.write(f"{prefix}| {text}\n")
            self.log.flush()

    def plan(self, stage: str, names: Iterable[str]) -> None:
        with self.lock:
            for name in names:
                self.checks.setdefault((stage, name), Check(stage, name))
            self.write()

    def record(self, stage, name, status, seconds=None, detail="", values=None) -> None:
        with self.lock:
            check = self.checks.setdefault((stage, name), Check(stage, name))
            check.status, check.seconds, check.detail = status, seconds, detail
            check.values = values or {}
            word = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}.get(status, status)
            took = f" ({seconds:.1f} s)" if seconds is not None else ""
            self.say(f"{word} {stage}: {name}{took}" + (f" — {detail}" if detail else ""))
            self.write()

    def unreported(self, stage: str) -> list[Check]:
        return [c for c in self.checks.values() if c.stage == stage and c.status == "not reached"]

    def note(self, text: str) -> None:
        with self.lock:
            self.notes.append(text)
            self.say(text)
            self.write()

    def write(self) -> None:
        with self.lock:
            checks = list(self.checks.values())
            data = {
                **self.meta,
                "elapsed_s": round(self.elapsed(), 1),
                "deadline_s": self.deadline_s,
                "counts": tally(checks),
                "stage_seconds": {k: round(v, 1) for k, v in self.stage_seconds.items()},
                "notes": self.notes,
                "checks": [asdict(c) for c in checks],
            }
            _write_atomic(self.out / FILES[1], json.dumps(data, indent=1, ensure_ascii=False))
            _write_atomic(self.out / FILES[2], markdown(data))

    def close(self) -> None:
        for proc in self.procs:
            if proc.proc.poll() is None:
                proc.kill()
        with self.lock:
            self.write()
            self.say(summary_line(self.checks.values()))
            self.log.close()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def markdown(data: dict) -> str:
    """The summary: the counts, a row per stage, the failures, the benchmarks, the notes."""
    checks = [Check(**c) for c in data["checks"]]
    n = data["counts"]
    lines = [
        "# GPU check",
        "",
        f"`make gpu-check` (`tools/gpu_check.py`): {data.get('device', '?')}; "
        f"{data.get('versions', '')}; git {data.get('git', '?')}; {data['started']}; "
        f"{data['elapsed_s']} s of a {data['deadline_s']:.0f} s deadline.",
        "",
        f"**{n['passed']} passed, {n['failed']} failed, {n['not reached']} not reached**"
        + (f" ({n['skipped']} skipped)" if n["skipped"] else ""),
        "",
        "| stage | passed | failed | skipped | not reached | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        t = tally(c for c in checks if c.stage == stage)
        if sum(t.values()):
            secs = data["stage_seconds"].get(stage, "")
            lines.append(
                f"| {stage} | {t['passed']} | {t['failed']} | {t['skipped']} | "
                f"{t['not reached']} | {secs} |"
            )
    failed = [c for c in checks if c.status == "failed"]
    if failed:
        lines += ["", "## Failed", ""]
        lines += [f"- {c.stage}: `{c.name}` — {c.detail or 'no detail'}" for c in failed]
    done = [c for c in checks if c.stage in ("bench", "model") and c.status != "not reached"]
    if done:
        lines += ["", "## Model run and benchmarks", "", "| check | result |", "|---|---|"]
        lines += [f"| {c.stage}: {c.name} | {c.status}: {c.detail} |" for c in done]
    if data["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in data["notes"]]
    not_reached = [c for c in checks if c.status == "not reached"]
    if not_reached:
        lines += ["", f"Not reached: {len(not_reached)} checks, first "]
        lines[-1] += ", ".join(f"`{c.name}`" for c in not_reached[:5]) + "."
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# pytest: the items, their order, their results


# Stage ops: the files and tests that check the ops on the GPU, the slowest first (torch.compile
# with inductor), so that a worker does not start them last. The rest, GPU-heavy files first.
OPS_FIRST = (
    ("tests/ops/test_ops.py::test_compile_fullgraph_matches_eager_cuda", "cuda"),
    ("tests/ops/test_ops.py::test_opcheck_cuda", "cuda"),
    ("tests/ops/test_ops_cuda.py::", "cuda"),
    ("tests/kernels/test_kernels.py::", "interp"),
)
REST_ORDER = (
    "tests/kernels/test_kernels.py",
    "tests/kernels/test_kernel_configs.py",
    "tests/analysis/test_tune.py",
)


def partition(items: Sequence[tuple[str, set[str]]]) -> tuple[list[str], list[str]]:
    """(ops, rest) node ids from collected (node id, markers): ops in OPS_FIRST's order,
    the rest with REST_ORDER's files first and test_ops.py's CPU-tensor tests last."""
    ops: list[str] = []
    for prefix, mark in OPS_FIRST:
        ops += [i for i, marks in items if i.startswith(prefix) and mark in marks and i not in ops]
    chosen = set(ops)
    rest = [i for i, _ in items if i not in chosen]

    def rank(node: str) -> int:
        path = node.split("::")[0]
        if path in REST_ORDER:
            return REST_ORDER.index(path)
        return len(REST_ORDER) + (path == "tests/ops/test_ops.py")

    return ops, sorted(rest, key=rank)


_XDIST = re.compile(r"^\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (.+?)\s*$")
_SERIAL = re.compile(r"^(\S+::.+?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?: +\[\s*\d+%\])?$")
_SUMMARY = re.compile(r"^(FAILED|ERROR) (\S+::.+?)(?: - (.*))?$")
_CRASH = re.compile(r"worker '(gw\d+)' crashed while running '(.+)'")
_STATUS = {
    "PASSED": "passed",
    "XFAIL": "passed",
    "XPASS": "passed",
    "SKIPPED": "skipped",
    "FAILED": "failed",
    "ERROR": "failed",
}


def parse_pytest_line(line: str) -> tuple[str, str, str] | None:
    """(node id, status, detail) of a result line of `pytest -v` (with xdist or without),
    of the short summary (`-rfE`: the failure's message) or of a crashed xdist worker."""
    line = line.rstrip()
    if m := _XDIST.match(line):
        return m[2], _STATUS[m[1]], ""
    if m := _SERIAL.match(line):
        return m[1], _STATUS[m[2]], ""
    if m := _SUMMARY.match(line):
        return m[2], "failed", (m[3] or "").strip()
    if m := _CRASH.search(line):
        return m[2], "failed", f"xdist worker {m[1]} crashed running it"
    return None


# ---------------------------------------------------------------------------------------------
# Subprocesses


class Proc:
    """A subprocess in its own process group whose output lines go to `on_line` (a reader
    thread) and the log; `wait(timeout)` kills the whole group when the time is up."""

    def __init__(self, run: Run, tag: str, cmd: list[str], env: dict, on_line=None):
        self.run, self.tag, self.on_line = run, tag, on_line
        self.lines: list[str] = []
        self.started = time.perf_counter()
        self.ended: float | None = None  # when its output ended (it exited)
        self.killed = False
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        run.procs.append(self)

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            self.run.raw(self.tag, line)
            if self.on_line is not None:
                try:
                    self.on_line(line)
                except Exception as e:  # a parser bug must not stop the run
                    self.run.raw(self.tag, f"(gpu-check could not parse this line: {e!r})")
        self.ended = time.perf_counter()

    def wait(self, timeout: float, kill: bool = True) -> int | None:
        """The exit status, or None when the time was up (then killed, unless kill=False)."""
        try:
            rc = self.proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            if not kill:
                return None
            self.kill()
            rc = None
        self.reader.join(timeout=10)
        return rc

    def kill(self) -> None:
        self.killed = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    @property
    def seconds(self) -> float:
        """How long it ran (so far)."""
        return (self.ended or time.perf_counter()) - self.started


def child_env(autotune: bool, **extra: str) -> dict[str, str]:
    """The environment of every subprocess: the GPU path (no interpreter, no backend
    override), strict (a failing kernel raises), this tree importable, output unbuffered."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SVDKERN_BACKEND")}
    env.update(
        PYTHONUNBUFFERED="1",
        SVDKERN_STRICT="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TRITON_CACHE_DIR=str(triton_cache_dir()),
    )
    if autotune:
        env.pop("SVDKERN_AUTOTUNE", None)
    else:
        env["SVDKERN_AUTOTUNE"] = "0"
    env.update(extra)
    return env


def triton_cache_dir() -> Path:
    """TRITON_CACHE_DIR, or triton's default (~/.triton/cache, under TRITON_HOME if set)."""
    if os.environ.get("TRITON_CACHE_DIR"):
        return Path(os.environ["TRITON_CACHE_DIR"])
    return Path(os.environ.get("TRITON_HOME", str(Path.home()))) / ".triton" / "cache"


def cached_kernels(cache: Path) -> int:
    """Compiled kernels in a triton cache (an entry with a metadata group; launchers have none)."""
    if not cache.is_dir():
        return 0
    return sum(1 for d in cache.iterdir() if any(d.glob("__grp__*.json")))


def run_results(run: Run, stage: str, proc: Proc, timeout: float) -> None:
    """Wait for a subprocess that prints RESULT lines for `stage`'s planned checks; a check it
    did not report is not reached when the deadline stopped it, failed when it died."""
    rc = proc.wait(timeout)
    missing = run.unreported(stage)
    if rc not in (0, None) and missing:
        tail = " | ".join(proc.lines[-3:])[-400:]
        run.record(stage, missing[0].name, "failed", detail=f"the process exited {rc}: {tail}")
    elif rc is None and missing:
        run.note(f"{stage}: stopped at the deadline after {proc.seconds:.0f} s")


def on_result(run: Run, stage: str) -> Callable[[str], None]:
    def parse(line: str) -> None:
        if line.startswith(RESULT):
            r = json.loads(line[len(RESULT) :])
            run.record(stage, r["name"], r["status"], r["seconds"], r["detail"], r["values"])

    return parse


def run_pytest(run: Run, stage: str, ids: list[str], jobs: int, timeout: float) -> None:
    """The tests `ids` (already planned) with `jobs` xdist workers; a line per result."""
    if not ids:
        return
    reported: set[str] = set()

    def on_line(line: str) -> None:
        parsed = parse_pytest_line(line)
        if parsed is None:
            return
        node, status, detail = parsed
        if (stage, node) not in run.checks:
            return
        if node in reported:  # the short summary after the result line: add the message
            if detail and status == "failed":
                run.checks[(stage, node)].detail = detail
                run.write()
            return
        reported.add(node)
        run.record(stage, node, status, detail=detail)

    junit = Path(tempfile.mkdtemp(prefix="gpu-check-")) / f"{stage}.xml"
    cmd = [sys.executable, "-m", "pytest", "-v", "--tb=short", "-rfE", "-p", "no:cacheprovider"]
    cmd += ["-n", str(jobs)] if jobs > 1 and _has_xdist() else []
    cmd += [f"--junitxml={junit}"]
    start = run.elapsed()
    proc = Proc(run, stage, cmd + ids, child_env(autotune=False, OMP_NUM_THREADS="1"), on_line)
    rc = proc.wait(timeout)
    missing = run.unreported(stage)
    if missing and rc is not None:  # pytest ended: what its lines did not say, its XML does
        results = junit_results(junit) if junit.exists() else {}
        for c in missing:
            status, detail = results.get(c.name, ("failed", f"pytest exited {rc} without it"))
            run.record(stage, c.name, status, detail=detail)
    run.stage_seconds[stage] = run.elapsed() - start
    t = tally(c for c in run.checks.values() if c.stage == stage)
    run.note(
        f"{stage}: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped, "
        f"{t['not reached']} not reached in {run.stage_seconds[stage]:.0f} s "
        f"({jobs} processes)"
    )


def junit_results(path: Path) -> dict[str, tuple[str, str]]:
    """node id → (status, detail) from pytest's JUnit XML (test functions of tests/ files)."""
    import xml.etree.ElementTree as ET

    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        node = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
        bad = case.find("failure")
        bad = bad if bad is not None else case.find("error")
        if bad is not None:
            out[node] = (
                "failed",
                (bad.get("message") or "").splitlines()[0][:300] if bad.get("message") else "",
            )
        elif case.find("skipped") is not None:
            out[node] = ("skipped", (case.find("skipped").get("message") or "")[:300])
        else:
            out[node] = ("passed", "")
    return out


def _has_xdist() -> bool:
    import importlib.util

    return importlib.util.find_spec("xdist") is not None


# ---------------------------------------------------------------------------------------------
# The extension


def sources_stamp() -> str:
    """What svdkern._C is built from: the C++ sources and setup.py, torch's version (without
    the local +cuXXX label: the extension has no CUDA code) and Python's."""
    import torch

    h = hashlib.sha1()
    for path in sorted(
        [ROOT / "setup.py", *(ROOT / "csrc").rglob("*.cpp"), *(ROOT / "csrc").rglob("*.h")]
    ):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    python = ".".join(map(str, sys.version_info[:2]))
    return f"{h.hexdigest()} torch {torch.__version__.split('+')[0]}, Python {python}"


def _imports(env: dict) -> bool:
    code = "import torch, importlib; importlib.import_module('svdkern._C')"
    return (
        subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True
        ).returncode
        == 0
    )


def build_extension(run: Run, jobs: int) -> bool:
    """Reuse svdkern._C when it imports and was built from these sources (the stamp), else
    build it in place with ninja in `jobs` processes (incremental where build/ survived)."""
    start = time.perf_counter()
    env = child_env(autotune=False)
    stamp = sources_stamp()
    if STAMP.exists() and STAMP.read_text().strip() == stamp and _imports(env):
        detail = "svdkern._C, built from these sources (a prebuilt one), imports: not rebuilt"
        run.record("build", "extension", "passed", time.perf_counter() - start, detail)
        run.stage_seconds["build"] = time.perf_counter() - start
        return True
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    proc = Proc(run, "build", cmd, {**env, "MAX_JOBS": str(jobs)})
    rc = proc.wait(run.timeout("build"))
    seconds = time.perf_counter() - start
    run.stage_seconds["build"] = seconds
    if rc == 0 and _imports(env):
        STAMP.parent.mkdir(exist_ok=True)
        STAMP.write_text(stamp + "\n")
        run.record("build", "extension", "passed", seconds, f"built with MAX_JOBS={jobs}")
        return True
    why = (
        "stopped at the deadline"
        if rc is None
        else f"exit {rc}: {' | '.join(proc.lines[-3:])[-400:]}"
    )
    run.record("build", "extension", "failed", seconds, why)
    return False


# ---------------------------------------------------------------------------------------------
# The orchestrator


def _device_line() -> tuple[str, str, int]:
    import torch
    import triton

    props = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability(0)
    memory, sms = props.total_memory / 2**30, props.multi_processor_count
    device = f"{props.name} (sm_{major}{minor}, {memory:.0f} GiB, {sms} SMs)"
    versions = (
        f"torch {torch.__version__}, triton {triton.__version__}, Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs"
    )
    return device, versions, major * 10 + minor


def _triton_key() -> str:
    """A digest of triton's own cache-key part (its version, sources and libtriton): equal
    digests on two machines mean equal wheels (compare with `make gpu-cache`'s)."""
    from triton.runtime.cache import triton_key

    return hashlib.sha256(triton_key().encode()).hexdigest()[:16]


def _git_sha() -> str:
    """The short sha of HEAD, with -dirty when tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    try:
        sha = git("rev-parse", "--short", "HEAD").strip() or "unknown"
        return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except OSError:
        return "unknown"


def _collected(proc: Proc) -> list[tuple[str, set[str]]]:
    items = []
    for line in proc.lines:
        if line.startswith("ITEM "):
            _, marks, node = line.split(" ", 2)
            items.append((node, set(marks.split(",")) - {"-"}))
    return items


def orchestrate(run: Run, jobs: int) -> None:
    device, versions, arch = _device_line()
    run.meta.update(device=device, versions=versions, git=_git_sha(), jobs=jobs)
    run.say(f"{device}; {versions}; git {run.meta['git']}; deadline {run.deadline_s:.0f} s")
    cache = triton_cache_dir()
    run.meta.update(triton_cache=str(cache), triton_key=_triton_key())
    before = cached_kernels(cache)
    if SEED.is_dir():
        shutil.copytree(SEED, cache, dirs_exist_ok=True)
        seeded = cached_kernels(cache) - before
        run.note(f"seeded triton's cache with {seeded} kernels compiled offline ({SEED.name})")
    run.plan("build", ["extension"])
    run.plan("model", MODEL_CHECKS)
    run.plan("bench", BENCH_CHECKS)

    # Beside the build (3 C++ files): the kernels compiled into triton's cache, and the tests
    # collected (their node ids and markers).
    tool = [sys.executable, str(ROOT / "tools" / "kernel_check.py")]
    # the tests' kernels are needed first: most of the cores the build leaves go to them
    warm_jobs = {"gpu-check": max(1, jobs - 7), "gpu-check-bench": max(1, min(4, jobs // 4))}
    warm = {
        name: Proc(
            run,
            f"warm {name}",
            [*tool, "--warm", name, "--arch", str(arch), "--jobs", str(n)],
            child_env(autotune=name.endswith("bench")),
        )
        for name, n in warm_jobs.items()
    }
    collect = Proc(
        run,
        "collect",
        [sys.executable, str(Path(__file__)), "--collect"],
        child_env(autotune=False),
    )
    built = build_extension(run, jobs)
    collect.wait(run.timeout("warm", collect.seconds))
    ops_ids, rest_ids = partition(_collected(collect))
    run.plan("ops", ops_ids)
    run.plan("rest", rest_ids)
    if not ops_ids:
        run.record("ops", "collect", "failed", detail=" | ".join(collect.lines[-3:])[-400:])
    if not built:
        for w in warm.values():
            w.kill()
        return
    _finish_warm(run, "gpu-check", warm["gpu-check"], cache, before)

    # ops and the model run together (correctness only: they may share the GPU)
    model = _stage_proc(run, "model", autotune=False)
    mark, alone = cached_kernels(cache), warm["gpu-check-bench"].proc.poll() is not None
    run_pytest(run, "ops", ops_ids, jobs, run.timeout("ops"))
    run_results(run, "model", model, run.timeout("model", model.seconds))
    run.stage_seconds["model"] = model.seconds
    run.note(
        f"ops and model: {cached_kernels(cache) - mark} kernels added to triton's cache during "
        "them (compiled: not warmed, or missed"
        + (")" if alone else "; with the benchmarks' kernels, still being warmed)")
    )

    _finish_warm(run, "gpu-check-bench", warm["gpu-check-bench"], cache, None)
    if run.timeout("bench") > 5:
        mark = cached_kernels(cache)
        bench = _stage_proc(run, "bench", autotune=True)
        run_results(run, "bench", bench, run.timeout("bench"))
        run.stage_seconds["bench"] = bench.seconds
        added = cached_kernels(cache) - mark
        run.note(
            f"bench: {added} kernels added to triton's cache during it (svdkern's, inductor's)"
        )
    if run.timeout("rest") > 10:
        run_pytest(run, "rest", rest_ids, jobs, run.timeout("rest"))


def _stage_proc(run: Run, stage: str, autotune: bool) -> Proc:
    """`--stage model|bench` of this script, its RESULT lines recorded as they come."""
    cmd = [sys.executable, str(Path(__file__)), "--stage", stage]
    return Proc(run, stage, cmd, child_env(autotune=autotune), on_result(run, stage))


def _finish_warm(run: Run, name: str, proc: Proc, cache: Path, before: int | None) -> None:
    """Wait for a warm process up to the warm cap (past it, it goes on compiling beside the
    tests, which compile what they need themselves) and note what it did."""
    rc = proc.wait(run.timeout("warm", proc.seconds), kill=False)
    if rc is None:
        run.note(f"warm {name}: still compiling after {proc.seconds:.0f} s; not waited for")
        return
    result = next((json.loads(line) for line in reversed(proc.lines) if line.startswith("{")), None)
    if result is None:
        run.note(
            f"warm {name}: exited {rc} without a result: " + " | ".join(proc.lines[-2:])[-300:]
        )
        return
    text = (
        f"warm {name}: {result['variants']} kernel variants in {result['wall_seconds']:.0f} s "
        f"({result['jobs']} processes, {result['compile_seconds']:.0f} s in triton.compile): "
        f"{result['cache_hits']} were in triton's cache, {result['failed']} failed"
    )
    if before is not None:
        text += f" ({before} kernels were in the cache before this run)"
    if result["compile_errors"]:
        text += f"; first error: {result['compile_errors'][0][:200]}"
    run.note(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deadline-s", type=float, default=DEADLINE_S)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, help="default: $OUT, else bench/results")
    parser.add_argument("--stage", choices=("model", "bench"), help=argparse.SUPPRESS)
    parser.add_argument("--collect", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--stamp", action="store_true", help="record svdkern._C as built from these sources"
    )
    args = parser.parse_args(argv)
    if args.collect:
        return collect_main()
    if args.stamp:
        STAMP.parent.mkdir(exist_ok=True)
        STAMP.write_text(sources_stamp() + "\n")
        print(f"gpu-check: {STAMP.relative_to(ROOT)}: {STAMP.read_text().strip()}")
        return 0

    import torch

    if not torch.cuda.is_available():
        print(
            f"gpu-check: needs a CUDA device, and torch {torch.__version__} sees none "
            "(torch.cuda.is_available() is False); run it on a GPU machine: "
            "make gpu-check PYTHON=python3",
            file=sys.stderr,
        )
        return 2
    if args.stage:
        return stage_main(args.stage)
    out = args.out or Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    run = Run(out, args.deadline_s)
    try:
        orchestrate(run, args.jobs)
    except Exception:
        run.note("gpu-check itself failed: " + traceback.format_exc()[-1500:])
        run.record("build", "gpu-check", "failed", detail=traceback.format_exc().splitlines()[-1])
    finally:
        run.close()
    return exit_status(run.checks.values())


def exit_status(checks: Iterable[Check]) -> int:
    """1 when a check failed or one of the stages that prove the kernels (build, ops, model)
    was not reached; the benchmarks and the rest may run out of time by design."""
    checks = list(checks)
    failed = any(c.status == "failed" for c in checks)
    missed = any(c.status == "not reached" and c.stage in ("build", "ops", "model") for c in checks)
    return 1 if failed or missed else 0


def collect_main() -> int:
    """The `cuda` and `interp` tests: a line `ITEM <markers> <node id>` each."""
    import pytest

    class Lister:
        def pytest_collection_finish(self, session):
            for item in session.items:
                marks = {m.name for m in item.iter_markers()} & {"cuda", "interp", "slow"}
                print(f"ITEM {','.join(sorted(marks)) or '-'} {item.nodeid}", flush=True)

    args = ["--collect-only", "-q", "-p", "no:cacheprovider", "-m", "cuda or interp", "tests"]
    return pytest.main(args, plugins=[Lister()])


# ---------------------------------------------------------------------------------------------
# The model and bench stages (each in its own process: `--stage model|bench`)


def emit(name: str, status: str, seconds: float, detail: str = "", values: dict | None = None):
    record = {"name": name, "status": status, "seconds": round(seconds, 2), "detail": detail}
    print(RESULT + json.dumps({**record, "values": values or {}}), flush=True)


def stage_main(stage: str, device: str = "cuda") -> int:
    """Run a stage's checks in order, a RESULT line each (the model stage stops at the first
    step that raises: the later ones build on it)."""
    sys.path.insert(0, str(ROOT))
    checks = MODEL_CHECKS if stage == "model" else BENCH_CHECKS
    steps = model_steps(device) if stage == "model" else bench_steps()
    for name, step in zip(checks, steps):
        start = time.perf_counter()
        try:
            ok, detail, values = step()
        except Exception as e:
            emit(name, "failed", time.perf_counter() - start, _error(e))
            if stage == "model":
                return 1
            continue
        emit(name, "passed" if ok else "failed", time.perf_counter() - start, detail, values)
    return 0


def _error(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}{where}"


def rel_err(a, b, floor: float = 1e-12) -> float:
    """max |a − b| / max(max |b|, floor)."""
    a, b = a.detach().double(), b.detach().double()
    if not b.numel():
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item()


class _Pipeline:
    """ResNet-20 in fp32: decompose → 3 SGD steps (MODEL_LR) with the regularizer (grouped
    compose) → prune (energy 0.05) → compress (flops) → torch.export, each phase a method;
    every op through svdkern's kernels, or with reference_path through svdkern.reference."""

    def __init__(self, dense, data: dict, reference_path: bool) -> None:
        self.dense, self.data, self.reference_path = dense, data, reference_path
        self.out: dict = {}

    def _ctx(self):
        from svdkern import ops

        return ops.reference_mode() if self.reference_path else contextlib.nullcontext()

    def decompose(self) -> None:
        import torch

        import svdkern

        with self._ctx(), torch.no_grad():
            self.model = copy.deepcopy(self.dense).eval()
            svdkern.decompose(self.model, skip=["fc"])
            self.out["dense"] = self.dense.eval()(self.data["x_eval"])
            self.out["decomposed"] = self.model(self.data["x_eval"])

    def train(self) -> None:
        import torch
        import torch.nn.functional as F

        import svdkern

        model, x, y = self.model.train(), self.data["x"], self.data["y"]
        reg = svdkern.SVDRegularizer(model, orth=1.0, sparsity="hoyer", strength=0.07)
        opt = torch.optim.SGD(model.parameters(), lr=MODEL_LR)
        self.out["losses"] = []
        with self._ctx():
            for _ in range(3):
                with svdkern.grouped_compose(model):
                    loss = F.cross_entropy(model(x), y)
                loss = loss + reg(model)["total"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self.out["losses"].append(loss.detach())
        self.out["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def prune(self) -> None:
        import torch

        import svdkern

        with self._ctx():
            report = svdkern.prune(self.model, energy=0.05, input_shape=(1, 3, 32, 32))
            self.out["ranks"] = {layer.name: layer.rank_after for layer in report.layers}
            with torch.no_grad():
                self.out["pruned"] = self.model.eval()(self.data["x_eval"])

    def compress(self) -> None:
        import torch

        import svdkern

        with self._ctx(), torch.no_grad():
            self.deployed = svdkern.compress(self.model, input_shape=(1, 3, 32, 32)).eval()
            self.out["compressed"] = self.deployed(self.data["x_eval"])

    def export(self) -> None:
        import torch

        exported = torch.export.export(self.deployed, (self.data["x_eval"],))
        with torch.no_grad():
            self.out["exported"] = exported.module()(self.data["x_eval"])


def model_steps(device: str = "cuda") -> list[Callable[[], tuple[bool, str, dict]]]:
    """The five model checks in MODEL_CHECKS' order: each runs one phase of the svdkern run
    and of the reference run (same weights, same data, on `device`), then compares them."""
    import torch

    from svdkern.train.models import build_model

    if device == "cuda":  # fp32 everywhere: TF32 convs would round W's last bits apart
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.manual_seed(0)
    dense = build_model("resnet20", (3, 32, 32), 10).to(device)
    data = {
        "x": torch.randn(32, 3, 32, 32, device=device),
        "y": torch.randint(0, 10, (32,), device=device),
        "x_eval": torch.randn(8, 3, 32, 32, device=device),
    }
    ours, ref = _Pipeline(dense, data, False), _Pipeline(dense, data, True)

    def phase(name: str) -> tuple[dict, dict]:
        getattr(ours, name)()
        getattr(ref, name)()
        return ours.out, ref.out

    def verdict(errors: dict[str, float], tols: dict[str, float]) -> tuple[bool, str, dict]:
        text = ", ".join(f"{k} {v:.1e} (≤ {tols[k]:.0e})" for k, v in errors.items())
        return all(v <= tols[k] for k, v in errors.items()), f"relative error {text}", errors

    def decompose():
        a, b = phase("decompose")
        errors = {
            "svdkern": rel_err(a["decomposed"], a["dense"]),
            "reference path": rel_err(b["decomposed"], b["dense"]),
        }
        return verdict(errors, dict.fromkeys(errors, MODEL_TOL["decompose"]))

    def train():
        a, b = phase("train")
        floats = [k for k, v in b["state"].items() if v.is_floating_point()]
        errors = {
            "losses": max(rel_err(x, y) for x, y in zip(a["losses"], b["losses"])),
            "parameters": max(rel_err(a["state"][k], b["state"][k], 1.0) for k in floats),
        }
        ok, text, values = verdict(errors, MODEL_TOL)
        return ok, text + "; losses " + ", ".join(f"{v.item():.4f}" for v in a["losses"]), values

    def prune():
        a, b = phase("prune")
        differ = {
            k: (v, b["ranks"].get(k)) for k, v in a["ranks"].items() if b["ranks"].get(k) != v
        }
        text = f"{len(a['ranks'])} layers, total rank {sum(a['ranks'].values())}"
        if differ:
            text += f"; differ (svdkern, reference): {differ}"
        return not differ, text, {"ranks": a["ranks"]}

    def compress():
        a, b = phase("compress")
        errors = {
            "compress": rel_err(a["compressed"], a["pruned"]),
            "paths": rel_err(a["compressed"], b["compressed"]),
        }
        return verdict(errors, MODEL_TOL)

    def export():
        a, _ = phase("export")
        return verdict({"export": rel_err(a["exported"], a["compressed"])}, MODEL_TOL)

    return [decompose, train, prune, compress, export]


def _op_ms(fn, inputs, mode: str) -> float:
    """Median ms of fn on inputs: forward (no grad) or full (forward + backward of ones), as
    bench/bench_ops_gpu.py times them, after one call outside the timing (autotuning)."""
    import torch

    from bench.bench_ops_gpu import _bench, _outputs

    leaves = [t.detach().requires_grad_(mode != "forward") for t in inputs]

    def step():
        if mode == "forward":
            with torch.no_grad():
                return fn(*leaves)
        outs = _outputs(fn(*leaves))
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return None

    step()
    return _bench(step, leaves, smoke=False)[0]


def _vs(what: str, value: float, target: str, ok: bool) -> str:
    """A ratio against its BENCHMARKS.md target: 'speedup 1.23× (target ≥ 1.1: met)'."""
    return f"{what} {value:.2f}× (target {target}: {'met' if ok else 'missed'})"


def _measured(ratios: list[str], ms: dict[str, float]) -> tuple[bool, str, dict]:
    """A benchmark's result: measured (it passes), its ratios and times in the detail."""
    times = ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
    return True, "; ".join([*ratios, times]), {f"{k} ms": v for k, v in ms.items()}


def bench_steps() -> list[Callable[[], tuple[bool, str, dict]]]:
    """The six headline benchmarks in BENCH_CHECKS' order. A benchmark passes when it was
    measured; whether it meets its BENCHMARKS.md target is in its detail."""
    import torch
    import triton.testing

    from bench import bench_ops_gpu as ob
    from bench.steps import make_step, scenario

    def case(op: str, name: str):
        return next(c for c in ob._cases("cuda", False, [op]) if c.name.startswith(name))

    ms: dict[str, float] = {}  # times shared by the eager and compiled comparisons

    def compose():
        c = case("compose", "M4096-N4096-R4096")
        t = {p: _op_ms(c.fns[p], c.inputs, "forward") for p in ("svdkern", "torch.matmul")}
        ratio = t["torch.matmul"] / t["svdkern"]
        return _measured([_vs("throughput vs torch.matmul", ratio, "≥ 0.85", ratio >= 0.85)], t)

    def lowrank():
        c = case("lowrank_linear", "rows16384-N4096-M4096-R128")
        t = {p: _op_ms(c.fns[p], c.inputs, "full") for p in ("svdkern", "reference")}
        t["traffic floor"] = c.bytes["full"] / ob._copy_bandwidth("cuda") * 1e3
        speedup, floor = t["reference"] / t["svdkern"], t["svdkern"] / t["traffic floor"]
        return _measured(
            [
                _vs("speedup over the unfused chain", speedup, "≥ 1.1", speedup >= 1.1),
                _vs("time vs the traffic floor", floor, "≤ 1.25", floor <= 1.25),
            ],
            t,
        )

    def orth_eager():
        c = case("orth_loss", "resnet50")
        t = {p: _op_ms(c.fns[p], c.inputs, "full") for p in ("svdkern", "reference")}
        ms["orth svdkern"] = t["svdkern"]
        speedup = t["reference"] / t["svdkern"]
        return _measured(
            [_vs("speedup over the eager reference", speedup, "≥ 10", speedup >= 10)], t
        )

    def steps(providers: list[str]) -> dict[str, float]:
        sc = scenario("resnet20", 128, torch.bfloat16)
        for provider in providers:
            if provider not in ms:
                step = make_step(sc, provider, "cuda", "inductor")
                for _ in range(3):  # autotuning, torch.compile
                    step()
                ms[provider] = triton.testing.do_bench(step, warmup=25, rep=100)
                del step
                torch.cuda.empty_cache()
        return {p: ms[p] for p in providers}

    def train_eager():
        t = steps(["dense", "svdkern", "reference"])
        vs_dense, vs_ref = t["svdkern"] / t["dense"], t["svdkern"] / t["reference"]
        return _measured(
            [
                _vs("time vs dense", vs_dense, "≤ 1.10", vs_dense <= 1.10),
                _vs("time vs the plain-PyTorch SVD step", vs_ref, "≤ 0.7", vs_ref <= 0.7),
            ],
            t,
        )

    def orth_compiled():
        c = case("orth_loss", "resnet50")
        ours = ms.get("orth svdkern") or _op_ms(c.fns["svdkern"], c.inputs, "full")
        compiled = _op_ms(torch.compile(c.fns["reference"]), c.inputs, "full")
        t = {"svdkern": ours, "compiled reference": compiled}
        return _measured(
            [_vs("speedup over the compiled reference", compiled / ours, "> 1", compiled > ours)], t
        )

    def train_compiled():
        t = steps(["svdkern", "compiled-reference"])
        ratio = t["svdkern"] / t["compiled-reference"]
        return _measured(
            [_vs("time vs the compiled plain-PyTorch SVD step", ratio, "< 1", ratio < 1)], t
        )

    return [compose, lowrank, orth_eager, train_eager, orth_compiled, train_compiled]


if __name__ == "__main__":
    sys.exit(main())
