"""Static gate for the Triton kernels: compile, without a GPU, every kernel variant the
launchers would try on an H100 (sm_90) for a fixed list of realistic shapes, and check it.

    python tools/kernel_check.py [--report bench/results/kernels_sm90.md] [--jobs N]

`make kernel-check` runs it with the oldest supported triton (3.6, `.venv-compat`), whose
wheel ships the ptxas and cuobjdump used here, and a persistent TRITON_CACHE_DIR.

How: the project's launchers (`svdkern.kernels.IMPLS`) are called with CPU tensors of the
shapes in `gate_cases()`. While they run, two triton entry points are replaced so that
nothing launches:

- `Autotuner.run` prunes the configs with the kernel's own `early_config_prune` on the
  real launch arguments (as on the GPU), then hands each kept config to `JITFunction.run`
  (a single-config autotuner is not pruned, as in triton);
- `JITFunction.run` binds and specializes the arguments with triton's own binder for the
  sm_90 backend (`create_function_from_signature`, `_pack_args`: the same signature,
  constexprs and divisibility attributes as a GPU launch) and records a compile job.

Every unique job is then compiled with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))` in parallel processes. Registers, stack frame and
spill stores come from ptxas's own report (`ptxas -v`, which triton runs; captured, or
rerun on the PTX when the kernel came from triton's cache), shared memory from the
kernel's metadata, the MMA kind from the PTX.

A variant fails the gate when (`verdict`):
- it needs more shared memory than an H100 block can have (232448 B);
- it is bf16, of a hot kernel (compose, grouped compose, lowrank_linear, orth_loss; forward
  or backward) and spills;
- it is a bf16 GEMM tile (a `tt.dot`) with BLOCK_M (BLOCK_R for Gram tiles) ≥ 64 and
  ≥ 4 warps that does not lower to `wgmma`;
- it does not compile, or a launcher raises.
fp32 spills and the MMA kind of every kernel (orth backward's included) are reported only.

It also counts the compiles of `make gpu-check` (its correctness part at fixed configs,
`gpu_check_cases()`, and its headline benchmarks autotuned, `gpu_check_bench_cases()`),
`make gpu-test` (SVDKERN_AUTOTUNE=0: one config per kernel specialization, counted in a
subprocess over `gpu_test_cases()`) and `make gpu-bench` (autotuned, over
`gpu_bench_cases()`), for the run-time estimates of those targets.

    python tools/kernel_check.py --count               # only the counts (no compile), JSON
    python tools/kernel_check.py --warm gpu-check --arch 90 --jobs 8

`--warm` (on the GPU machine, by `make gpu-check`) compiles every variant of a case list
for the local GPU into TRITON_CACHE_DIR, C launchers included, in parallel processes, so
that the tests and benchmarks after it load kernels from the cache instead of compiling
them one by one.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMEM_LIMIT = 232448  # H100: max dynamic shared memory per block (227 KiB), triton's limit
HOT_OPS = ("compose", "compose_grouped", "lowrank_linear", "orth_loss")  # and their backwards
# Every @triton.jit kernel with a launcher; the gate fails if one of them was never compiled.
EXPECTED_KERNELS = (
    "_matmul_kernel",
    "_compose_grouped_fwd_kernel",
    "_compose_grouped_bwd_kernel",
    "_lowrank_fwd_kernel",
    "_lowrank_bwd_rows_kernel",
    "_lowrank_bwd_weights_kernel",
    "_orth_fwd_kernel",
    "_orth_bwd_kernel",
    "_sparsity_fwd_kernel",
    "_sparsity_bwd_kernel",
)
COMPILE_SECONDS = (1.0, 2.0)  # per compile on an H100 machine's CPU, for the estimates


# ---------------------------------------------------------------------------------------------
# Results and the gate (pure functions: tested in tests/project/test_tools.py)


@dataclass
class Variant:
    """One compiled kernel variant: a kernel, its specialization and launch config."""

    kernel: str
    constexprs: dict
    num_warps: int
    num_stages: int
    ops: set[str] = field(default_factory=set)  # ops whose launchers compiled it
    dtypes: set[str] = field(default_factory=set)  # "bf16" / "fp32": the case's dtype
    cases: list[str] = field(default_factory=list)
    error: str | None = None
    shared: int | None = None  # bytes
    regs: int | None = None
    spills: int | None = None  # bytes of spill stores per thread (ptxas)
    stack: int | None = None  # bytes of stack frame per thread
    mma: str | None = None  # "wgmma" | "mma.sync" | "none"
    has_dot: bool = False
    seconds: float = 0.0

    @property
    def hot(self) -> bool:
        return any(
            op.removesuffix("_backward").removesuffix("_forward") in HOT_OPS for op in self.ops
        )

    @property
    def first_case(self) -> str:
        return self.cases[0] if self.cases else "?"

    @property
    def tile_m(self) -> int | None:
        for name in ("BLOCK_M", "BLOCK_R"):
            if isinstance(self.constexprs.get(name), int):
                return self.constexprs[name]
        return None


def parse_ptxas_log(text: str) -> dict[str, int]:
    """Registers, stack frame and spill bytes from `ptxas -v` for a single kernel."""
    frame = re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text
    )
    regs = re.search(r"Used (\d+) registers", text)
    if frame is None or regs is None:
        raise ValueError(f"no register/spill report in the ptxas log: {text[-300:]!r}")
    return {
        "regs": int(regs[1]),
        "stack": int(frame[1]),
        "spill_stores": int(frame[2]),
        "spill_loads": int(frame[3]),
    }


def mma_kind(ptx: str) -> str:
    """The tensor-core instruction family a kernel's PTX uses: wgmma, mma.sync or none."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma.sync"
    return "none"


def verdict(v: Variant) -> list[str]:
    """Why this variant fails the gate (empty: it passes)."""
    if v.error is not None:
        return [f"does not compile: {v.error.splitlines()[-1][:200]}"]
    bad = []
    if v.shared is not None and v.shared > SMEM_LIMIT:
        bad.append(f"shared memory {v.shared} B > {SMEM_LIMIT} B")
    bf16 = "bf16" in v.dtypes
    if bf16 and v.hot and (v.spills or 0) > 0:
        bad.append(f"bf16 hot kernel spills {v.spills} B per thread ({v.regs} registers)")
    tile_m = v.tile_m
    if bf16 and v.has_dot and tile_m and tile_m >= 64 and v.num_warps >= 4 and v.mma != "wgmma":
        bad.append(f"bf16 GEMM tile M={tile_m}, {v.num_warps} warps lowers to {v.mma}, not wgmma")
    return bad


def notes(v: Variant) -> list[str]:
    """What is reported without failing: fp32 spills."""
    if v.error is None and "fp32" in v.dtypes and (v.spills or 0) > 0:
        return [f"fp32 spills {v.spills} B per thread ({v.regs} registers)"]
    return []


# ---------------------------------------------------------------------------------------------
# Shapes


@dataclass
class Case:
    """Launcher calls of one op at one shape and dtype."""

    label: str
    op: str  # the op (svdkern.kernels.IMPLS name) that classifies the compiled kernels
    dtype: str
    run: Callable[[], None]


def _t(*shape: int, dtype) -> object:
    import torch

    return torch.empty(*shape, dtype=dtype)


def _impl(*names: str) -> Callable:
    """The launcher of the first op name that `svdkern.kernels.IMPLS` has."""
    from svdkern.kernels import IMPLS

    for name in names:
        if name in IMPLS:
            return IMPLS[name]
    raise KeyError(f"svdkern.kernels.IMPLS has none of {names}")


def _compose_cases(shapes, dtypes) -> list[Case]:
    from svdkern.kernels import IMPLS

    cases = []
    for name, dtype in dtypes:
        for m, n, r in shapes:

            def fwd(m=m, n=n, r=r, dtype=dtype):
                IMPLS["compose"](_t(m, r, dtype=dtype), _t(r, dtype=dtype), _t(n, r, dtype=dtype))

            def bwd(m=m, n=n, r=r, dtype=dtype):
                U, s, V = _t(m, r, dtype=dtype), _t(r, dtype=dtype), _t(n, r, dtype=dtype)
                IMPLS["compose_backward"](_t(m, n, dtype=dtype), U, s, V)

            cases.append(Case(f"compose {m}x{n} r{r} {name}", "compose", name, fwd))
            cases.append(Case(f"compose_backward {m}x{n} r{r} {name}", "compose", name, bwd))
    return cases


def _grouped_cases(models: dict[str, list[tuple[int, int, int]]], dtypes) -> list[Case]:
    cases = []
    for name, dtype in dtypes:
        for model, dims in models.items():

            def fwd(dims=dims, dtype=dtype):
                Us = [_t(m, r, dtype=dtype) for m, _, r in dims]
                ss = [_t(r, dtype=dtype) for _, _, r in dims]
                Vs = [_t(n, r, dtype=dtype) for _, n, r in dims]
                # the forward's output (a packed buffer or a list) is the backward's grad input
                Ws = _impl("compose_grouped_packed", "compose_grouped")(Us, ss, Vs)
                _impl("compose_grouped_backward")(Ws, Us, ss, Vs)

            cases.append(Case(f"compose_grouped {model} {name}", "compose_grouped", name, fwd))
    return cases


def _lowrank_cases(shapes, dtypes) -> list[Case]:
    from svdkern.kernels import IMPLS

    cases = []
    for name, dtype in dtypes:
        for rows, n, m, r in shapes:

            def run(rows=rows, n=n, m=m, r=r, dtype=dtype):
                x, U = _t(rows, n, dtype=dtype), _t(m, r, dtype=dtype)
                s, V, bias = _t(r, dtype=dtype), _t(n, r, dtype=dtype), _t(m, dtype=dtype)
                IMPLS["lowrank_linear"](x, U, s, V, bias)
                IMPLS["lowrank_linear_backward"](
                    _t(rows, m, dtype=dtype), x, U, s, V, _t(0, dtype=dtype), True
                )

            label = f"lowrank_linear rows{rows} {n}->{m} r{r} {name}"
            cases.append(Case(label, "lowrank_linear", name, run))
    return cases


def _loss_cases(models: dict[str, list[tuple[int, int]]], dtypes) -> list[Case]:
    import torch

    from svdkern.kernels import IMPLS

    cases = []
    for name, dtype in dtypes:
        for model, convs in models.items():

            def orth(convs=convs, dtype=dtype):
                mats = [_t(k, min(m, n), dtype=dtype) for m, n in convs for k in (m, n)]
                IMPLS["orth_loss"](mats)
                _, residuals = IMPLS["orth_loss_forward"](mats)
                IMPLS["orth_loss_backward"](torch.tensor(1.0), mats, residuals)

            def sparsity(convs=convs, dtype=dtype):
                svals = [_t(min(m, n), dtype=dtype) for m, n in convs]
                for kind in ("l1", "hoyer", "hoyer_square"):
                    IMPLS["sparsity_loss"](svals, kind)
                    IMPLS["sparsity_loss_backward"](torch.tensor(1.0), svals, kind)

            cases.append(Case(f"orth_loss {model} {name}", "orth_loss", name, orth))
            cases.append(Case(f"sparsity_loss {model} {name}", "sparsity_loss", name, sparsity))
    return cases


def _dtypes(*names: str):
    import torch

    table = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
    return [(n, table[n]) for n in names]


def resnet_convs(name: str, with_fc: bool = False) -> list[tuple[int, int]]:
    """The layer shapes of the GPU op benchmark (imported late: it imports torch)."""
    from bench.bench_ops_gpu import resnet_convs as shapes

    return shapes(name, with_fc)


def _full_rank(convs):
    return [(m, n, min(m, n)) for m, n in convs]


def gate_cases() -> list[Case]:
    """Realistic shapes, bf16 and fp32: what the gate compiles and checks."""
    both = _dtypes("bf16", "fp32")
    # the fused chain at every rank class, one row (ints equal to 1 specialize), the r > 256
    # two-GEMM path
    lowrank = [(16384, 4096, 4096, r) for r in (16, 64, 128, 256)]
    lowrank += [(1, 4096, 4096, 256), (8192, 2048, 2048, 512)]
    nets = {name: resnet_convs(name, with_fc=True) for name in ("resnet20", "resnet50")}
    return [
        *_compose_cases(
            [
                (4096, 4096, 4096),
                (1024, 1024, 1024),
                (4096, 2048, 256),
                (512, 4608, 512),
            ],
            both,
        ),
        *_grouped_cases({k: _full_rank(v) for k, v in nets.items()}, both),
        *_lowrank_cases(lowrank, both),
        *_loss_cases(nets, both),
    ]


def gpu_bench_cases() -> list[Case]:
    """What `make gpu-bench` launches: bench/bench_ops_gpu.py's cases (bf16 GEMMs, fp32
    losses) and the svdkern ops of bench/bench_train_gpu.py's steps (compose_grouped of
    every SVD layer in fp32 and bf16 autocast, the losses in fp32)."""
    bf16, fp32, both = _dtypes("bf16"), _dtypes("fp32"), _dtypes("bf16", "fp32")
    r20, r50 = resnet_convs("resnet20"), resnet_convs("resnet50")
    stack = [(4096, 4096, 4096)] * 12
    digits = [(256, 64, 64), (256, 256, 256)]  # the digits MLP's hidden layers, full rank
    return [
        *_compose_cases(
            [
                (16, 144, 16),
                (64, 576, 64),
                (512, 4608, 512),
                (1024, 1024, 1024),
                (4096, 4096, 4096),
            ],
            bf16,
        ),
        *_grouped_cases({"resnet20": _full_rank(r20), "resnet50": _full_rank(r50)}, bf16),
        *_lowrank_cases(
            [
                (16384, 4096, 4096, 128),
                (4096, 1024, 1024, 64),
                (128, 4096, 4096, 256),
                (8192, 2048, 2048, 512),
            ],
            bf16,
        ),
        *_loss_cases({"resnet50": r50}, fp32),
        # training steps
        *_grouped_cases(
            {"train-resnet20": _full_rank(r20), "train-mlp-stack": stack, "train-digits": digits},
            both,
        ),
        *_loss_cases({"train-resnet20": r20, "train-mlp-stack": [(4096, 4096)] * 12}, fp32),
    ]


def gpu_test_cases() -> list[Case]:
    """What `make gpu-test` launches: the `cuda` tests' shapes and the kernel tests' small
    odd shapes (they run on the GPU too), fp32, bf16 and fp16."""
    dtypes = _dtypes("fp32", "bf16", "fp16")
    small = [(37, 29, 13), (1, 17, 1), (16, 70, 5), (70, 20, 20), (9, 7, 40), (32, 32, 32)]
    nets = {"resnet50": resnet_convs("resnet50"), "small": [(m, n) for m, n, _ in small]}
    grouped = {
        "small": small,
        "many": [(16 * (1 + i % 4), 144 * (1 + i % 3), 16 * (1 + i % 4)) for i in range(40)],
    }
    return [
        *_compose_cases(
            [
                *small,
                (1024, 1024, 1024),
                (4096, 2048, 256),
                (512, 4608, 512),
                (4096, 4096, 4096),
                (1024, 256, 256),
            ],
            dtypes,
        ),
        *_grouped_cases(grouped, dtypes),
        *_lowrank_cases(
            [
                (8, 29, 37, 13),
                (1, 17, 9, 1),
                (5, 70, 16, 40),
                (4096, 2048, 1024, 128),
                (1, 4096, 4096, 256),
                (2048, 1024, 1024, 512),
            ],
            dtypes,
        ),
        *_loss_cases(nets, dtypes),
    ]


def _orth_sparsity_cases(label: str, mats, svals, dtypes) -> list[Case]:
    """orth_loss (forward, with residuals, backward) of matrices of shapes `mats` and
    sparsity_loss (every kind, forward and backward) of vectors of lengths `svals`."""
    import torch

    from svdkern.kernels import IMPLS

    cases = []
    for name, dtype in dtypes:

        def orth(dtype=dtype):
            ms = [_t(k, r, dtype=dtype) for k, r in mats]
            IMPLS["orth_loss"](ms)
            _, residuals = IMPLS["orth_loss_forward"](ms)
            IMPLS["orth_loss_backward"](torch.tensor(1.0), ms, residuals)

        def sparsity(dtype=dtype):
            vs = [_t(n, dtype=dtype) for n in svals]
            for kind in ("l1", "hoyer", "hoyer_square"):
                IMPLS["sparsity_loss"](vs, kind)
                IMPLS["sparsity_loss_backward"](torch.tensor(1.0), vs, kind)

        cases.append(Case(f"orth_loss {label} {name}", "orth_loss", name, orth))
        cases.append(Case(f"sparsity_loss {label} {name}", "sparsity_loss", name, sparsity))
    return cases


def gpu_check_cases() -> list[Case]:
    """What the correctness part of `make gpu-check` launches (SVDKERN_AUTOTUNE=0): the
    shapes of tests/ops/test_ops_cuda.py (fp32, bf16, fp16), the small odd shapes of
    tests/kernels/test_kernels.py's kernel tests (fp32, bf16; they run on the GPU there), its
    ResNet-20 model run (fp32) and the opcheck and torch.compile cases of tests/ops/test_ops.py
    on CUDA (fp32)."""
    three, two, fp32 = _dtypes("fp32", "bf16", "fp16"), _dtypes("fp32", "bf16"), _dtypes("fp32")
    ops_group = [(37, 29, 13), (1, 1, 1), (150, 133, 70), (16, 16, 16), (9, 70, 3)]
    kernel_group = [(37, 29, 13), (1, 17, 1), (16, 70, 5), (70, 20, 20), (9, 7, 40), (32, 32, 32)]
    return [
        # tests/ops/test_ops_cuda.py
        *_compose_cases([(37, 29, 13), (1, 17, 1), (150, 133, 70)], three),
        *_grouped_cases({"ops": ops_group}, three),
        *_lowrank_cases(
            [(15, 29, 37, 13), (1, 17, 9, 1), (300, 133, 150, 70), (6, 24, 20, 300)], three
        ),
        *_orth_sparsity_cases(
            "ops", [(37, 13), (1, 1), (5, 9), (150, 70), (64, 64)], [13, 5, 1, 70, 2500], three
        ),
        # tests/kernels/test_kernels.py (`interp` tests)
        *_compose_cases([(37, 29, 13), (1, 17, 1), (16, 70, 5), (70, 20, 20), (9, 7, 40)], two),
        *_grouped_cases({"kernels": kernel_group}, two),
        *_lowrank_cases([(15, 29, 37, 13), (1, 17, 9, 1), (40, 20, 70, 16), (6, 24, 20, 300)], two),
        *_orth_sparsity_cases(
            "kernels",
            [(37, 13), (1, 1), (5, 9), (70, 40), (64, 64), (3, 1)],
            [13, 5, 1, 2500, 3],
            two,
        ),
        # the model run (tools/gpu_check.py): ResNet-20's layers at full rank, fp32
        *_grouped_cases({"model": _full_rank(resnet_convs("resnet20"))}, fp32),
        *_loss_cases({"model": resnet_convs("resnet20")}, fp32),
        # tests/ops/test_ops.py: opcheck and torch.compile on CUDA
        *_compose_cases([(7, 5, 3)], fp32),
        *_grouped_cases({"opcheck": [(7, 5, 3), (4, 9, 2)]}, fp32),
        *_lowrank_cases([(6, 5, 7, 3)], fp32),
        *_orth_sparsity_cases("opcheck", [(7, 3), (5, 3), (4, 2), (9, 2)], [3, 2], fp32),
    ]


def gpu_check_bench_cases() -> list[Case]:
    """What the headline benchmarks of `make gpu-check` launch (autotuned): compose forward
    4096³ bf16; lowrank_linear 16384×4096² r128 bf16, forward and backward; orth_loss of
    ResNet-50's layers (fp32); the svdkern ops of a ResNet-20 training step under bf16
    autocast (grouped compose in bf16, the losses in fp32)."""
    bf16, fp32 = _dtypes("bf16"), _dtypes("fp32")
    r20 = resnet_convs("resnet20")
    return [
        *[c for c in _compose_cases([(4096, 4096, 4096)], bf16) if "backward" not in c.label],
        *_lowrank_cases([(16384, 4096, 4096, 128)], bf16),
        *[
            c
            for c in _loss_cases({"resnet50": resnet_convs("resnet50")}, fp32)
            if c.op == "orth_loss"
        ],
        *_grouped_cases({"train-resnet20": _full_rank(r20)}, bf16),
        *_loss_cases({"train-resnet20": r20}, fp32),
    ]


# Case lists by name: the fixed-config ones are counted (and warmed) with SVDKERN_AUTOTUNE=0.
CASES: dict[str, Callable[[], list[Case]]] = {
    "gpu-check": gpu_check_cases,
    "gpu-check-bench": gpu_check_bench_cases,
    "gpu-test": gpu_test_cases,
    "gpu-bench": gpu_bench_cases,
}
FIXED_CONFIGS = ("gpu-check", "gpu-test")


# ---------------------------------------------------------------------------------------------
# Recording launches (patched triton entry points)


@dataclass
class Job:
    """A compile job: what JITFunction.run would compile for one launch."""

    jit: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


class Recorder:
    """Patches triton so that launches record compile jobs (see the module docstring)."""

    def __init__(self, arch: int = 90) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.jobs: dict[str, Job] = {}
        self.variants: dict[str, Variant] = {}
        self.autotune_keys: dict[tuple, int] = {}  # (kernel, key) -> configs benchmarked
        self.case: Case | None = None
        self._binders: dict[int, Callable] = {}

    def _jit_run(self, jit, *args, grid, warmup, **kwargs):
        from triton import knobs
        from triton.runtime.jit import create_function_from_signature

        kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = self._binders.get(id(jit))
        if binder is None:
            binder = create_function_from_signature(jit.signature, jit.params, self.backend)
            self._binders[id(jit)] = binder
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(
            self.backend, kwargs, bound, specialization, options
        )
        names = {path[0]: jit.arg_names[path[0]] for path in constexprs}
        cex = {
            names[p[0]]: v if isinstance(v, (bool, int, float, str)) else str(v)
            for p, v in constexprs.items()
        }
        key = hashlib.sha1(
            repr(
                (
                    jit.fn.__module__,
                    jit.fn.__name__,
                    signature,
                    sorted(cex.items()),
                    sorted(attrs.items()),
                    sorted(options.__dict__.items()),
                )
            ).encode()
        ).hexdigest()
        if key not in self.jobs:
            self.jobs[key] = Job(jit, signature, constexprs, attrs, options.__dict__)
            self.variants[key] = Variant(
                jit.fn.__name__, cex, options.num_warps, options.num_stages
            )
        variant = self.variants[key]
        case = self.case
        variant.ops.add(case.op)
        variant.dtypes.add(case.dtype)
        if case.label not in variant.cases:
            variant.cases.append(case.label)

    def _autotuner_run(self, tuner, *args, **kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        try:
            configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs
            if len(tuner.configs) > 1:
                named = {k: v for k, v in {**tuner.nargs, **kwargs}.items() if k in tuner.arg_names}
                key = [named[k] for k in tuner.keys if k in named]
                key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
                self.autotune_keys[(tuner.base_fn.__name__, tuple(key))] = len(configs)
            for cfg in configs:
                tuner.fn.run(*args, **kwargs, **cfg.all_kwargs())
        finally:
            tuner.nargs = None

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        import torch
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        import svdkern.kernels as kernels

        recorder = self
        saved = (JITFunction.run, Autotuner.run)
        JITFunction.run = lambda jit, *a, **kw: recorder._jit_run(jit, *a, **kw)
        Autotuner.run = lambda tuner, *a, **kw: recorder._autotuner_run(tuner, *a, **kw)
        # The launchers accept CPU tensors only under the interpreter: check a meta copy
        # instead (same shape and dtype, no data), so every other check still runs.
        lifted = []
        for name, mod in list(sys.modules.items()):
            if name.startswith(kernels.__name__) and hasattr(mod, "check_device_dtype"):
                original = mod.check_device_dtype
                lifted.append((mod, original))
                mod.check_device_dtype = lambda op, t, original=original: (
                    original(op, t.to("meta")) if isinstance(t, torch.Tensor) else original(op, t)
                )
        try:
            yield
        finally:
            JITFunction.run, Autotuner.run = saved
            for mod, original in lifted:
                mod.check_device_dtype = original

    def run_cases(self, cases: list[Case]) -> list[tuple[str, str]]:
        """Run every case's launchers; returns (case, error) for launchers that raised."""
        failures = []
        with self.patched():
            for case in cases:
                self.case = case
                try:
                    case.run()
                except Exception as e:  # a launcher bug is a finding, not a crash
                    failures.append((case.label, f"{type(e).__name__}: {e}"))
        return failures


# ---------------------------------------------------------------------------------------------
# Compiling (in worker processes forked after the jobs are recorded)

_JOBS: list[Job] = []


def _nvidia_tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _rerun_ptxas(ptx: str) -> str:
    """ptxas -v on the PTX as triton runs it for sm_90 (for kernels from triton's cache)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "kernel.ptx", Path(tmp) / "kernel.cubin"
        src.write_text(ptx)
        cmd = [_nvidia_tool("ptxas"), "-lineinfo", "-v", "--gpu-name=sm_90a", str(src)]
        return subprocess.run(
            [*cmd, "-o", str(out)], capture_output=True, text=True, check=True
        ).stderr


def _compile(index: int, target, cache: Path | None) -> dict:
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    job = _JOBS[index]
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # triton prints ptxas -v when it compiles
            kernel = triton.compile(
                ASTSource(job.jit, job.signature, job.constexprs, job.attrs),
                target=target,
                options=job.options,
            )
        ptx = kernel.asm["ptx"]
        cached = cache / f"{hashlib.sha1(ptx.encode()).hexdigest()}.json" if cache else None
        if cached is not None and cached.exists():
            res = json.loads(cached.read_text())
        else:
            text = log.getvalue()
            res = parse_ptxas_log(text if "spill stores" in text else _rerun_ptxas(ptx))
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps(res))
        out = {
            "shared": kernel.metadata.shared,
            "regs": res["regs"],
            "spills": res["spill_stores"],
            "stack": res["stack"],
            "mma": mma_kind(ptx),
            "has_dot": "tt.dot" in kernel.asm["ttir"],
        }
    except Exception as e:
        out = {"error": f"{type(e).__name__}: {e}"[-2000:]}
    out["seconds"] = time.perf_counter() - start
    return out


def compile_all(recorder: Recorder, jobs: int, cache: Path | None) -> None:
    """Compile every recorded job (in `jobs` processes) and fill in its Variant."""
    keys = list(recorder.jobs)
    _JOBS[:] = [recorder.jobs[k] for k in keys]
    done = 0
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        futures = {
            pool.submit(_compile, i, recorder.target, cache): key for i, key in enumerate(keys)
        }
        for future in concurrent.futures.as_completed(futures):
            variant = recorder.variants[futures[future]]
            for name, value in future.result().items():
                setattr(variant, name, value)
            done += 1
            if done % 50 == 0 or done == len(keys):
                print(f"  compiled {done}/{len(keys)}", flush=True)


def _warm(index: int, target) -> dict:
    """Compile one recorded job into triton's cache, and its C launcher (needs libcuda)."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    job = _JOBS[index]
    start = time.perf_counter()
    out: dict = {"error": None, "launcher": True, "cache_hit": False}

    def listener(**kwargs):  # triton calls it after each compile, a cache hit included
        out["cache_hit"] = bool(kwargs.get("cache_hit"))

    knobs.compilation.listener = listener
    try:
        kernel = triton.compile(
            ASTSource(job.jit, job.signature, job.constexprs, job.attrs),
            target=target,
            options=job.options,
        )
        try:
            from triton.runtime import driver

            driver.active.launcher_cls(kernel.src, kernel.metadata)
        except Exception:  # no CUDA driver here: the first launch builds it
            out["launcher"] = False
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"[-500:]
    out["seconds"] = time.perf_counter() - start
    return out


def warm(cases: list[Case], jobs: int, arch: int) -> dict:
    """Compile every variant `cases` launch for cuda sm_`arch` into TRITON_CACHE_DIR (and
    their launchers) in `jobs` processes; a later launch of the same variant on that GPU
    is a cache hit (same triton, source, options, ptxas and cache-invalidating env vars)."""
    start = time.perf_counter()
    recorder = Recorder(arch)
    failures = recorder.run_cases(cases)
    _JOBS[:] = list(recorder.jobs.values())
    ctx = multiprocessing.get_context("fork")
    results = []
    if _JOBS:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            target = recorder.target
            results = list(pool.map(_warm, range(len(_JOBS)), [target] * len(_JOBS)))
    errors = [r["error"] for r in results if r["error"]]
    return {
        "variants": len(_JOBS),
        "cache_hits": sum(r["cache_hit"] for r in results),
        "compile_errors": errors[:5],
        "failed": len(errors),
        "launchers_not_built": sum(not r["launcher"] for r in results if not r["error"]),
        "compile_seconds": round(sum(r["seconds"] for r in results), 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "jobs": jobs,
        "launcher_errors": failures,
    }


# ---------------------------------------------------------------------------------------------
# Counting (gpu-test and gpu-check's tests run with SVDKERN_AUTOTUNE=0, counted in a
# subprocess: the config lists are built when svdkern.kernels is imported)


def count(cases: list[Case]) -> dict:
    """Unique compiles and autotuner benchmarks the given cases would cause."""
    recorder = Recorder()
    failures = recorder.run_cases(cases)
    return {
        "compiles": len(recorder.jobs),
        "benchmarks": sum(recorder.autotune_keys.values()),
        "autotune_keys": len(recorder.autotune_keys),
        "launcher_errors": failures,
    }


def count_default_configs(name: str = "gpu-test") -> dict:
    """count() of the case list `name` at fixed configs (SVDKERN_AUTOTUNE=0, a subprocess)."""
    env = {**os.environ, "SVDKERN_AUTOTUNE": "0"}
    out = subprocess.run(
        [sys.executable, __file__, "--count-cases", name],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def all_counts() -> dict[str, dict]:
    """count() of every case list of CASES as its run launches it, keyed by the name without
    its "gpu-" (check, check-bench, test, bench)."""
    return {
        name.removeprefix("gpu-"): (
            count_default_configs(name) if name in FIXED_CONFIGS else count(CASES[name]())
        )
        for name in CASES
    }


# ---------------------------------------------------------------------------------------------
# The report


# counts key → what the count is of.
COUNTED = {
    "check": "`make gpu-check`, its tests (SVDKERN_AUTOTUNE=0, one config per specialization)",
    "check-bench": "`make gpu-check`, its headline benchmarks (autotuned)",
    "test": "`make gpu-test` (SVDKERN_AUTOTUNE=0, one config per specialization)",
    "bench": "`make gpu-bench` (autotuned)",
}
# Processes gpu-check compiles each list in on a 16-core machine, beside the C++ build
# (tools/gpu_check.py: jobs − 7 and jobs / 4).
GPU_CHECK_JOBS = {"check": 9, "check-bench": 4}


def compile_lines(counts: dict[str, dict]) -> list[str]:
    """One line per counted run: compiles and their time at 1–2 s each (gpu-check compiles in
    parallel processes, GPU_CHECK_JOBS; the others one at a time), autotune timings."""
    lines = []
    for key, what in COUNTED.items():
        if key not in counts:
            continue
        c = counts[key]
        lo, hi = (c["compiles"] * t for t in COMPILE_SECONDS)
        if key in GPU_CHECK_JOBS:
            jobs = GPU_CHECK_JOBS[key]
            time = f"≈ {lo / jobs:.0f}–{hi / jobs:.0f} s in {jobs} processes beside the build"
        else:
            time = f"≈ {lo / 60:.0f}–{hi / 60:.0f} min at 1–2 s each"
        timings = (
            f", and {c['benchmarks']} config timings over {c['autotune_keys']} autotune keys"
            if c.get("benchmarks")
            else ""
        )
        lines.append(f"- {what}: {c['compiles']} compiles {time}{timings}.")
    return lines


def _kib(b: int | None) -> str:
    return "" if b is None else f"{b / 1024:.1f}"


def kernel_table(variants: list[Variant]) -> list[str]:
    """One row per (kernel, dtype): variants, max registers, spills, shared memory, MMA."""
    rows: dict[tuple[str, str], list[Variant]] = {}
    for v in variants:
        for d in sorted(v.dtypes):
            rows.setdefault((v.kernel, d), []).append(v)
    lines = [
        "| kernel | dtype | variants | max regs | spilling (max B/thread) | max smem KiB | "
        "over limit | wgmma / mma.sync / none | failing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, d), vs in sorted(rows.items()):
        ok = [v for v in vs if v.error is None]
        spilling = [v for v in ok if (v.spills or 0) > 0]
        kinds = [sum(v.mma == k for v in ok) for k in ("wgmma", "mma.sync", "none")]
        failing = sum(bool(verdict(v)) for v in vs)
        lines.append(
            f"| {kernel} | {d} | {len(vs)} | {max((v.regs or 0) for v in ok) if ok else ''} | "
            f"{len(spilling)} ({max((v.spills or 0) for v in spilling) if spilling else 0}) | "
            f"{_kib(max(v.shared or 0 for v in ok)) if ok else ''} | "
            f"{sum((v.shared or 0) > SMEM_LIMIT for v in ok)} | "
            f"{kinds[0]} / {kinds[1]} / {kinds[2]} | {failing} |"
        )
    return lines


def _describe(v: Variant) -> str:
    blocks = ", ".join(
        f"{k}={val}" for k, val in v.constexprs.items() if k.startswith(("BLOCK", "R_PAD"))
    )
    return f"`{v.kernel}` [{blocks}, warps={v.num_warps}, stages={v.num_stages}]"


def write_report(path: Path, variants: list[Variant], launcher_errors, counts, meta) -> None:
    failing = [(v, verdict(v)) for v in variants if verdict(v)]
    noted = [(v, notes(v)) for v in variants if notes(v)]
    orth_bwd: dict[str, dict[str, int]] = {}
    for v in variants:
        if "orth" in v.kernel and "bwd" in v.kernel and v.error is None:
            for d in v.dtypes:
                kinds = orth_bwd.setdefault(d, {})
                kinds[v.mma] = kinds.get(v.mma, 0) + 1
    status = "PASS" if not failing and not launcher_errors else "FAIL"
    lines = [
        "# Triton kernels compiled for sm_90 (H100)",
        "",
        f"Generated by `make kernel-check` (`tools/kernel_check.py`): triton {meta['triton']}, "
        f"torch {meta['torch']}, target cuda sm_90 (warp 32), git {meta['git']}, {meta['date']}. "
        "Every config the launchers' autotuners keep for the shapes in "
        "`tools/kernel_check.py:gate_cases` (bf16 and fp32), compiled with triton's own ptxas; "
        "no GPU involved.",
        "",
        f"**Gate: {status}** — {len(variants)} variants, {len(failing)} failing, "
        f"{len(launcher_errors)} launcher errors. A variant fails on shared memory over "
        f"{SMEM_LIMIT} B, spills in a bf16 hot kernel (compose, grouped, lowrank, orth), or a "
        "bf16 GEMM tile with BLOCK_M ≥ 64 and ≥ 4 warps that does not lower to wgmma.",
        "",
        "| check | variants |",
        "|---|---|",
        f"| shared memory over {SMEM_LIMIT} B | "
        f"{sum((v.shared or 0) > SMEM_LIMIT for v in variants)} |",
        f"| bf16 hot-kernel variants that spill | "
        f"{sum(1 for v in variants if 'bf16' in v.dtypes and v.hot and (v.spills or 0) > 0)} |",
        f"| bf16 tiles ≥ 64 rows, ≥ 4 warps, not wgmma | "
        f"{sum(1 for _, why in failing if any('not wgmma' in w for w in why))} |",
        f"| compile errors | {sum(v.error is not None for v in variants)} |",
        f"| fp32 variants that spill (reported only) | {len(noted)} |",
        "",
        "orth backward's MMA (variants per kind): "
        + (
            "; ".join(
                f"{d}: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
                for d, kinds in sorted(orth_bwd.items())
            )
            or "not compiled"
        )
        + ".",
        "",
        "## Compiles of the GPU runs",
        "",
        *compile_lines(counts),
        "",
        "## Per kernel",
        "",
        *kernel_table(variants),
        "",
    ]
    if failing or launcher_errors:
        lines += ["## Failing", ""]
        lines += [f"- {label}: launcher raised {err}" for label, err in launcher_errors]
        for v, why in failing:
            lines.append(
                f"- {_describe(v)} ({'/'.join(sorted(v.dtypes))}; first case "
                f"{v.first_case}): {'; '.join(why)}"
            )
        lines.append("")
    if noted:
        lines += ["## Reported (fp32 spills)", ""]
        lines += [f"- {_describe(v)}: {'; '.join(n)}" for v, n in noted]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def _git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="write the Markdown table here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument(
        "--count", action="store_true", help="print the compile counts of the GPU runs (JSON)"
    )
    parser.add_argument(
        "--warm", choices=sorted(CASES), help="compile these cases into TRITON_CACHE_DIR"
    )
    parser.add_argument("--arch", type=int, default=90, help="--warm's target: cuda sm_ARCH")
    parser.add_argument("--count-cases", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, never interpret
    if args.warm in FIXED_CONFIGS:
        os.environ["SVDKERN_AUTOTUNE"] = "0"  # read when svdkern.kernels is imported

    import torch
    import triton

    if args.count_cases:  # the subprocess of count_default_configs
        print(json.dumps(count(CASES[args.count_cases]())))
        return 0
    if args.count:
        print(json.dumps(all_counts()))
        return 0
    if args.warm:
        result = warm(CASES[args.warm](), args.jobs, args.arch)
        print(json.dumps(result), flush=True)
        return 1 if result["failed"] or result["launcher_errors"] else 0

    from svdkern.kernels import _common

    if not _common.AUTOTUNE:
        print(
            "kernel_check: unset SVDKERN_AUTOTUNE=0: the gate needs the autotune space",
            file=sys.stderr,
        )
        return 2
    start = time.perf_counter()
    cache_dir = os.environ.get("TRITON_CACHE_DIR")
    cache = Path(cache_dir) / "kernel-check-ptxas" if cache_dir else None
    counts = all_counts()
    recorder = Recorder()
    launcher_errors = recorder.run_cases(gate_cases())
    print(
        f"kernel_check: {len(recorder.jobs)} variants to compile for sm_90 ({args.jobs} processes)",
        flush=True,
    )
    compile_all(recorder, args.jobs, cache)
    variants = list(recorder.variants.values())
    meta = {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "git": _git_sha(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
    }
    if args.report:
        write_report(args.report, variants, launcher_errors, counts, meta)
        print(f"kernel_check: wrote {args.report}")
    failing = [(v, verdict(v)) for v in variants if verdict(v)]
    for label, err in launcher_errors:
        print(f"FAIL {label}: launcher raised {err}")
    for v, why in failing:
        print(
            f"FAIL {_describe(v)} [{'/'.join(sorted(v.dtypes))}] {v.first_case}: {'; '.join(why)}"
        )
    for v in variants:
        for n in notes(v):
            print(f"note {_describe(v)}: {n}")
    slowest = sorted(variants, key=lambda v: -v.seconds)[:5]
    print("slowest compiles: " + ", ".join(f"{_describe(v)} {v.seconds:.0f} s" for v in slowest))
    for line in compile_lines(counts):
        print(line.removeprefix("- "))
    print(
        f"kernel_check: {len(variants)} variants, {len(failing)} failing, "
        f"{len(launcher_errors)} launcher errors, {time.perf_counter() - start:.0f} s"
    )
    # A gate that compiled nothing (a launcher refactor the recorder no longer sees) must not
    # pass: every Triton kernel of the project has to be among the checked variants.
    missing = sorted(set(EXPECTED_KERNELS) - {v.kernel for v in variants})
    if missing:
        print(f"FAIL kernel_check: no variant recorded for {', '.join(missing)}")
    counted_errors = any(c["launcher_errors"] for c in counts.values())
    return 1 if failing or missing or launcher_errors or counted_errors else 0


if __name__ == "__main__":
    sys.exit(main())
