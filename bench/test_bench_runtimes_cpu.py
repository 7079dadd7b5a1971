"""Deployed CPU latency per runtime (`make bench`): the dense model and the compressed one
(`svdkern.compress`, policy "flops" and, where a target asks, policy "latency" tuned in the
runtime) run eager, under torch.compile (inductor, freezing) and in ONNX Runtime
(`svdkern.runtimes.prepare`), at rank fractions rho = 0.5 and 0.25.

Models (random weights; nothing is downloaded): ResNet-20 (CIFAR input, batch 1, 32, 256),
ResNet-50 at 224² (transformers `ResNetConfig()`, batch 1, 8), BERT-base (`BertConfig()`,
BertModel on 128 token ids, batch 1, 8) and GPT-2 small (`GPT2Config()`, GPT2Model on 128
token ids, use_cache False, batch 1, 8). Every decomposable layer is decomposed and cut to
max(1, round(rho · full rank)). Latency does not depend on the weights' values, so the
decomposition runs on the meta device (the float64 SVDs of BERT-base alone take minutes on
two cores) and the cut factors are then filled with random orthonormal columns and a flat
spectrum of the dense weight's norm; every other parameter and buffer is the dense model's.

Providers per runtime: dense, dense-copy (a deep copy of dense, prepared and timed like it:
its ratio is the measurement's resolution), compress-flops (the MAC rule), compress-latency
(policy "latency", runtime=the runtime, tuned at the case's batches; BERT-base at batch 8
alone: several examples must be float input shapes, token ids are one example_inputs) and
compress-latency-b256 (ResNet-20, tuned for batch 256 alone). Policy "latency" under
compile compiles every layer form and up to four whole candidates per batch, minutes per
model here, so it runs where a target needs it (ResNet-20 eager and compiled, BERT-base and
ResNet-50 compiled, rho 0.25); the other combinations time the MAC rule's model only, and
the big models' dense-copy runs eager only (one more compile or export per model).

The models of one (model, runtime, batch) are timed interleaved (rounds rotate their
order; median of the rounds). Rows go to bench/results/runtimes_cpu.csv with
vs_dense_same_runtime = ms / dense ms in the same runtime, speedup = its inverse,
vs_fastest_dense = ms / the fastest dense runtime's ms (named in fastest_dense), vs_flops
(compress-latency rows: ms / compress-flops ms, same runtime and rho), MACs and
parameters per sample, max_rel_err (compile and ONNX Runtime: largest |runtime − eager
PyTorch output| / largest |eager output| of the same model) and setup_s (compile or export,
and the policy's tuning). Top ops (torch.profiler; ONNX Runtime's own profiler) of the
target rows go to bench/results/runtimes_cpu_profiles/<model>.md.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import svdkern
from bench._results import RESULTS
from bench.conftest import SMOKE
from bench.steps import cut_ranks
from svdkern import runtimes
from svdkern.nn import svd_layers
from svdkern.train.models import build_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RUNTIMES = runtimes.RUNTIMES
PROFILES = RESULTS / "runtimes_cpu_profiles"


@dataclass(frozen=True)
class Case:
    """One model: its batches, rank fractions, the policy "latency" models to build
    ({provider: (runtime, rho, tuned-for batches)}), the runtimes that time a dense-copy,
    the target speedups over dense in the same runtime ({(runtime, provider, batch): bound},
    whose rows are profiled), and the timing rounds."""

    name: str
    batches: tuple[int, ...]
    rhos: tuple[float, ...]
    latency: dict[str, tuple[str, float, tuple[int, ...]]] = field(default_factory=dict)
    copies: tuple[str, ...] = RUNTIMES
    targets: dict[tuple[str, str, int], float] = field(default_factory=dict)
    rounds: int = 5
    round_s: float = 0.05


def _latency(runtimes_: tuple[str, ...], rho: float, batches: tuple[int, ...]) -> dict:
    return {f"compress-latency@{rt}": (rt, rho, batches) for rt in runtimes_}


if SMOKE:
    CASES = [
        Case(
            "cnn",
            (1, 2),
            (0.25,),
            _latency(("eager",), 0.25, (1, 2)),
            targets={("eager", "compress-latency", 2): 1.0},
            rounds=1,
            round_s=0.0,
        )
    ]
    TIMED_RUNTIMES: tuple[str, ...] = ("eager",)
else:
    CASES = [
        Case(
            "resnet20",
            (1, 32, 256),
            (0.5, 0.25),
            {
                **_latency(("eager", "compile"), 0.25, (1, 32, 256)),
                "compress-latency-b256@compile": ("compile", 0.25, (256,)),
            },
            targets={
                ("compile", "compress-latency-b256", 256): 1.4,
                **{("compile", "compress-latency", b): 1.0 for b in (1, 32, 256)},
                **{("onnxruntime", "compress-flops", b): 1.0 for b in (1, 32, 256)},
            },
            rounds=11,
        ),
        Case(
            "bert-base",
            (1, 8),
            (0.5, 0.25),
            _latency(("compile",), 0.25, (8,)),
            copies=("eager",),
            targets={
                ("compile", "compress-latency", 1): 2.0,
                ("compile", "compress-latency", 8): 2.5,
                **{("onnxruntime", "compress-flops", b): 1.0 for b in (1, 8)},
            },
        ),
        Case(
            "resnet50",
            (1, 8),
            (0.5, 0.25),
            _latency(("compile",), 0.25, (1, 8)),
            copies=("eager",),
            targets={
                ("compile", "compress-latency", 1): 2.0,
                ("compile", "compress-latency", 8): 2.5,
            },
        ),
        Case("gpt2", (1, 8), (0.5, 0.25), copies=("eager",)),
    ]
    TIMED_RUNTIMES = RUNTIMES


def _dense(name: str) -> nn.Module:
    """The dense model, random weights (transformers configs at their defaults; the digits
    CNN for the smoke run)."""
    if name in ("resnet20", "cnn"):
        return build_model(name, (3, 32, 32) if name == "resnet20" else (1, 8, 8), 10)
    import transformers

    if name == "resnet50":
        return transformers.ResNetForImageClassification(transformers.ResNetConfig())
    if name == "bert-base":
        return transformers.BertModel(transformers.BertConfig())
    if name == "gpt2":
        return transformers.GPT2Model(transformers.GPT2Config(use_cache=False))
    raise ValueError(f"unknown model {name!r}")


def _inputs(name: str, batch: int) -> tuple:
    if name in ("resnet20", "cnn"):
        return (torch.randn(batch, *((3, 32, 32) if name == "resnet20" else (1, 8, 8))),)
    if name == "resnet50":
        return (torch.randn(batch, 3, 224, 224),)
    vocab = 30522 if name == "bert-base" else 50257
    return (torch.randint(0, vocab, (batch, 128)),)


@torch.no_grad()
def _svd_model(dense: nn.Module, rho: float) -> nn.Module:
    """`dense` decomposed (every decomposable layer) and cut to rank fraction `rho`; see the
    module docstring for the factors' values."""
    svd = svdkern.decompose(copy.deepcopy(dense).to("meta"))
    cut_ranks(svd, rho)
    svd.to_empty(device="cpu")
    state = {**dict(dense.named_parameters()), **dict(dense.named_buffers())}
    for name, layer in svd_layers(svd):
        prefix = f"{name}." if name else ""
        norm = state[prefix + "weight"].norm().item()
        layer.s.fill_(norm / math.sqrt(layer.full_rank))
        for factor in (layer.U, layer.V):
            factor.copy_(torch.linalg.qr(torch.randn(factor.shape, dtype=torch.float64))[0])
    for name, t in (*svd.named_parameters(), *svd.named_buffers()):
        if not name.endswith((".U", ".s", ".V")):
            t.copy_(state[name])
    return svd.eval()


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


@torch.no_grad()
def _rel_err(model: nn.Module, run: nn.Module, args: tuple) -> float:
    """Largest |run − eager| over the outputs, relative to the largest |eager output|."""
    expected, actual = _leaves(model(*args)), _leaves(run(*args))
    err = max((a.float() - e.float()).abs().max().item() for e, a in zip(expected, actual))
    return err / max(e.float().abs().max().item() for e in expected)


def _timed(fns: dict[str, Callable[[], None]], rounds: int, round_s: float) -> dict[str, float]:
    """Median ms per call of every function; rounds (each ≥ round_s, or one call)
    interleaved, their order rotated each round so no function always follows another."""
    calls = {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        calls[name] = max(1, min(200, math.ceil(round_s / max(time.perf_counter() - start, 1e-7))))
    names, samples = list(fns), defaultdict(list)
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            for _ in range(calls[name]):
                fns[name]()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: 1e3 * statistics.median(v) for name, v in samples.items()}


def _top_ops_torch(run: nn.Module, args: tuple, rows: int = 8) -> str:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            run(*args)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _top_ops_ort(model: nn.Module, args: tuple, rows: int = 8) -> str:
    """ONNX Runtime's own profile of the exported model: total µs per op type over 3 runs."""
    import onnxruntime as ort

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(model, args, dynamo=True, verbose=False).model_proto
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    session = ort.InferenceSession(proto.SerializeToString(), options, ["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    for _ in range(3):
        session.run(None, feeds)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 3
    total = sum(per_op.values()) or 1.0
    lines = ["op | µs per run | share", "---|---|---"]
    for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])[:rows]:
        lines.append(f"{op} | {us:.0f} | {us / total:.0%}")
    return "\n".join(lines)


def _write_profiles(model: str, profiles: list[str]) -> None:
    PROFILES.mkdir(parents=True, exist_ok=True)
    (PROFILES / f"{model}.md").write_text(
        f"# Top ops of the deployed-latency target rows: {model}\n\n"
        "Written by bench/test_bench_runtimes_cpu.py: torch.profiler for eager and compile "
        "(3 calls, sorted by self CPU time); ONNX Runtime's profiler (kernel time per op "
        "type), only for rows that miss their target.\n\n" + "\n".join(profiles)
    )


def _provider(key: str) -> str:
    return key.split("@")[0]


def _run_case(case: Case) -> tuple[list[dict], list[str]]:
    torch.manual_seed(0)
    dense = _dense(case.name).eval()
    examples = {b: _inputs(case.name, b) for b in case.batches}
    calls = [(examples[b], {}) for b in case.batches]
    svd = {rho: _svd_model(dense, rho) for rho in case.rhos}
    plain: dict[str, tuple[nn.Module, float | None]] = {"dense": (dense, None)}
    setup: dict[tuple[str, str], float] = {}
    for rho in case.rhos:
        plain[f"compress-flops@{rho}"] = (svdkern.compress(svd[rho], "flops").eval(), rho)
    chosen = {}
    for key, (rt, rho, batches) in case.latency.items():
        if rt not in TIMED_RUNTIMES:
            continue
        start = time.perf_counter()
        # Several examples go in as float input shapes; token ids are one example_inputs.
        where = (
            {"example_inputs": examples[batches[0]]}
            if len(batches) == 1
            else {"input_shape": [tuple(examples[b][0].shape) for b in batches]}
        )
        model, report = svdkern.compress(svd[rho], "latency", **where, runtime=rt, report=True)
        setup[(rt, key)] = time.perf_counter() - start
        plain[key] = (model.eval(), rho)
        chosen[key] = report.chosen
    macs = {
        k: svdkern.flops(m, example_inputs=_inputs(case.name, 1)).total_macs
        for k, (m, _) in plain.items()
    }
    params = {k: sum(p.numel() for p in m.parameters()) for k, (m, _) in plain.items()}
    times: dict[tuple[str, str, int], float] = {}
    errs: dict[tuple[str, str], float] = {}
    profiles: list[str] = []
    for rt in TIMED_RUNTIMES:
        models = {
            k: m
            for k, (m, _) in plain.items()
            if "@" not in k or k.split("@")[-1] in (rt, *map(str, case.rhos))
        }
        if rt in case.copies:
            models["dense-copy"] = copy.deepcopy(dense)
        running = {}
        for k, m in models.items():
            start = time.perf_counter()
            running[k] = runtimes.prepare(rt, m, calls)
            setup[(rt, k)] = setup.get((rt, k), 0.0) + time.perf_counter() - start
            if rt != "eager":
                errs[(rt, k)] = max(_rel_err(m, running[k], examples[b]) for b in case.batches)
        for b in case.batches:

            def forward(run: nn.Module, args=examples[b]) -> Callable[[], None]:
                def call() -> None:
                    with torch.no_grad():
                        run(*args)

                return call

            ms = _timed({k: forward(r) for k, r in running.items()}, case.rounds, case.round_s)
            for k, v in ms.items():
                times[(rt, k, b)] = v
        for (target_rt, provider, b), bound in case.targets.items():
            keys = [k for k in running if _provider(k) == provider] if target_rt == rt else []
            for key in keys:
                speedup = times[(rt, "dense", b)] / times[(rt, key, b)]
                if rt == "onnxruntime" and speedup >= bound:
                    continue
                head = (
                    f"### {case.name} {provider} rho={plain[key][1]} batch {b} in {rt}: "
                    f"{speedup:.2f}× dense (target ≥ {bound}×)"
                )
                for name in (key, "dense"):
                    if rt == "onnxruntime":
                        text = _top_ops_ort(models[name], examples[b])
                    else:
                        text = "```\n" + _top_ops_torch(running[name], examples[b]) + "```"
                    profiles += [f"{head} — top ops of {_provider(name)}", "", text, ""]
                    head = f"### {case.name} batch {b} in {rt}"
        del running
    rows = []
    for (rt, k, b), ms in times.items():
        dense_ms = times[(rt, "dense", b)]
        fastest = min(RUNTIMES, key=lambda r: times.get((r, "dense", b), math.inf))
        rho = plain[k][1] if k in plain else None
        row = {
            "scenario": case.name,
            "rho": "" if rho is None else rho,
            "batch": b,
            "runtime": rt,
            "provider": _provider(k),
            "tuned_batches": "/".join(map(str, case.latency[k][2])) if k in case.latency else "",
            "chosen": chosen.get(k, ""),
            "median_ms": ms,
            "vs_dense_same_runtime": ms / dense_ms,
            "speedup": dense_ms / ms,
            "vs_fastest_dense": ms / times[(fastest, "dense", b)],
            "fastest_dense": fastest,
            "vs_flops": (ms / times[(rt, f"compress-flops@{rho}", b)] if k in case.latency else ""),
            "macs": macs.get(k, macs["dense"]),
            "params": params.get(k, params["dense"]),
            "max_rel_err": errs.get((rt, k), ""),
            "setup_s": round(setup.get((rt, k), 0.0), 1),
            "threads": torch.get_num_threads(),
        }
        rows.append(row)
    return rows, profiles


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_deployed_latency_per_runtime(benchmark, case):
    if "onnxruntime" in TIMED_RUNTIMES:
        pytest.importorskip("onnxruntime")
    if case.name not in ("resnet20", "cnn"):
        pytest.importorskip("transformers")
    rows: list[dict] = []

    def measure():
        start = time.perf_counter()
        found, profiles = _run_case(case)
        rows[:] = [{**r, "case_s": round(time.perf_counter() - start)} for r in found]
        if profiles and not SMOKE:
            _write_profiles(case.name, profiles)

    benchmark.group = f"runtimes-{case.name}"
    benchmark.pedantic(measure, rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(result="runtimes_cpu", rows=list(rows))
