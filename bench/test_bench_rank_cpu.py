"""CPU training step at reduced rank (`make bench`): what a rank cut buys during training.

Per scenario (ResNet-20 batch 32; an MLP stack of 4 × Linear(1024, 1024), batch 512), one
Adam step with the regularizer of: dense eager, channels-last and compiled, and at each
rank fraction rho ∈ {1, 0.5, 0.25, 0.1} (every decomposed layer cut to
max(1, round(rho · full rank))) svdkern eager and compiled with forms and memory format
measured by `svdkern.tune_forms`, and the compiled plain-PyTorch SVD step
(compose-then-dense, per-layer losses). All providers of a scenario run interleaved, one
step each per round.

Targets (2 cores): ResNet-20 svdkern ≤ 0.8× dense at rho = 0.25 and ≤ 1.0× at rho ≤ 0.5;
svdkern-compiled ≤ compiled-reference at every rho. Rows go to
bench/results/train_rank_cpu.csv: vs_dense (eager dense), vs_dense_channels_last (the dense
model run channels-last: tuned svdkern steps may pick that layout, so this ratio is what
the rank cut buys beyond the layout), vs_dense_compiled, vs_compiled_reference (same
rho), and the ideal ratio of the FLOP model.

The MLP's batch is 512 because the orthogonality term costs ~1.5·(m + n)·r² per layer
against 3·B·m·n for the layer itself: at width 2048 and batch 32 (measured once, in the CSV)
it is 2r/B ≈ 128× the GEMMs at full rank, and SVD training there is a regularizer benchmark.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from bench.conftest import COMPILE_BACKEND, SMOKE
from bench.steps import DENSE_PROVIDERS, RANK_PROVIDERS, make_step, scenario, step_macs

# The smoke run (tests) only checks that every provider builds and steps: one small case.
CASES = [("mlp-stack-32-2", 4)] if SMOKE else [("resnet20", 32), ("mlp-stack-1024-4", 512)]
RHOS = (0.25,) if SMOKE else (1.0, 0.5, 0.25, 0.1)
ROUNDS = 1 if SMOKE else 25


def _rows(name: str, batch: int, times: dict[tuple[str, float], list[float]]) -> list[dict]:
    med = {key: statistics.median(t) for key, t in times.items()}
    dense, dense_c = med[("dense", 1.0)], med[("dense-compiled", 1.0)]
    dense_cl = med[("dense-channels-last", 1.0)]
    rows = []
    for (provider, rho), t in times.items():
        q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
        macs = step_macs(scenario(name, batch), rho)
        ref = med.get(("compiled-reference", rho))
        rows.append(
            {
                "scenario": name,
                "batch": batch,
                "rho": rho,
                "provider": provider,
                "median_ms": med[(provider, rho)] * 1e3,
                "iqr_ms": (q[2] - q[0]) * 1e3,
                "ideal_vs_dense": macs[provider] / macs["dense"],
                "vs_dense": med[(provider, rho)] / dense,
                "vs_dense_channels_last": med[(provider, rho)] / dense_cl,
                "vs_dense_compiled": med[(provider, rho)] / dense_c,
                "vs_compiled_reference": "" if ref is None else med[(provider, rho)] / ref,
                "threads": torch.get_num_threads(),
            }
        )
    return rows


@pytest.mark.parametrize("name, batch", CASES, ids=[f"{n}-b{b}" for n, b in CASES])
def test_rank_step(benchmark, name, batch):
    sc = scenario(name, batch)
    steps = {(p, 1.0): make_step(sc, p, compile_backend=COMPILE_BACKEND) for p in DENSE_PROVIDERS}
    for rho in RHOS:
        for p in RANK_PROVIDERS:
            steps[(p, rho)] = make_step(sc, p, compile_backend=COMPILE_BACKEND, rho=rho, tune=True)
    for step in steps.values():
        for _ in range(1 if SMOKE else 3):  # warm-up: allocator, torch.compile
            step()
    times: dict[tuple[str, float], list[float]] = {key: [] for key in steps}

    def one_round():
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)

    benchmark.group = f"train-rank-{name}-b{batch}"
    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=0)
    benchmark.extra_info.update(result="train_rank_cpu", rows=_rows(name, batch, times))
