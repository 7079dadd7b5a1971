"""GPU op benchmarks: svdkern's Triton kernels against the plain-PyTorch reference.

Providers: `reference` (svdkern.reference, eager), `compiled-reference`
(torch.compile of it), `svdkern` (svdkern.ops → C++ autograd → Triton), plus a
per-case baseline (`torch.matmul` at the compose shape, `dense` = compose + F.linear
for lowrank_linear). Modes: forward, backward (the backward pass alone), full.
Times are triton.testing.do_bench medians with the 20th/80th percentiles; rows go
to bench/results/ops_gpu.csv with device, versions and git sha.

lowrank_linear at 16384 rows, 4096×4096, r=128 (bf16) also reports the traffic
floor: the bytes that must move (x, y, U, V, s, bias once) over the bandwidth of
a device-to-device copy measured in the same run.

    python bench/bench_ops_gpu.py                    # everything, on a CUDA GPU
    python bench/bench_ops_gpu.py --ops compose orth_loss --modes forward
    python bench/bench_ops_gpu.py --budget-s 100     # start no case after 100 s
    python bench/bench_ops_gpu.py --smoke            # tiny sizes, CPU, TRITON_INTERPRET=1

Cases run in order of importance (the shapes of BENCHMARKS.md's targets first), so a
time budget (`make gpu-bench` sets one to fit the GPU machine's 10-minute calls) drops
the least important ones; skipped cases are listed at the end and write no rows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if "--smoke" in sys.argv:  # must precede any import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("SVDKERN_BACKEND", "triton")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OPS = ("compose", "compose_grouped", "lowrank_linear", "orth_loss", "sparsity_loss")
MODES = ("forward", "backward", "full")


@dataclass
class Case:
    """One benchmark: inputs (tensors that get gradients) and a function per provider."""

    op: str
    name: str
    dtype: torch.dtype
    inputs: list[torch.Tensor]
    fns: dict[str, Callable]
    flops: dict[str, float] = field(default_factory=dict)  # per mode
    bytes: dict[str, float] = field(default_factory=dict)  # per mode


def _bench(fn: Callable, grad_to_none: list[torch.Tensor], smoke: bool) -> tuple[float, ...]:
    """(median, p20, p80) in ms."""
    if not smoke:
        import triton.testing

        return tuple(
            triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
        )
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[1], times[0], times[2]


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def resnet_convs(name: str, with_fc: bool = False) -> list[tuple[int, int]]:
    """(c_out, c_in·kh·kw) of every conv of a ResNet (CIFAR ResNet-20, ImageNet ResNet-50),
    and with_fc ResNet-50's final Linear (1000, 2048)."""
    if name == "resnet20":
        convs, c_in = [(16, 27)], 16
        for width in (16, 32, 64):
            for _ in range(3):
                convs += [(width, c_in * 9), (width, width * 9)]
                c_in = width
        return convs
    convs, c_in = [(64, 3 * 49)], 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            convs += [(width, c_in), (width, width * 9), (4 * width, width)]
            if b == 0:
                convs.append((4 * width, c_in))
            c_in = 4 * width
    return [*convs, (1000, 2048)] if with_fc else convs


def _factors(m: int, n: int, r: int, dtype: torch.dtype, device: str):
    U = (torch.randn(m, r, device=device) / m**0.5).to(dtype)
    s = torch.rand(r, device=device).to(dtype)
    V = (torch.randn(n, r, device=device) / n**0.5).to(dtype)
    return U, s, V


def _cases(device: str, smoke: bool, ops: list[str]) -> list[Case]:
    from svdkern import ops as sk
    from svdkern import reference as ref

    bf16 = torch.bfloat16
    cases: list[Case] = []
    if "compose" in ops:
        shapes = [(16, 144, 16)] if smoke else [
            (16, 144, 16), (64, 576, 64), (512, 4608, 512), (1024, 1024, 1024),
            (4096, 4096, 4096),
        ]  # fmt: skip
        for m, n, r in shapes:
            U, s, V = _factors(m, n, r, bf16, device)
            flop = 2.0 * m * n * r
            cases.append(
                Case(
                    "compose",
                    f"M{m}-N{n}-R{r}",
                    bf16,
                    [U, s, V],
                    {
                        "reference": ref.compose,
                        "svdkern": sk.compose,
                        "torch.matmul": lambda U, s, V: torch.matmul(U, V.T),
                    },
                    flops={"forward": flop, "backward": 2 * flop, "full": 3 * flop},
                )
            )
    if "compose_grouped" in ops:
        for model in ("resnet20",) if smoke else ("resnet20", "resnet50"):
            convs = resnet_convs(model)[: 3 if smoke else None]
            layers = [_factors(m, n, min(m, n), bf16, device) for m, n in convs]
            G = len(layers)
            inputs = [t for i in range(3) for t in (layer[i] for layer in layers)]
            flop = sum(2.0 * m * n * min(m, n) for m, n in convs)

            def split(fn, G=G):
                return lambda *ts: fn(list(ts[:G]), list(ts[G : 2 * G]), list(ts[2 * G :]))

            cases.append(
                Case(
                    "compose_grouped",
                    f"{model}-{G}layers",
                    bf16,
                    inputs,
                    {"reference": split(ref.compose_grouped), "svdkern": split(sk.compose_grouped)},
                    flops={"forward": flop, "backward": 2 * flop, "full": 3 * flop},
                )
            )
    if "lowrank_linear" in ops:
        shapes = [(8, 64, 48, 8)] if smoke else [
            (16384, 4096, 4096, 128), (4096, 1024, 1024, 64), (128, 4096, 4096, 256),
            (8192, 2048, 2048, 512),
        ]  # fmt: skip
        for rows, n, m, r in shapes:
            U, s, V = _factors(m, n, r, bf16, device)
            x = torch.randn(rows, n, device=device).to(bf16)
            bias = torch.randn(m, device=device).to(bf16)
            fwd_bytes = 2.0 * (rows * n + rows * m + (m + n) * r + r + m)
            # backward reads g, x, U, V, s and writes dx, dU, dV, ds, dbias
            bwd_bytes = 2.0 * (rows * m + 2 * rows * n + 2 * (m + n) * r + 2 * r + m)
            flop = 2.0 * rows * r * (n + m)
            cases.append(
                Case(
                    "lowrank_linear",
                    f"rows{rows}-N{n}-M{m}-R{r}",
                    bf16,
                    [x, U, s, V, bias],
                    {
                        "reference": ref.lowrank_linear,
                        "svdkern": sk.lowrank_linear,
                        "dense": lambda x, U, s, V, b: torch.nn.functional.linear(
                            x, sk.compose(U, s, V), b
                        ),
                    },
                    flops={"forward": flop, "backward": 2 * flop, "full": 3 * flop},
                    bytes={
                        "forward": fwd_bytes,
                        "backward": bwd_bytes,
                        "full": fwd_bytes + bwd_bytes,
                    },
                )
            )
    if "orth_loss" in ops or "sparsity_loss" in ops:
        convs = resnet_convs("resnet20" if smoke else "resnet50")[: 3 if smoke else None]
        layers = [_factors(m, n, min(m, n), torch.float32, device) for m, n in convs]
        mats = [t for U, _, V in layers for t in (U, V)]
        svals = [s for _, s, _ in layers]
        name = f"{'resnet20' if smoke else 'resnet50'}-{len(convs)}layers"
        if "orth_loss" in ops:
            flop = sum(2.0 * M.shape[0] * M.shape[1] ** 2 for M in mats)
            cases.append(
                Case(
                    "orth_loss",
                    name,
                    torch.float32,
                    mats,
                    {
                        "reference": lambda *ms: ref.orth_loss(list(ms)),
                        "svdkern": lambda *ms: sk.orth_loss(list(ms)),
                    },
                    flops={"forward": flop / 2, "backward": flop, "full": 1.5 * flop},
                )
            )
        if "sparsity_loss" in ops:
            nbytes = 4.0 * sum(s.numel() for s in svals)
            cases.append(
                Case(
                    "sparsity_loss",
                    name + "-hoyer",
                    torch.float32,
                    svals,
                    {
                        "reference": lambda *ss: ref.sparsity_loss(list(ss), "hoyer"),
                        "svdkern": lambda *ss: sk.sparsity_loss(list(ss), "hoyer"),
                    },
                    bytes={"forward": nbytes, "backward": 3 * nbytes, "full": 4 * nbytes},
                )
            )
    return cases


def _copy_bandwidth(device: str) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted)."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def run(args: argparse.Namespace) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    providers = ["reference", "svdkern"]
    if not args.smoke:
        providers.insert(1, "compiled-reference")
    bandwidth = None if args.smoke else _copy_bandwidth(device)
    rows, skipped = [], []
    start = time.perf_counter()
    for case in sorted(_cases(device, args.smoke, args.ops), key=_priority):
        fns = dict(case.fns)
        if "compiled-reference" in providers:
            fns["compiled-reference"] = torch.compile(case.fns["reference"])
        order = [p for p in providers if p in fns] + [p for p in fns if p not in providers]
        for mode in args.modes:
            if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                skipped.append(f"{case.op} {case.name} {mode}")
                continue
            ref_ms = None
            for provider in order:
                fn = fns[provider]
                inputs = [t.detach().requires_grad_(mode != "forward") for t in case.inputs]
                if mode == "forward":

                    def step(fn=fn, inputs=inputs):
                        with torch.no_grad():
                            return fn(*inputs)

                elif mode == "backward":
                    outs = _outputs(fn(*inputs))
                    grads = [torch.randn_like(o) for o in outs]

                    def step(outs=outs, grads=grads):
                        torch.autograd.backward(outs, grads, retain_graph=True)

                else:

                    def step(fn=fn, inputs=inputs):
                        outs = _outputs(fn(*inputs))
                        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

                ms, p20, p80 = _bench(step, inputs, args.smoke)
                ref_ms = ms if provider == "reference" else ref_ms
                flops, nbytes = case.flops.get(mode), case.bytes.get(mode)
                row = {
                    "op": case.op,
                    "case": case.name,
                    "dtype": str(case.dtype).removeprefix("torch."),
                    "mode": mode,
                    "provider": provider,
                    "ms": round(ms, 4),
                    "ms_p20": round(p20, 4),
                    "ms_p80": round(p80, 4),
                    "tflops": round(flops / ms * 1e-9, 2) if flops else "",
                    "gbps": round(nbytes / ms * 1e-6, 1) if nbytes else "",
                    "speedup_vs_reference": round(ref_ms / ms, 3) if ref_ms else "",
                    "floor_ms": "",
                    "fraction_of_floor": "",
                }
                if nbytes and bandwidth:
                    floor = nbytes / bandwidth * 1e3
                    row["floor_ms"] = round(floor, 4)
                    row["fraction_of_floor"] = round(floor / ms, 3)
                rows.append(row)
                print(
                    f"{case.op:16s} {case.name:28s} {mode:8s} {provider:18s} {ms:9.4f} ms"
                    f"  {row['tflops'] or '':>7} TFLOP/s  {row['gbps'] or '':>8} GB/s"
                    f"  x{row['speedup_vs_reference'] or '':<6}",
                    flush=True,
                )
    if skipped:
        print(f"time budget of {args.budget_s} s spent; not run: " + ", ".join(skipped))
    return rows


# The shapes of BENCHMARKS.md's targets first, then the rest in their listed order.
_FIRST = (
    ("compose", "M4096-N4096-R4096"),
    ("orth_loss", "resnet50"),
    ("lowrank_linear", "rows16384-N4096-M4096-R128"),
)


def _priority(case: Case) -> int:
    for i, (op, name) in enumerate(_FIRST):
        if case.op == op and case.name.startswith(name):
            return i
    return len(_FIRST)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (interpreter)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--no-write", action="store_true", help="print only, no CSV rows")
    parser.add_argument("--budget-s", type=float, help="start no new case after this many seconds")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit(
            "bench_ops_gpu.py needs a CUDA GPU (none found); "
            "`--smoke` runs tiny sizes on CPU through TRITON_INTERPRET=1 as a check"
        )
    import svdkern

    if args.smoke and svdkern.backend()["cpu"] != "triton":
        sys.exit("bench_ops_gpu.py --smoke needs svdkern._C (build it: `make install`)")
    rows = run(args)
    if not args.smoke and not args.no_write:
        from bench._results import append_rows

        print("wrote", append_rows("ops_gpu", rows, "cuda"))


if __name__ == "__main__":
    main()
