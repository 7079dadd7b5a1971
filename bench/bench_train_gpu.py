"""GPU training-step benchmarks (`make bench-gpu`): one optimizer step per provider, timed
with triton.testing.do_bench, all ratios from one run on one GPU.

    python bench/bench_train_gpu.py                 # the full sweep, appends to
                                                    # bench/results/train_gpu.csv
    python bench/bench_train_gpu.py --smoke         # tiny sizes; on CPU without a GPU
    python bench/bench_train_gpu.py --dtype bf16 --budget-s 130   # as `make gpu-bench`

Scenarios run in the order of FULL (the targets' first); with --budget-s no new scenario
starts once the budget is spent, and the skipped ones are listed. TRP is timed on the
small models only: on the MLP stack one TRP step is twelve SVDs of 4096² (seconds each).

Targets (H100/H200, bf16 autocast): ResNet-20 batch 128 svdkern ≤ 1.10× dense; MLP stack
efficiency ≥ 0.9 at 8192 and 65536 rows and ≤ 1.2× dense at 65536; svdkern ≤ 0.7× the
plain-PyTorch step and faster than its torch.compile version; ≥ 20× faster than TRP.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._results import append_rows
from bench.steps import PROVIDERS, make_step, scenario, step_macs

FULL = [("resnet20", 128), ("mlp-stack", 8192), ("mlp-stack", 65536), ("digits-mlp", 64)]
SMOKE = [("resnet20", 2), ("digits-mlp", 4), ("mlp-stack-32-2", 16)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _time_ms(fn, device: torch.device, smoke: bool) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=100, rep=500, quantiles=[0.5, 0.2, 0.8]))
    times = []
    for _ in range(2 if smoke else 10):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return statistics.median(times), q[0], q[-1]


def run(
    cases, dtypes, providers, device: torch.device, smoke: bool, budget_s: float | None = None
) -> list[dict]:
    rows, skipped = [], []
    start = time.perf_counter()
    for name, batch in cases:
        for dname in dtypes:
            if budget_s is not None and time.perf_counter() - start > budget_s:
                skipped.append(f"{name} b{batch} {dname}")
                continue
            sc = scenario(name, batch, DTYPES[dname])
            macs = step_macs(sc)
            times = {}
            for provider in providers:
                if provider == "trp" and name == "mlp-stack":
                    continue  # an SVD of twelve 4096² weights per step: minutes per sweep
                step = make_step(sc, provider, device, "aot_eager" if smoke else "inductor")
                for _ in range(3):
                    step()
                med, lo, hi = _time_ms(step, device, smoke)
                times[provider] = med
                rows.append(
                    {
                        "scenario": name,
                        "batch": batch,
                        "dtype": dname,
                        "provider": provider,
                        "median_ms": med,
                        "p20_ms": lo,
                        "p80_ms": hi,
                        "ideal_vs_dense": macs.get(provider, float("nan")) / macs["dense"],
                    }
                )
                print(f"{name:>14} b{batch:<6} {dname} {provider:>18}: {med:9.3f} ms", flush=True)
                del step
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            for row in rows[-len(times) :]:
                row["vs_dense"] = row["median_ms"] / times["dense"]
                row["vs_reference"] = row["median_ms"] / times.get("reference", float("nan"))
                row["efficiency"] = row["ideal_vs_dense"] / row["vs_dense"]
    if skipped:
        print(f"time budget of {budget_s} s spent; not run: " + ", ".join(skipped))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, any device, nothing written")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), action="append", help="default: fp32 and bf16"
    )
    p.add_argument("--provider", choices=PROVIDERS, action="append", help="default: all")
    p.add_argument("--budget-s", type=float, help="start no new scenario after this many seconds")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_train_gpu: no CUDA device; use --smoke for a CPU check", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = args.dtype or (["fp32"] if args.smoke else ["fp32", "bf16"])
    providers = args.provider or list(PROVIDERS)
    rows = run(SMOKE if args.smoke else FULL, dtypes, providers, device, args.smoke, args.budget_s)
    if not args.smoke and rows:
        print(f"wrote {append_rows('train_gpu', rows, device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
