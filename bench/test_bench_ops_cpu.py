"""CPU op benchmarks (`make bench`): every op forward, backward and forward+backward,
svdkern (C++ kernels) against the eager reference and torch.compile of the reference.
Rows go to bench/results/ops_cpu.csv with GFLOP/s."""

from __future__ import annotations

import pytest
import torch

from bench.conftest import COMPILE_BACKEND, SMOKE
from svdkern import ops, reference

# (m, n, r): a ResNet-20 3×3 conv (64 × 576) and a square layer at half rank.
SIZES = [(8, 12, 4)] if SMOKE else [(64, 576, 64), (512, 512, 256)]
ROWS = 16 if SMOKE else 512
PROVIDERS = ("reference", "compiled-reference", "svdkern")
MODES = ("forward", "backward", "full")


def _factors(m, n, r):
    return [torch.randn(*shape, requires_grad=True) for shape in ((m, r), (r,), (n, r))]


def _cases(m, n, r):
    """{name: (fn(impl, *inputs), inputs, forward MACs)}."""
    U, s, V = _factors(m, n, r)
    x = torch.randn(ROWS, n, requires_grad=True)
    return {
        "compose": (lambda impl, U, s, V: impl.compose(U, s, V), (U, s, V), m * n * r),
        "lowrank_linear": (
            lambda impl, x, U, s, V: impl.lowrank_linear(x, U, s, V),
            (x, U, s, V),
            ROWS * r * (m + n),
        ),
        "orth_loss": (lambda impl, U, V: impl.orth_loss([U, V]), (U, V), (m + n) * r * r),
        "sparsity_loss": (lambda impl, s: impl.sparsity_loss([s], "hoyer"), (s,), r),
    }


def _runner(fn, provider, inputs, mode):
    if provider == "svdkern":
        call = lambda: fn(ops, *inputs)  # noqa: E731
    else:
        f = (
            (lambda *t: fn(reference, *t))
            if provider == "reference"
            else torch.compile(lambda *t: fn(reference, *t), backend=COMPILE_BACKEND)
        )
        call = lambda: f(*inputs)  # noqa: E731
    if mode == "forward":
        return lambda: call().detach()
    out = call()
    grad = torch.randn_like(out)
    if mode == "backward":

        def backward():
            torch.autograd.grad(out, inputs, grad, retain_graph=True)

        return backward
    return lambda: torch.autograd.grad(call(), inputs, grad)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", ["compose", "lowrank_linear", "orth_loss", "sparsity_loss"])
@pytest.mark.parametrize("m, n, r", SIZES, ids=[f"M{m}-N{n}-R{r}" for m, n, r in SIZES])
def test_op(benchmark, op, m, n, r, mode, provider):
    torch._dynamo.reset()
    fn, inputs, macs = _cases(m, n, r)[op]
    run = _runner(fn, provider, inputs, mode)
    for _ in range(2):
        run()
    benchmark.group = f"{op}-{mode}-M{m}-N{n}-R{r}"
    flops = 2 * macs * {"forward": 1, "backward": 2, "full": 3}[mode]
    benchmark.extra_info.update(
        result="ops_cpu",
        op=op,
        mode=mode,
        m=m,
        n=n,
        r=r,
        rows=ROWS,
        dtype="fp32",
        provider=provider,
        baselines="reference,compiled-reference",
        flops=flops,
    )
    benchmark.pedantic(run, rounds=3 if SMOKE else 30, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info["gflops"] = flops / benchmark.stats.stats.median / 1e9
