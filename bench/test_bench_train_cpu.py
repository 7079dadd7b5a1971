"""CPU training-step benchmarks (`make bench`): one Adam step per provider, steady state.

Targets (2 cores): ResNet-20 batch 32 svdkern ≤ 1.05× dense; digits MLP batch 64 svdkern
≤ 0.6× the plain-PyTorch SVD step. Rows go to bench/results/train_cpu.csv with the
ideal ratio of the FLOP model (bench/steps.py) and efficiency = ideal / measured.
"""

from __future__ import annotations

import pytest

from bench.conftest import COMPILE_BACKEND, SMOKE
from bench.steps import PROVIDERS, make_step, scenario, step_macs

CASES = (
    [("digits-mlp", 4), ("resnet20", 2), ("mlp-stack-32-2", 8)]
    if SMOKE
    else [("digits-mlp", 64), ("resnet20", 32)]
)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name, batch", CASES, ids=[f"{n}-b{b}" for n, b in CASES])
def test_train_step(benchmark, name, batch, provider):
    sc = scenario(name, batch)
    step = make_step(sc, provider, compile_backend=COMPILE_BACKEND)
    for _ in range(3):  # warm-up: allocator, autotuning, torch.compile
        step()
    macs = step_macs(sc)
    benchmark.group = f"train-{name}-b{batch}"
    benchmark.extra_info.update(
        result="train_cpu",
        scenario=name,
        batch=batch,
        dtype="fp32",
        provider=provider,
        baselines="dense,reference",
        ideal_vs_dense=macs.get(provider, float("nan")) / macs["dense"],
    )
    benchmark.pedantic(step, rounds=3 if SMOKE else 20, warmup_rounds=1)
