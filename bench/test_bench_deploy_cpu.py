"""CPU inference latency of the deployed model (`make bench`): `svdkern.compress` with
policy "latency" (forms measured on this machine at batch 1 and 256) and "flops" (MAC
rule) against the dense model, eval mode, batch 1 and 256, interleaved.

Models: the digits CNN (the default model of `svdkern train`) and ResNet-20 (CIFAR
input), every decomposed layer cut to max(1, round(rho · full rank)); latency does not
depend on the weights' values. Target: policy "latency" never slower than dense.
Rows go to bench/results/deploy_cpu.csv (providers dense, dense-copy, compress-latency,
compress-flops) with vs_dense = ms / dense ms at the same batch and the model's MACs per
sample (equal to dense where policy "latency" kept every layer dense); dense-copy, a deep
copy of the dense model, shows how far two identical models measure apart.
"""

from __future__ import annotations

import copy

import pytest
import torch

import svdkern
from bench.conftest import SMOKE
from bench.steps import cut_ranks
from svdkern.train.models import build_model
from svdkern.train.report import measure_latencies

CASES = (
    [("cnn", (1, 8, 8), 0.35)]
    if SMOKE
    else [
        ("cnn", (1, 8, 8), 0.35),
        ("resnet20", (3, 32, 32), 0.5),
        ("resnet20", (3, 32, 32), 0.25),
    ]
)
BATCHES = (1, 4) if SMOKE else (1, 256)
ROUNDS = 1 if SMOKE else 21


@pytest.mark.parametrize("name, shape, rho", CASES, ids=[f"{n}-rho{r}" for n, _, r in CASES])
@torch.no_grad()
def test_deployed_latency(benchmark, name, shape, rho):
    torch.manual_seed(0)
    dense = build_model(name, shape, 10).eval()
    model = svdkern.decompose(build_model(name, shape, 10), skip=["fc"])
    cut_ranks(model, rho)
    shapes = [(b, *shape) for b in BATCHES]
    deployed = {
        "dense": dense,
        # An identical copy of the dense model: its ratio is the measurement's resolution
        # (at batch 1 the digits CNN takes ~0.5 ms and identical models differ by ~5-10%).
        "dense-copy": copy.deepcopy(dense),
        "compress-latency": svdkern.compress(model, "latency", shapes).eval(),
        "compress-flops": svdkern.compress(model, "flops", (1, *shape)).eval(),
    }
    macs = {p: svdkern.flops(m, (1, *shape)).total_macs for p, m in deployed.items()}
    rows = []

    def measure():
        rows.clear()
        for b in BATCHES:
            ms = measure_latencies(deployed, torch.randn(b, *shape), rounds=ROUNDS)
            for provider, value in ms.items():
                rows.append(
                    {
                        "scenario": name,
                        "rho": rho,
                        "batch": b,
                        "provider": provider,
                        "median_ms": value,
                        "vs_dense": value / ms["dense"],
                        "macs": macs[provider],
                        "threads": torch.get_num_threads(),
                    }
                )

    benchmark.group = f"deploy-{name}-rho{rho}"
    benchmark.pedantic(measure, rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(result="deploy_cpu", rows=list(rows))
