"""CPU training-step benchmarks (`make bench`): one Adam step per provider, steady state.

Targets (2 cores): ResNet-20 batch 32 svdkern ≤ 1.05× dense; digits MLP batch 64 svdkern
≤ 0.6× the plain-PyTorch SVD step. The providers of a scenario run interleaved, one step
each per round, so that drift of the machine's speed during the run falls on all of them
alike; pytest-benchmark times the rounds and each provider's steps are timed inside them.
Rows go to bench/results/train_cpu.csv with the ideal ratio of the FLOP model
(bench/steps.py) and efficiency = ideal / measured.
"""

from __future__ import annotations

import statistics
import time

import pytest

from bench.conftest import COMPILE_BACKEND, SMOKE
from bench.steps import PROVIDERS, make_step, scenario, step_macs

CASES = (
    [("digits-mlp", 4), ("resnet20", 2), ("mlp-stack-32-2", 8)]
    if SMOKE
    else [("digits-mlp", 64), ("resnet20", 32)]
)
ROUNDS = 2 if SMOKE else 40


def _rows(name: str, batch: int, times: dict[str, list[float]]) -> list[dict]:
    macs = step_macs(scenario(name, batch))
    medians = {p: statistics.median(t) for p, t in times.items()}
    rows = []
    for provider, t in times.items():
        q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
        ideal = macs.get(provider, float("nan")) / macs["dense"]
        vs_dense = medians[provider] / medians["dense"]
        rows.append(
            {
                "scenario": name,
                "batch": batch,
                "dtype": "fp32",
                "provider": provider,
                "median_ms": medians[provider] * 1e3,
                "iqr_ms": (q[2] - q[0]) * 1e3,
                "ideal_vs_dense": ideal,
                "vs_dense": vs_dense,
                "vs_reference": medians[provider] / medians["reference"],
                "efficiency": ideal / vs_dense,
            }
        )
    return rows


@pytest.mark.parametrize("name, batch", CASES, ids=[f"{n}-b{b}" for n, b in CASES])
def test_train_step(benchmark, name, batch):
    steps = {
        p: make_step(scenario(name, batch), p, compile_backend=COMPILE_BACKEND) for p in PROVIDERS
    }
    for step in steps.values():
        for _ in range(3):  # warm-up: allocator, torch.compile
            step()
    times: dict[str, list[float]] = {p: [] for p in steps}

    def one_round():
        for provider, step in steps.items():
            start = time.perf_counter()
            step()
            times[provider].append(time.perf_counter() - start)

    benchmark.group = f"train-{name}-b{batch}"
    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=0)
    benchmark.extra_info.update(result="train_cpu", rows=_rows(name, batch, times))
