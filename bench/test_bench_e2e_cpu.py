"""End-to-end wall-clock of the main job (`make bench`): `svdkern train` once per method
on the default data and model, each run training its own dense baseline; svd-adaptive
once per seed 0, 1, 2 (its targets are per seed); and the language-model task (`--data
text`, gpt2-tiny on the standard library's sources) with svd and svd-adaptive on seeds 0-2.

Rows (bench/results/e2e_cpu.csv), one per model of each run's report: train_seconds (the
wall-clock of all the training that produced the model, `models.<name>.train_seconds`),
vs_dense = train_seconds / the same run's dense train_seconds, test accuracy, MACs as
deployed, and the deployed model's latency at batch 1 and 256 (16 windows for the language
model), with the run's seed (for the language model: validation bits per byte instead of
accuracy). Runs are sequential (one run cannot interleave with another), so each ratio
compares phases of one process on one machine state; the absolute seconds of different runs
are comparable only roughly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.conftest import SMOKE

ROOT = Path(__file__).resolve().parents[1]
DIGITS = [("svd", 0), ("svd-adaptive", 0), ("svd-adaptive", 1), ("svd-adaptive", 2), ("trp", 0)]
TEXT = [("svd", s) for s in (0, 1, 2)] + [("svd-adaptive", s) for s in (0, 1, 2)]
CASES = (
    [("digits", "svd-adaptive", 0)]
    if SMOKE
    else [("digits", m, s) for m, s in DIGITS] + [("text", m, s) for m, s in TEXT]
)
# The smoke run checks the plumbing on tiny synthetic data and a few epochs.
SMOKE_ARGS = ["--data", "synthetic", "--dense-epochs", "2", "--finetune-epochs", "1"]
SCENARIOS = {"digits": "digits-cnn", "text": "text-gpt2-tiny"}


def _train(data: str, method: str, seed: int, out: Path) -> dict:
    args = ["--method", method, "--out", str(out), "--quiet", "--seed", str(seed)]
    args += SMOKE_ARGS if SMOKE else ["--data", data]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "svdkern", "train", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("data, method, seed", CASES, ids=[f"{d}-{m}-seed{s}" for d, m, s in CASES])
def test_end_to_end(benchmark, data, method, seed, tmp_path):
    doc: dict = {}

    def once():
        doc.update(_train(data, method, seed, tmp_path / method))

    benchmark.group = f"e2e-{data}-{method}-seed{seed}"
    benchmark.pedantic(once, rounds=1, warmup_rounds=0)
    models = doc["models"]
    dense_s = models["dense"]["train_seconds"]
    rows = []
    for name, result in models.items():
        latency = result.get("latency_ms") or {}
        rows.append(
            {
                "scenario": SCENARIOS[data] if not SMOKE else "synthetic",
                "method": method,
                "seed": seed,
                "provider": name,
                "train_seconds": result["train_seconds"],
                "vs_dense": result["train_seconds"] / dense_s,
                "accuracy": result.get("accuracy"),
                "bits_per_byte": result.get("bits_per_byte", ""),
                "macs": result.get("macs"),
                "latency_ms_b1": latency.get("1", ""),
                "latency_ms_b256": latency.get("256", ""),
                "latency_ms_b16": latency.get("16", ""),
                "threads": torch.get_num_threads(),
            }
        )
    benchmark.extra_info.update(result="e2e_cpu", rows=rows)
