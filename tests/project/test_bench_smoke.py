"""The benchmark files still run, on tiny sizes, untimed, writing no results: every CPU
benchmark once, and the GPU scripts' --smoke (on the CPU where there is no GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import INTERP_BUG, interpreter_skip_reason

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _probe_interpreter_in_subprocess() -> None:
    """tests/conftest.py's interpreter probe under TRITON_INTERPRET=1 (read at import)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "import conftest; conftest._probe_interpreter()"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT / "tests", env=env, capture_output=True, text=True
    )
    if INTERP_BUG in out.stderr:
        raise TypeError(INTERP_BUG)


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
    if script.endswith("ops_gpu.py"):  # its --smoke runs the kernels in the interpreter
        import numpy as np
        import triton

        reason = interpreter_skip_reason(
            triton.__version__, np.__version__, _probe_interpreter_in_subprocess
        )
        if reason is not None:
            pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SVDKERN_BACKEND")}
    before = sorted((ROOT / "bench" / "results").glob("*.csv"))
    out = subprocess.run(
        [sys.executable, script, "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "svdkern" in out.stdout
    assert sorted((ROOT / "bench" / "results").glob("*.csv")) == before


def _rows(device="H100", date="2026-01-01T00:00:00Z", **groups):
    """Result rows: groups maps a scenario to {provider: median_ms}."""
    meta = {"device": device, "torch": "2.11", "triton": "3.6", "git_sha": "x", "date": date}
    return [
        {"scenario": s, "batch": "8", "dtype": "bf16", "provider": p, "median_ms": str(ms), **meta}
        for s, times in groups.items()
        for p, ms in times.items()
    ]


def test_report_headline_evaluates_targets_from_rows():
    from bench.make_report import Target, evaluate, headline

    rows = _rows(a={"svdkern": 1.0, "dense": 2.0, "trp": 30.0}, b={"svdkern": 3.0, "dense": 2.0})
    rows += _rows(date="2025-01-01T00:00:00Z", a={"svdkern": 9.0, "dense": 1.0})  # older run
    results = {"train_gpu": rows}
    worst = Target("every model ≤ 1.1× dense", "train_gpu", {"dtype": "bf16"}, 1.1,
                   baseline="dense", group_by=("scenario", "batch"))  # fmt: skip
    (o,) = evaluate(worst, results)
    assert (o.ratio, o.met, o.group, o.device, o.date) == (1.5, False, "b 8", "H100", "2026-01-01")
    fast = Target("a ≥ 20× trp", "train_gpu", {"scenario": "a"}, 20.0, kind="speedup",
                  baseline="trp")  # fmt: skip
    (o,) = evaluate(fast, results)
    assert o.ratio == 30.0 and o.met
    absent = Target("x", "ops_gpu", {"op": "compose"}, 1.0, baseline="reference")
    (o,) = evaluate(absent, results)
    assert o.ratio is None
    prefix = Target("b*", "train_gpu", {"scenario": "b*"}, 1.6, baseline="dense")
    assert evaluate(prefix, results)[0].met
    lines = headline(results, [worst, fast, absent])
    assert "| every model ≤ 1.1× dense | 1.5× (worst: b 8) | **missed** | H100 |" in lines[2]
    assert "| met |" in lines[3] and "| not measured |" in lines[4]


def test_report_tables_have_the_fixed_columns():
    from bench.make_report import result_table

    lines = result_table(_rows(a={"dense": 2.0, "svdkern": 3.0}), "dense")
    assert lines[0] == "| op | shape | dtype | provider | ms | ratio |"
    assert lines[3] == "| train step | a batch=8 | bf16 | svdkern | 3 | 1.5 |"


def test_training_run_table_shows_seed_accuracy_and_macs_and_worst_seed():
    from bench.make_report import TARGETS, evaluate, result_table

    meta = {"device": "cpu", "torch": "2.13", "triton": "3.9", "git_sha": "x", "date": "d"}
    rows = [
        {"scenario": "digits-cnn", "method": "svd-adaptive", "seed": str(seed), "provider": p,
         "train_seconds": str(t), "vs_dense": str(t / 10), "accuracy": "0.99", "macs": str(m),
         **meta}
        for seed, t_adaptive in ((0, 9.0), (1, 10.5), (2, 8.0))
        for p, t, m in (("dense", 10.0, 1189504), ("adaptive", t_adaptive, 201024))
    ]  # fmt: skip
    lines = result_table(rows, "dense", "e2e_cpu")
    assert lines[0] == "| op | shape | dtype | provider | ms | ratio | accuracy | macs |"
    assert lines[3] == (
        "| training run | digits-cnn method=svd-adaptive seed=0 |  | adaptive | 9000 | 0.9 "
        "| 0.99 | 201024 |"
    )
    digits, lm = [t for t in TARGETS if t.csv == "e2e_cpu"]
    (o,) = evaluate(digits, {"e2e_cpu": rows})
    assert (o.ratio, o.met, o.group) == (1.05, False, "1")
    text = [{**r, "scenario": "text-gpt2-tiny", "bits_per_byte": "2.9"} for r in rows]
    (o,) = evaluate(lm, {"e2e_cpu": rows + text})
    assert (o.ratio, o.met, o.group) == (1.05, False, "1")  # against 0.8: the same seed 1
    assert "bits_per_byte" in result_table(text, "dense", "e2e_cpu")[0]


def test_results_csv_widens_when_a_benchmark_gains_a_column(tmp_path, monkeypatch):
    import csv

    from bench import _results

    monkeypatch.setattr(_results, "RESULTS", tmp_path)
    _results.append_rows("t", [{"provider": "a", "ms": 1.0}])
    _results.append_rows("t", [{"provider": "b", "ms": 2.0, "vs_new": 0.5}])
    _results.append_rows("t", [{"provider": "c", "ms": 3.0}])
    with (tmp_path / "t.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["provider"] for r in rows] == ["a", "b", "c"]
    assert [r["vs_new"] for r in rows] == ["", "0.5", ""]
    assert all(r["git_sha"] and r["date"] for r in rows)


def test_results_sha_is_marked_dirty_when_code_differs_from_head(tmp_path, monkeypatch):
    from bench import _results

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "bench" / "results" / "t.csv").write_text("ms\n1.0\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    monkeypatch.setattr(_results, "RESULTS", tmp_path / "bench" / "results")
    sha = _results._git_sha()
    assert sha and not sha.endswith("-dirty")
    # The benchmarks append to their CSVs while they run: that is not a code change.
    (tmp_path / "bench" / "results" / "t.csv").write_text("ms\n1.0\n2.0\n")
    assert _results._git_sha() == sha
    (tmp_path / "code.py").write_text("x = 2\n")
    assert _results._git_sha() == f"{sha}-dirty"
