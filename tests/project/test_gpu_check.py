"""`make gpu-check` (tools/gpu_check.py) without a GPU: it stops at once without CUDA; its
plan (which tests run first), the parsing of pytest's lines, the record with its summary
and last line, the deadline that stops a stage, the exit status; and the model run of its
second stage, on the CPU (the C++ kernels against the reference path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check as gc  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_without_cuda_it_stops_at_once_with_exit_2_and_writes_nothing(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path)}
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "gpu-check: needs a CUDA device" in out.stderr
    assert time.monotonic() - start < 60  # the time to import torch, nothing more
    assert list(tmp_path.iterdir()) == []


def test_the_ops_tests_run_first_slowest_first_and_the_rest_gpu_files_first():
    items = [
        ("tests/ops/test_ops.py::test_compose_matches_reference[fp32-M1-N1-R1]", {"interp"}),
        ("tests/ops/test_ops.py::test_opcheck_cuda[compose]", {"cuda"}),
        ("tests/kernels/test_kernels.py::test_compose_cuda_large[fp32-M1024]", {"cuda"}),
        ("tests/kernels/test_kernels.py::test_compose_matches_reference[M37-fp32]", {"interp"}),
        ("tests/ops/test_ops_cuda.py::test_compose_cuda_matches_reference[M37-fp16]", {"cuda"}),
        ("tests/ops/test_ops.py::test_compile_fullgraph_matches_eager_cuda[inductor]", {"cuda"}),
        ("tests/analysis/test_tune.py::test_tuning_on_cuda", {"cuda"}),
        ("tests/ops/test_fallback.py::test_failing_kernels_fall_back", {"interp"}),
    ]
    ops, rest = gc.partition(items)
    assert ops == [
        "tests/ops/test_ops.py::test_compile_fullgraph_matches_eager_cuda[inductor]",
        "tests/ops/test_ops.py::test_opcheck_cuda[compose]",
        "tests/ops/test_ops_cuda.py::test_compose_cuda_matches_reference[M37-fp16]",
        "tests/kernels/test_kernels.py::test_compose_matches_reference[M37-fp32]",
    ]
    assert rest == [
        "tests/kernels/test_kernels.py::test_compose_cuda_large[fp32-M1024]",
        "tests/analysis/test_tune.py::test_tuning_on_cuda",
        "tests/ops/test_fallback.py::test_failing_kernels_fall_back",
        "tests/ops/test_ops.py::test_compose_matches_reference[fp32-M1-N1-R1]",  # CPU tensors: last
    ]


NODE = "tests/kernels/test_kernels.py::test_y[bf16]"
OPCHECK = "tests/ops/test_ops.py::test_opcheck_cuda[compose]"
CRASH = "[gw5] node down: Not properly terminated\nreplacing crashed worker gw5\n"
CRASH += f"worker 'gw5' crashed while running '{OPCHECK}'"


@pytest.mark.parametrize(
    "line, parsed",
    [
        pytest.param(f"[gw3] [ 12%] PASSED {NODE} ", (NODE, "passed", ""), id="xdist-pass"),
        pytest.param(
            "[gw0] [100%] SKIPPED tests/kernels/test_kernels.py::test_x[a b] ",
            ("tests/kernels/test_kernels.py::test_x[a b]", "skipped", ""),
            id="xdist-skip-id-with-a-space",
        ),
        pytest.param(f"{NODE} FAILED              [ 50%]", (NODE, "failed", ""), id="serial-fail"),
        pytest.param(
            f"FAILED {NODE} - AssertionError: not close!",
            (NODE, "failed", "AssertionError: not close!"),
            id="summary",
        ),
        pytest.param(CRASH, (OPCHECK, "failed", "xdist worker gw5 crashed running it"), id="crash"),
        pytest.param("collected 53 items", None, id="other"),
        pytest.param("tests/ops/test_ops.py:12: in test_x", None, id="traceback"),
    ],
)
def test_pytest_result_lines_are_parsed(line, parsed):
    assert gc.parse_pytest_line(line.splitlines()[-1]) == parsed


def test_junit_xml_gives_what_the_lines_did_not(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.ops.test_ops_cuda" name="test_a[fp32]"/>'
        '<testcase classname="tests.ops.test_ops_cuda" name="test_b[bf16]">'
        '<failure message="AssertionError: off&#10;second line">tb</failure></testcase>'
        '<testcase classname="tests.analysis.test_tune" name="test_c">'
        '<skipped message="no GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    assert gc.junit_results(xml) == {
        "tests/ops/test_ops_cuda.py::test_a[fp32]": ("passed", ""),
        "tests/ops/test_ops_cuda.py::test_b[bf16]": ("failed", "AssertionError: off"),
        "tests/analysis/test_tune.py::test_c": ("skipped", "no GPU"),
    }


def test_the_record_writes_json_and_summary_after_each_result_and_ends_with_the_counts(
    tmp_path, capsys
):
    clock = Clock()
    run = gc.Run(tmp_path, deadline_s=100, clock=clock)
    run.plan("ops", ["t1", "t2", "t3", "t4"])
    run.plan("bench", gc.BENCH_CHECKS[:1])
    clock.now = 12.5
    run.record("ops", "t1", "passed")
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["counts"] == {"passed": 1, "failed": 0, "skipped": 0, "not reached": 4}
    run.record("ops", "t2", "failed", detail="AssertionError: off by 1")
    run.record("ops", "t3", "skipped")
    run.record("bench", gc.BENCH_CHECKS[0], "passed", 3.0, "throughput vs torch.matmul 0.91×")
    run.note("warm gpu-check: 137 kernel variants compiled")
    run.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "gpu-check [  12.5s] PASS ops: t1"
    assert lines[-1] == "gpu-check [  12.5s] gpu-check: 2 passed, 1 failed, 1 not reached"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(gc.FILES)
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "**2 passed, 1 failed, 1 not reached** (1 skipped)" in summary
    assert "| ops | 1 | 1 | 1 | 1 |" in summary
    assert "- ops: `t2` — AssertionError: off by 1" in summary
    assert "throughput vs torch.matmul 0.91×" in summary
    assert "warm gpu-check: 137 kernel variants compiled" in summary
    log = (tmp_path / "gpu_check.log").read_text()
    assert "FAIL ops: t2 — AssertionError: off by 1" in log


def test_the_deadline_cuts_every_stage_and_a_stage_cap_counts_its_own_time(tmp_path):
    clock = Clock()
    run = gc.Run(tmp_path, deadline_s=280, clock=clock)
    assert run.timeout("ops") == gc.STAGE_CAPS_S["ops"]
    assert run.timeout("rest") == 278  # no cap: the deadline less the reserve
    assert run.timeout("model", ran_s=80) == gc.STAGE_CAPS_S["model"] - 80
    clock.now = 250
    assert run.timeout("ops") == 28
    clock.now = 290
    assert run.timeout("rest") == 0


def _script(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_stage_stopped_by_the_deadline_reports_what_it_did(tmp_path):
    run = gc.Run(tmp_path, deadline_s=100)
    run.plan("model", gc.MODEL_CHECKS)
    first = {"name": gc.MODEL_CHECKS[0], "status": "passed", "seconds": 1.0, "detail": ""}
    code = f"print({gc.RESULT + json.dumps({**first, 'values': {}})!r}, flush=True)\n"
    code += "import time\ntime.sleep(120)"
    proc = gc.Proc(run, "model", _script(code), gc.child_env(False), gc.on_result(run, "model"))
    start = time.monotonic()
    gc.run_results(run, "model", proc, timeout=8)
    assert time.monotonic() - start < 30
    assert proc.killed
    statuses = [run.checks[("model", name)].status for name in gc.MODEL_CHECKS]
    assert statuses == ["passed"] + ["not reached"] * (len(gc.MODEL_CHECKS) - 1)
    assert any("stopped at the deadline" in note for note in run.notes)


def test_a_stage_that_dies_fails_the_check_it_was_running(tmp_path):
    run = gc.Run(tmp_path, deadline_s=100)
    run.plan("bench", gc.BENCH_CHECKS)
    code = "import sys; print('Segmentation fault', flush=True); sys.exit(139)"
    proc = gc.Proc(run, "bench", _script(code), gc.child_env(True), gc.on_result(run, "bench"))
    gc.run_results(run, "bench", proc, timeout=60)
    first = run.checks[("bench", gc.BENCH_CHECKS[0])]
    assert first.status == "failed" and "exited 139: Segmentation fault" in first.detail
    assert run.checks[("bench", gc.BENCH_CHECKS[1])].status == "not reached"


def test_exit_status_fails_on_a_failure_or_an_unreached_proof_not_on_late_stages():
    def checks(**status):
        return [gc.Check(stage, "x", s) for stage, s in status.items()]

    assert gc.exit_status(checks(build="passed", ops="passed", rest="not reached")) == 0
    assert gc.exit_status(checks(ops="passed", bench="not reached")) == 0
    assert gc.exit_status(checks(ops="passed", bench="failed")) == 1
    assert gc.exit_status(checks(build="passed", ops="not reached")) == 1
    assert gc.exit_status(checks(model="not reached")) == 1


def test_children_run_strict_on_the_gpu_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SVDKERN_BACKEND", "triton")
    env = gc.child_env(autotune=False)
    assert "TRITON_INTERPRET" not in env and "SVDKERN_BACKEND" not in env
    assert env["SVDKERN_STRICT"] == "1" and env["SVDKERN_AUTOTUNE"] == "0"
    assert "SVDKERN_AUTOTUNE" not in gc.child_env(autotune=True)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)


@pytest.mark.slow
def test_the_model_stage_runs_on_the_cpu(capsys):
    """The second stage's ResNet-20 run (decompose → train → prune → compress → export),
    here the C++ kernels against the reference path: every step passes its tolerance."""
    assert gc.stage_main("model", device="cpu") == 0
    results = [
        json.loads(line.removeprefix(gc.RESULT))
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(gc.RESULT)
    ]
    assert [r["name"] for r in results] == list(gc.MODEL_CHECKS)
    assert all(r["status"] == "passed" for r in results), results
