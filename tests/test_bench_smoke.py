"""The benchmark files still run: every CPU benchmark once, on tiny sizes, untimed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_cpu_benchmarks_run_on_tiny_sizes(tmp_path):
    env = {**os.environ, "SVDKERN_BENCH_SMOKE": "1"}
    env.pop("TRITON_INTERPRET", None)
    env.pop("SVDKERN_BACKEND", None)
    before = sorted((ROOT / "bench" / "results").glob("*.csv"))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "bench",
        "--benchmark-disable",
        "-p",
        "no:cacheprovider",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout
    assert sorted((ROOT / "bench" / "results").glob("*.csv")) == before  # smoke writes nothing


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench/bench_ops_gpu.py", "bench/bench_train_gpu.py"])
def test_gpu_benchmark_scripts_run_on_tiny_sizes(script):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SVDKERN_BACKEND")}
    before = sorted((ROOT / "bench" / "results").glob("*.csv"))
    out = subprocess.run(
        [sys.executable, script, "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "svdkern" in out.stdout
    assert sorted((ROOT / "bench" / "results").glob("*.csv")) == before
