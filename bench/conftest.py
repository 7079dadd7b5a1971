"""pytest-benchmark glue: after a `make bench` session, every group's results are written
to bench/results/<file>.csv as rows with median, IQR and ratios to the group's baselines
(measured in the same run). A benchmark may instead carry its finished rows in
extra_info["rows"] (the interleaved training-step benchmarks do).

SVDKERN_BENCH_SMOKE=1 shrinks every scenario to a tiny size: the test suite runs the
benchmark files that way (with --benchmark-disable) to keep them working.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._results import append_rows

SMOKE = os.environ.get("SVDKERN_BENCH_SMOKE") == "1"
# The smoke run checks the compiled providers trace and run; inductor's code generation
# would dominate its time.
COMPILE_BACKEND = "aot_eager" if SMOKE else "inductor"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_sessionfinish(session, exitstatus):
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is None or bs.disabled or SMOKE or exitstatus != 0:
        return
    by_file: dict[str, list] = {}
    for bench in bs.benchmarks:
        if bench.stats is None or not bench.extra_info:
            continue
        by_file.setdefault(bench.extra_info["result"], []).append(bench)
    for name, benches in by_file.items():
        rows = [row for b in benches for row in b.extra_info.get("rows", [])]
        single = [b for b in benches if "rows" not in b.extra_info]
        baselines = {(b.group, b.extra_info["provider"]): b.stats.median for b in single}
        for b in single:
            info = {k: v for k, v in b.extra_info.items() if k not in ("result", "baselines")}
            row = {**info, "median_ms": b.stats.median * 1e3, "iqr_ms": b.stats.iqr * 1e3}
            for base in b.extra_info["baselines"].split(","):
                if (b.group, base) in baselines:
                    row[f"vs_{base}"] = b.stats.median / baselines[(b.group, base)]
            rows.append(row)
        fields = sorted({k for r in rows for k in r})
        append_rows(name, [{k: r.get(k, "") for k in fields} for r in rows], "cpu")
