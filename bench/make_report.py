"""Generates BENCHMARKS.md (and its PNG plots) from the committed CSVs in bench/results/.

    python bench/make_report.py

BENCHMARKS.md opens with one headline table: every target of `TARGETS`, its measured
ratio, met / missed / not measured, device and date. Per-result tables follow, one per
CSV and device (its latest run), with the fixed columns op, shape, dtype, provider, ms,
ratio; training-step results also as a bar chart of the ratio to dense per provider.

A target is a declarative `Target` entry: the CSV, the columns that pick the rows, the
measured provider, what it is compared with and the bound. Add one to `TARGETS` and the
headline shows it (as "not measured" until its CSV has the rows).
"""

from __future__ import annotations

import csv
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PLOTS = RESULTS / "plots"
META = ("device", "torch", "triton", "git_sha", "date")
TIME_COLUMNS = ("ms", "median_ms")
# Columns that, with the op, describe a row's problem (in this order) when it has no `case`.
# What a row of each result measures, for CSVs whose rows carry no `op` column.
OPS = {
    "deploy_cpu": "deployed forward",
    "e2e_cpu": "training run",
    "runtimes_cpu": "deployed forward",
}
# Columns shown after the fixed ones, for results whose rows are more than a time.
EXTRA_COLUMNS = {"e2e_cpu": ("accuracy", "bits_per_byte", "macs"), "deploy_cpu": ("macs",)}
SHAPE_COLUMNS = (
    "scenario", "method", "seed", "batch", "rows", "m", "n", "r", "rho", "mode_form"
)  # fmt: skip


@dataclass(frozen=True)
class Target:
    """One promised ratio.

    The rows of `csv`'s latest run per device that match `where` (column → value; a value
    ending in `*` matches a prefix) are grouped by `group_by`; in each group the time of
    `provider` is compared with the time of `baseline` (a provider of the same group), with
    the value of `baseline_column` in the provider's own row (e.g. a traffic floor), or, if
    `column` is set, that column of the provider's row is the ratio itself.

    `kind="time"`: ratio = time / baseline time, met when ≤ bound (lower is better).
    `kind="speedup"`: ratio = baseline time / time, met when ≥ bound.
    Over several groups the headline shows the worst one (and names it).
    """

    name: str
    csv: str
    where: dict[str, str]
    bound: float
    kind: str = "time"
    provider: str = "svdkern"
    baseline: str | None = None
    baseline_column: str | None = None
    column: str | None = None
    group_by: tuple[str, ...] = ()
    platform: str = field(default="GPU")


def _gpu_train(model: str, batch: int) -> dict[str, str]:
    return {"scenario": model, "batch": str(batch), "dtype": "bf16"}


TARGETS: list[Target] = [
    # GPU training steps (H100/H200, bf16 autocast, one run on one GPU)
    Target("ResNet-20 b128 step ≤ 1.10× dense", "train_gpu", _gpu_train("resnet20", 128),
           1.10, baseline="dense"),
    Target("MLP stack b8192 efficiency ≥ 0.9", "train_gpu", _gpu_train("mlp-stack", 8192),
           0.9, kind="speedup", column="efficiency"),
    Target("MLP stack b65536 efficiency ≥ 0.9", "train_gpu", _gpu_train("mlp-stack", 65536),
           0.9, kind="speedup", column="efficiency"),
    Target("MLP stack b65536 step ≤ 1.2× dense", "train_gpu", _gpu_train("mlp-stack", 65536),
           1.2, baseline="dense"),
    Target("step ≤ 0.7× plain-PyTorch SVD step, every model", "train_gpu", {"dtype": "bf16"},
           0.7, baseline="reference", group_by=("scenario", "batch")),
    Target("step < torch.compile'd plain-PyTorch step, every model", "train_gpu",
           {"dtype": "bf16"}, 1.0, baseline="compiled-reference", group_by=("scenario", "batch")),
    Target("step ≥ 20× faster than TRP, every model", "train_gpu", {"dtype": "bf16"}, 20.0,
           kind="speedup", baseline="trp", group_by=("scenario", "batch")),
    # GPU ops (bench/bench_ops_gpu.py)
    Target("compose fwd+bwd 4096³ bf16 ≥ 1.0× eager reference", "ops_gpu",
           {"op": "compose", "case": "M4096-N4096-R4096", "mode": "full"}, 1.0,
           kind="speedup", baseline="reference"),
    Target("compose fwd 4096³ bf16 ≥ 0.85× torch.matmul throughput", "ops_gpu",
           {"op": "compose", "case": "M4096-N4096-R4096", "mode": "forward"}, 0.85,
           kind="speedup", baseline="torch.matmul"),
    Target("orth_loss fwd+bwd ResNet-50 ≥ 10× eager reference", "ops_gpu",
           {"op": "orth_loss", "case": "resnet50*", "mode": "full"}, 10.0, kind="speedup",
           baseline="reference"),
    Target("orth_loss fwd+bwd ResNet-50 faster than compiled reference", "ops_gpu",
           {"op": "orth_loss", "case": "resnet50*", "mode": "full"}, 1.0, kind="speedup",
           baseline="compiled-reference"),
    Target("lowrank 16384×4096² r128 fwd ≤ 1.25× traffic floor", "ops_gpu",
           {"op": "lowrank_linear", "case": "rows16384-N4096-M4096-R128", "mode": "forward"},
           1.25, baseline_column="floor_ms"),
    Target("lowrank 16384×4096² r128 fwd+bwd ≤ 1.25× traffic floor", "ops_gpu",
           {"op": "lowrank_linear", "case": "rows16384-N4096-M4096-R128", "mode": "full"},
           1.25, baseline_column="floor_ms"),
    Target("lowrank 16384×4096² r128 fwd+bwd ≥ 1.1× unfused matmul chain", "ops_gpu",
           {"op": "lowrank_linear", "case": "rows16384-N4096-M4096-R128", "mode": "full"},
           1.1, kind="speedup", baseline="reference"),
    # CPU training steps (`make bench`, 2 cores)
    Target("ResNet-20 b32 step ≤ 1.05× dense", "train_cpu",
           {"scenario": "resnet20", "batch": "32", "dtype": "fp32"}, 1.05, baseline="dense",
           platform="CPU"),
    Target("digits MLP b64 step ≤ 0.6× plain-PyTorch SVD step", "train_cpu",
           {"scenario": "digits-mlp", "batch": "64", "dtype": "fp32"}, 0.6,
           baseline="reference", platform="CPU"),
    # Rank-adaptive training (`make bench`, 2 cores): the step at rank fraction ρ, forms tuned
    Target("ResNet-20 b32 step at ρ=0.25 ≤ 0.8× dense (tuned forms)", "train_rank_cpu",
           {"scenario": "resnet20", "batch": "32", "rho": "0.25"}, 0.8, column="vs_dense",
           platform="CPU"),
    Target("ResNet-20 b32 step at ρ=0.5 ≤ 1.0× dense", "train_rank_cpu",
           {"scenario": "resnet20", "batch": "32", "rho": "0.5"}, 1.0, column="vs_dense",
           platform="CPU"),
    Target("ResNet-20 b32 step at ρ=0.25 ≤ 0.8× dense channels-last", "train_rank_cpu",
           {"scenario": "resnet20", "batch": "32", "rho": "0.25"}, 0.8,
           column="vs_dense_channels_last", platform="CPU"),
    Target("ResNet-20 b32 step at ρ=0.5 ≤ 1.0× dense channels-last", "train_rank_cpu",
           {"scenario": "resnet20", "batch": "32", "rho": "0.5"}, 1.0,
           column="vs_dense_channels_last", platform="CPU"),
    Target("ResNet-20 b32 step at ρ=0.1 ≤ 1.0× dense", "train_rank_cpu",
           {"scenario": "resnet20", "batch": "32", "rho": "0.1"}, 1.0, column="vs_dense",
           platform="CPU"),
    Target("svdkern compiled ≤ compiled plain-PyTorch SVD, every ρ", "train_rank_cpu",
           {"scenario": "resnet20", "batch": "32"}, 1.0, provider="svdkern-compiled",
           column="vs_compiled_reference", group_by=("rho",), platform="CPU"),
    Target("compress(policy='latency') ≤ 1.0× dense, batch 1 and 256", "deploy_cpu", {},
           1.0, provider="compress-latency", column="vs_dense",
           group_by=("scenario", "rho", "batch"), platform="CPU"),
    # Deployed latency per runtime (`make bench`, 2 cores, bench/test_bench_runtimes_cpu.py):
    # speedup = dense ms / ms, both in the same runtime
    Target("ResNet-20 ρ=0.25 compiled, latency policy tuned for b256: ≥ 1.4× compiled dense "
           "at b256", "runtimes_cpu",
           {"scenario": "resnet20", "rho": "0.25", "runtime": "compile", "batch": "256"}, 1.4,
           kind="speedup", provider="compress-latency-b256", column="speedup", platform="CPU"),
    Target("ResNet-20 ρ=0.25 compiled, latency policy tuned for b1/32/256: never slower than "
           "compiled dense", "runtimes_cpu",
           {"scenario": "resnet20", "rho": "0.25", "runtime": "compile"}, 1.0, kind="speedup",
           provider="compress-latency", column="speedup", group_by=("batch",), platform="CPU"),
    *(
        Target(f"{title} ρ=0.25 compiled, latency policy: ≥ {bound}× compiled dense at b{b}",
               "runtimes_cpu",
               {"scenario": model, "rho": "0.25", "runtime": "compile", "batch": str(b)},
               bound, kind="speedup", provider="compress-latency", column="speedup",
               platform="CPU")
        for model, title in (("bert-base", "BERT-base"), ("resnet50", "ResNet-50"))
        for b, bound in ((1, 2.0), (8, 2.5))
    ),
    *(
        Target(f"{title} ρ=0.25 compiled: latency policy ≤ 1.0× the MAC rule's model, b1 and b8",
               "runtimes_cpu", {"scenario": model, "rho": "0.25", "runtime": "compile"}, 1.0,
               provider="compress-latency", column="vs_flops", group_by=("batch",),
               platform="CPU")
        for model, title in (("bert-base", "BERT-base"), ("resnet50", "ResNet-50"))
    ),
    Target("ONNX Runtime: compressed (MAC rule) faster than dense exported the same way, every "
           "model, ρ and batch", "runtimes_cpu", {"runtime": "onnxruntime"}, 1.0,
           kind="speedup", provider="compress-flops", column="speedup",
           group_by=("scenario", "rho", "batch"), platform="CPU"),
    Target("ONNX Runtime: compressed model's outputs within 1e-4 (relative) of PyTorch's",
           "runtimes_cpu", {"runtime": "onnxruntime"}, 1e-4, provider="compress-flops",
           column="max_rel_err", group_by=("scenario", "rho", "batch"), platform="CPU"),
    # The main job end to end (`svdkern train`, default data and model, one run per method)
    Target("svd-adaptive train_seconds ≤ 1.0× dense (same run), seeds 0-2", "e2e_cpu",
           {"method": "svd-adaptive", "scenario": "digits-cnn"}, 1.0, provider="adaptive",
           column="vs_dense", group_by=("seed",), platform="CPU"),
    Target("LM: svd-adaptive train_seconds ≤ 0.8× dense (same run), seeds 0-2", "e2e_cpu",
           {"method": "svd-adaptive", "scenario": "text-gpt2-tiny"}, 0.8, provider="adaptive",
           column="vs_dense", group_by=("seed",), platform="CPU"),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Reading results


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def latest_runs(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows of the newest run for each device and scenario (one run's rows share one date
    stamp; a scenario benchmarked again alone replaces only its own rows)."""
    by_key: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        by_key[(row["device"], row.get("scenario", ""))].append(row)
    out: dict[str, list[dict]] = defaultdict(list)
    for (device, _), key_rows in by_key.items():
        newest = max(r["date"] for r in key_rows)
        out[device] += [r for r in key_rows if r["date"] == newest]
    return dict(out)


def time_of(row: dict) -> float | None:
    """The row's time in ms (a whole training run's `train_seconds` counts too)."""
    for col in TIME_COLUMNS:
        if row.get(col) not in (None, ""):
            return float(row[col])
    if row.get("train_seconds") not in (None, ""):
        return 1e3 * float(row["train_seconds"])
    return None


def _matches(row: dict, where: dict[str, str]) -> bool:
    for col, want in where.items():
        got = row.get(col, "")
        if want.endswith("*") and got.startswith(want[:-1]):
            continue
        if got != want:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# The headline


@dataclass
class Outcome:
    target: Target
    ratio: float | None = None
    met: bool | None = None
    device: str = ""
    date: str = ""
    group: str = ""


def _group_ratio(target: Target, rows: list[dict]) -> float | None:
    mine = [r for r in rows if r.get("provider") == target.provider]
    if len(mine) != 1:
        return None
    row = mine[0]
    if target.column:
        value = row.get(target.column, "")
        return float(value) if value not in ("", "nan") else None
    t = time_of(row)
    if target.baseline_column:
        base = row.get(target.baseline_column, "")
        base = float(base) if base not in ("", "nan") else None
    else:
        bases = [time_of(r) for r in rows if r.get("provider") == target.baseline]
        base = bases[0] if len(bases) == 1 else None
    if t is None or base is None or t <= 0 or base <= 0:
        return None
    return t / base if target.kind == "time" else base / t


def evaluate(target: Target, results: dict[str, list[dict]]) -> list[Outcome]:
    """The target's outcome on each device that measured it (one 'not measured' if none)."""
    if target.kind not in ("time", "speedup"):
        raise ValueError(f"Target {target.name!r}: kind must be 'time' or 'speedup'")
    outcomes = []
    for device, rows in latest_runs(results.get(target.csv, [])).items():
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for row in rows:
            if _matches(row, target.where):
                groups[tuple(row.get(c, "") for c in target.group_by)].append(row)
        ratios = {g: _group_ratio(target, rs) for g, rs in groups.items()}
        ratios = {g: v for g, v in ratios.items() if v is not None}
        if not ratios:
            continue
        pick = max if target.kind == "time" else min  # the worst group
        group = pick(ratios, key=ratios.get)
        ratio = ratios[group]
        met = ratio <= target.bound if target.kind == "time" else ratio >= target.bound
        date = groups[group][0]["date"][:10]  # the measured group's run, not the file's first
        label = " ".join(v for v in group if v) if len(ratios) > 1 else ""
        outcomes.append(Outcome(target, ratio, met, device, date, label))
    return outcomes or [Outcome(target)]


def headline(results: dict[str, list[dict]], targets: list[Target] = TARGETS) -> list[str]:
    lines = [
        "| target | measured | status | device | date |",
        "|---|---|---|---|---|",
    ]
    for target in targets:
        for o in evaluate(target, results):
            if o.ratio is None:
                lines.append(f"| {target.name} | — | not measured | {target.platform} | — |")
                continue
            worst = f" (worst: {o.group})" if o.group else ""
            status = "met" if o.met else "**missed**"
            lines.append(
                f"| {target.name} | {o.ratio:.3g}×{worst} | {status} | {o.device} | {o.date} |"
            )
    return lines


# ---------------------------------------------------------------------------------------------
# Per-result tables: op, shape, dtype, provider, ms, ratio


def _fmt(value: str) -> str:
    try:
        f = float(value)
    except ValueError:
        return value
    if f.is_integer() and abs(f) < 1e15:
        return str(int(f))
    return f"{f:.3g}" if abs(f) < 1000 else f"{f:.4g}"


def normalize(row: dict, stem: str = "") -> dict:
    """The fixed columns of a result row: op (with mode), shape, dtype, provider, ms."""
    op = row.get("op") or OPS.get(stem) or ("train step" if row.get("scenario") else "")
    if row.get("mode"):
        op = f"{op} {row['mode']}"
    if row.get("case"):
        shape = row["case"]
    else:
        parts = []
        for col in SHAPE_COLUMNS:
            if row.get(col, "") != "":
                parts.append(row[col] if col == "scenario" else f"{col}={_fmt(row[col])}")
        shape = " ".join(parts)
    return {
        "op": op,
        "shape": shape,
        "dtype": row.get("dtype", ""),
        "provider": row.get("provider", ""),
        "ms": time_of(row),
    }


def result_table(rows: list[dict], baseline: str, stem: str = "") -> list[str]:
    """Rows with ratio = ms / ms of `baseline` for the same op, shape and dtype, then the
    result's `EXTRA_COLUMNS`."""
    norm = [normalize(r, stem) for r in rows]
    base = {(n["op"], n["shape"], n["dtype"]): n["ms"] for n in norm if n["provider"] == baseline}
    # The result's extra columns that some row fills (a digits-only table has no bits/byte).
    extra = [
        c for c in EXTRA_COLUMNS.get(stem, ()) if any(r.get(c) not in (None, "") for r in rows)
    ]
    header = ["op", "shape", "dtype", "provider", "ms", "ratio", *extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, n in zip(rows, norm, strict=True):
        b = base.get((n["op"], n["shape"], n["dtype"]))
        ratio = f"{n['ms'] / b:.3g}" if b and n["ms"] is not None else ""
        ms = "" if n["ms"] is None else _fmt(str(n["ms"]))
        cells = [n["op"], n["shape"], n["dtype"], n["provider"], ms, ratio]
        cells += [_fmt(row.get(col, "")) for col in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def runtime_table(rows: list[dict]) -> list[str]:
    """Deployed latency per runtime: every row of runtimes_cpu with its ratio to the dense
    model in the same runtime and to the fastest dense runtime."""
    header = [
        "model", "ρ", "batch", "runtime", "provider", "tuned at", "deployed", "ms",
        "× dense same runtime", "× fastest dense", "vs MAC rule", "MACs", "params",
        "max rel err",
    ]  # fmt: skip
    order = {"eager": 0, "compile": 1, "onnxruntime": 2}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def key(r: dict) -> tuple:
        return (r["scenario"], r["rho"] or "1", int(r["batch"]), order.get(r["runtime"], 9))

    for r in sorted(rows, key=key):
        fastest = f"{_fmt(r['vs_fastest_dense'])} ({r['fastest_dense']})"
        err = r.get("max_rel_err", "")
        cells = [
            r["scenario"], r["rho"] or "—", r["batch"], r["runtime"], r["provider"],
            r.get("tuned_batches", ""), r.get("chosen", ""), _fmt(r["median_ms"]),
            _fmt(r["vs_dense_same_runtime"]), fastest, _fmt(r.get("vs_flops", "")),
            _fmt(r["macs"]), _fmt(r["params"]), f"{float(err):.1e}" if err else "",
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def plot_train(rows: list[dict], path: Path, title: str) -> bool:
    if not rows or "vs_dense" not in rows[0] or "method" in rows[0]:
        return False  # whole training runs (one per method) are a table only
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted(
        {(r["scenario"], r.get("batch", ""), r.get("dtype", "")) for r in rows}, key=str
    )
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / len(providers)
    for i, provider in enumerate(providers):
        values = []
        for g in groups:
            match = [
                r for r in rows if (r["scenario"], r.get("batch", ""), r.get("dtype", "")) == g
            ]
            match = [r for r in match if r["provider"] == provider]
            values.append(float(match[0]["vs_dense"]) if match else 0.0)
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=provider)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{s}\nb{b} {d}" for s, b, d in groups], fontsize=8)
    ax.set_ylabel("time / dense time")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(results: dict[str, list[dict]], plots: bool = True) -> str:
    """BENCHMARKS.md from {csv stem: rows}."""
    parts = [
        "# svdkern benchmarks",
        "",
        "Generated by `python bench/make_report.py` from the CSVs in `bench/results/` (the "
        "latest run per device). Reproduce with `make bench` (CPU, pytest-benchmark) and "
        "`make gpu-bench PYTHON=python3` (GPU, `triton.testing.do_bench`). Every ratio is "
        "against a baseline measured in the same run on the same device.",
        "",
        "## Targets",
        "",
        *headline(results),
        "",
        "Ratios: `≤` targets are time ratios (lower is better), `≥` targets speedups or "
        "efficiencies (higher is better); over several models the worst one is shown. "
        "The kernels' static check for the H100 (registers, spills, shared memory, MMA "
        "kind of every compiled variant): [bench/results/kernels_sm90.md]"
        "(bench/results/kernels_sm90.md).",
        "",
    ]
    logs = sorted(RESULTS.glob("gpu_test_*.log"))
    if logs:
        parts += [f"Latest GPU test log: [{logs[-1].name}]({logs[-1].relative_to(ROOT)}).", ""]
    for stem, rows in sorted(results.items()):
        if not rows:
            continue
        if stem == "runtimes_cpu":
            parts += _runtime_section(rows)
            continue
        train = "scenario" in rows[0]
        baseline = "dense" if train else "reference"
        for device, run_rows in latest_runs(rows).items():
            runs = dict.fromkeys(
                f"torch {r['torch']}, triton {r['triton']}, git {r['git_sha']}, {r['date']}"
                for r in run_rows
            )
            parts += [
                f"## {stem} — {device}",
                "",
                f"{'; '.join(runs)}. ratio = ms / ms of `{baseline}` (same op, shape, dtype).",
                "",
            ]
            slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-")
            png = PLOTS / f"{stem}-{slug}.png"
            if plots and train and plot_train(run_rows, png, f"{stem}: {device}"):
                parts += [f"![{stem}]({png.relative_to(ROOT)})", ""]
            parts += [*result_table(run_rows, baseline, stem), ""]
    return "\n".join(parts)


def _runtime_section(rows: list[dict]) -> list[str]:
    parts = []
    for device, run_rows in latest_runs(rows).items():
        runs = dict.fromkeys(
            f"torch {r['torch']}, git {r['git_sha']}, {r['date']}" for r in run_rows
        )
        parts += [
            f"## Deployed latency per runtime — {device}",
            "",
            f"{'; '.join(runs)}. bench/test_bench_runtimes_cpu.py: random weights, every "
            "decomposable layer cut to max(1, round(ρ·full rank)); eager, torch.compile "
            "(inductor, freezing) and ONNX Runtime (CPU) as `svdkern.runtimes` runs them. "
            "× dense same runtime = ms / the dense model's ms in that runtime (dense-copy: "
            "the resolution); × fastest dense = ms / the fastest runtime's dense ms (named); "
            'vs MAC rule = policy "latency" ms / policy "flops" ms; MACs per sample; '
            "max rel err = largest |runtime − PyTorch| / largest |PyTorch output|; "
            'deployed = the candidate policy "latency" chose.',
            "",
        ]
        profiles = sorted((RESULTS / "runtimes_cpu_profiles").glob("*.md"))
        if profiles:
            links = ", ".join(f"[{p.stem}]({p.relative_to(ROOT)})" for p in profiles)
            parts += [f"Top ops of the target rows: {links}.", ""]
        parts += [*runtime_table(run_rows), ""]
    return parts


def main() -> int:
    csvs = sorted(RESULTS.glob("*.csv"))
    if not csvs:
        print("make_report: no CSVs in bench/results; run `make bench` first", file=sys.stderr)
        return 2
    results = {path.stem: read_csv(path) for path in csvs}
    (ROOT / "BENCHMARKS.md").write_text(render(results))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
