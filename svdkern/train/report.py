"""Reports of `svdkern train` (`finalize`: report.json, report.md, plots) and `svdkern compare`.

report.json::

    {"models": {"dense" | "svd" | "pruned" | "compressed" | "posthoc" | "trp" | ...:
                   {"accuracy": fraction, "params": int, "macs": int, "ranks": {layer: r}, ...}},
     "config": {...every flag...}, "latency": {...}, "prune": {...}, "spectra": {...},
     "environment": {...}}

params and macs are per sample, each SVD layer counted in its cheaper form (its low-rank
pair or one dense layer, `svdkern.compress(policy="flops")`); those of "compressed" are of
the final model as deployed (the run's --compress-policy), whose "forms" = {SVD layer:
"lowrank" | "dense"} say what it made of each layer.
train_seconds is the wall-clock of all the training (steps, rank cuts, form tuning;
not evaluation or checkpoints) of the phases that produced the model in this run,
train_cpu_seconds the process's CPU time of the same (steadier on a shared machine);
latency_ms = {batch: median ms} of its deployed form (batch norms folded) in eval mode, in
--deploy-runtime, every model timed interleaved in one measurement ("latency" holds the same
figures of dense and compressed, and the runtime).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import svdkern
from svdkern.fold import fold_batchnorm
from svdkern.runtimes import prepare
from svdkern.train import plots
from svdkern.train.measure import deployed_forms, measure, spectra
from svdkern.train.recipe import FINAL, PHASES, PRUNED, RESULTS
from svdkern.tune import time_models

if TYPE_CHECKING:
    from svdkern.train.loop import Pipeline

__all__ = [
    "ReportError",
    "compare",
    "finalize",
    "format_table",
    "measure_latencies",
    "write_report",
]

ORDER = (
    "dense",
    "svd",
    "pruned",
    "adaptive_svd",
    "adaptive",
    "compressed",
    "posthoc",
    "trp_trained",
    "trp",
)
DESCRIPTIONS = {
    **{p.result: p.description for p in PHASES.values()},
    "compressed": "pruned model compressed to plain torch layers",
}


class ReportError(ValueError):
    """A run's report.json that `compare` cannot read; the message names the file."""


def _ordered(models: dict[str, Any]) -> list[str]:
    return [k for k in ORDER if k in models] + sorted(k for k in models if k not in ORDER)


def measure_latencies(
    models: dict[str, nn.Module], x: torch.Tensor, rounds: int = 7, budget_s: float = 0.05
) -> dict[str, float]:
    """Median ms per call of every model on x in eval mode, interleaved: each round times a
    block of calls (≥ budget_s) of every model in turn, so drift of a busy machine falls on
    all of them alike (`svdkern.tune.time_models`)."""
    times = time_models(models, [((x,), {})], repeats=rounds, round_s=budget_s, max_calls=200)
    return {name: ms[0] for name, ms in times.items()}


def _forms_note(model: dict[str, Any]) -> str:
    """What compress made of a deployed model's SVD layers, e.g. " (2 of 4 SVD layers as
    low-rank pairs, 2 dense)"; "" for a model without that record."""
    forms = model.get("forms")
    if not forms:
        return ""
    pairs, n = sum(form == "lowrank" for form in forms.values()), len(forms)
    if pairs == 0:
        return f" (all {n} SVD layers as one dense layer each)"
    if pairs == n:
        return f" (all {n} SVD layers as low-rank pairs)"
    return f" ({pairs} of {n} SVD layers as low-rank pairs, {n - pairs} dense)"


def quality_header(models: Sequence[dict[str, Any]]) -> str:
    """The quality column's title: test accuracy (classifiers), validation bits per byte
    (language models), or both kinds when the models mix them."""
    kinds = {"bits_per_byte" in m for m in models}
    if kinds == {True}:
        return "val bits/byte"
    return "test accuracy" if kinds == {False} else "accuracy / bits/byte"


def quality(m: dict[str, Any]) -> str:
    """A model's quality figure: its validation bits per byte (lower is better) for a
    language model, else its test accuracy."""
    if "bits_per_byte" in m:
        return f"{m['bits_per_byte']:.4f}"
    return f"{100 * m['accuracy']:.2f}%"


def format_table(models: dict[str, dict[str, Any]], markdown: bool = False) -> str:
    """quality (accuracy or bits per byte), params, MACs (and × fewer MACs than dense) and
    training seconds of every model."""
    dense_macs = models.get("dense", {}).get("macs")
    header = ["model", quality_header(list(models.values())), "params", "MACs", "MACs ÷"]
    header.append("train s")
    rows = []
    for name in _ordered(models):
        m = models[name]
        ratio = f"{dense_macs / m['macs']:.2f}×" if dense_macs and m.get("macs") else "-"
        train = f"{m['train_seconds']:.1f}" if m.get("train_seconds") is not None else "-"
        rows.append(
            [
                name,
                quality(m),
                f"{m['params']:,}",
                f"{m['macs']:,}",
                ratio,
                train,
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def _rank_table(models: dict[str, dict[str, Any]]) -> str:
    full = next((m["full_ranks"] for m in models.values() if m.get("full_ranks")), {})
    cols = [k for k in _ordered(models) if k != "compressed" and models[k].get("ranks")]
    lines = ["| layer | full | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for layer in full:
        cells = [str(models[c]["ranks"].get(layer, "-")) for c in cols]
        lines.append(f"| {layer} | {full[layer]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(report: dict[str, Any], pictures: dict[str, str]) -> str:
    cfg, models = report["config"], report["models"]
    env = report["environment"]
    prune = cfg["energy"] if cfg.get("target_flops") is None else None
    lines = [
        f"# svdkern train: {cfg['out']}",
        "",
        f"Data **{cfg['data']}** ({env['train_size']} train / {env['test_size']} test), "
        f"model **{cfg['model']}**, method **{cfg['method']}**, decomposition "
        f"{cfg['decomposition']}, λ_o = {cfg['orth']}, {cfg['sparsity']} λ_s = {cfg['strength']}, "
        + (f"energy ε = {prune}" if prune is not None else f"target MACs {cfg['target_flops']}")
        + f"; {cfg['optimizer']} lr {cfg['lr']}, {cfg['schedule']} schedule"
        + (f" after {cfg['warmup_steps']} warm-up steps" if cfg.get("warmup_steps") else "")
        + ", batch "
        f"{cfg['batch_size']}, epochs dense/svd/finetune {cfg['dense_epochs']}/"
        f"{cfg['svd_epochs']}/{cfg['finetune_epochs']}, seed {cfg['seed']}.",
        "",
        f"Device {env['device']} ({env['processes']} process(es)), torch {env['torch']}, "
        f"svdkern backend {env['backend']}, wall time {env['wall_time_s']:.0f} s.",
        "",
        "## Models",
        "",
        "MACs and params per sample. An SVD model counts every SVD layer in its cheaper "
        "form, its low-rank pair or one dense layer (`svdkern.compress(policy='flops')`); "
        "**compressed** is the final model as deployed, counted as it runs.",
        "",
        format_table(models, markdown=True),
        "",
    ]
    lines += [
        f"- **{k}**: {DESCRIPTIONS.get(k, k)}{_forms_note(models[k])}" for k in _ordered(models)
    ]
    before = {
        k: quality(
            {"accuracy": m["accuracy_before_finetune"]}
            if "bits_per_byte_before_finetune" not in m
            else {"bits_per_byte": m["bits_per_byte_before_finetune"]}
        )
        for k, m in models.items()
        if "accuracy_before_finetune" in m
    }
    if before:
        what = quality_header(list(models.values())).replace("val bits/byte", "Bits per byte")
        lines += [
            "",
            f"{what[0].upper()}{what[1:]} right after pruning, before fine-tuning: "
            + ", ".join(f"{k} {v}" for k, v in before.items())
            + ".",
        ]
    lat = report.get("latency")
    if lat:
        lines += [
            "",
            f"## Inference latency ({lat['device']}, median of repeated calls, eval mode)",
            "",
            f"Deployed with `svdkern.compress(policy={lat.get('policy', 'flops')!r})`, batch "
            f"norms folded, run in {lat.get('runtime', 'eager')}; every model timed "
            "interleaved in one measurement (also the table below).",
            "",
            "| model | " + " | ".join(f"batch {b} (ms)" for b in lat["batches"]) + " |",
            "|---|" + "---|" * len(lat["batches"]),
        ]
        for name in ("dense", "compressed"):
            if name in lat["ms"]:
                cells = [f"{v:.3f}" for v in lat["ms"][name]]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if {"dense", "compressed"} <= set(lat["ms"]):
            pairs = zip(lat["ms"]["compressed"], lat["ms"]["dense"], strict=True)
            lines.append(
                "| compressed ÷ dense | " + " | ".join(f"{c / d:.2f}×" for c, d in pairs) + " |"
            )
    timed = [k for k in _ordered(models) if models[k].get("latency_ms")]
    if timed:
        sizes = list(models[timed[0]]["latency_ms"])
        phases = env.get("phase_seconds", {})
        lines += [
            "",
            "## Training time and deployed latency",
            "",
            "train s: wall-clock of the training that produced the model (phases: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
            + "); latency of the deployed form (compressed for SVD models), eval mode, all "
            "models timed interleaved.",
            "",
            "| model | train s | " + " | ".join(f"batch {b} (ms)" for b in sizes) + " |",
            "|---|---|" + "---|" * len(sizes),
        ]
        for name in timed:
            m = models[name]
            cells = [f"{m['latency_ms'].get(b, float('nan')):.3f}" for b in sizes]
            train = m.get("train_seconds")
            train_text = "-" if train is None else f"{train:.1f}"
            lines.append(f"| {name} | {train_text} | " + " | ".join(cells) + " |")
    lines += ["", "## Ranks per layer", "", _rank_table(models), ""]
    if pictures:
        lines += ["## Plots", ""]
        lines += [f"![{title}]({name})" for title, name in pictures.items()]
        lines.append("")
    return "\n".join(lines)


# The large batch of the deployed models' latency: a language model's is in windows of
# --seq-len tokens (256 of them take about a second per forward of gpt2-tiny on 2 cores).
LATENCY_BATCH = {"classification": 256, "lm": 16}


def finalize(run: Pipeline) -> tuple[dict[str, Any], dict[str, Path]]:
    """The end of a run: every trained model loaded once and deployed (the SVD ones by
    `svdkern.compress` with --compress-policy), all timed interleaved in one measurement so
    the figures compare like with like, the final model's deployed form measured as the
    "compressed" result; then report.json, report.md and the plots are written. Returns the
    report and the written paths."""
    cfg, env, ds = run.cfg, run.env, run.ds
    final = FINAL[cfg["method"]]
    batches = [1, min(LATENCY_BATCH[ds.task], len(ds.y_test))]
    inputs = {b: ds.normalize(ds.x_test[:b].to(env.device)) for b in batches}
    runtime = cfg.get("deploy_runtime", "eager")
    trained: dict[str, nn.Module] = {}
    deployed: dict[str, nn.Module] = {}
    for name in run.results:
        if name == "compressed":
            continue
        trained[name] = run.load_result(name)
        if RESULTS[name].svd:
            deployed[name] = _deploy(run, trained[name], inputs)
        else:
            deployed[name] = copy.deepcopy(trained[name]).eval()
            fold_batchnorm(deployed[name])
    ms: dict[str, list[float]] = {name: [] for name in deployed}
    examples = [((inputs[b],), {}) for b in batches]
    running = {name: prepare(runtime, m, examples) for name, m in deployed.items()}
    for b in batches:
        for name, value in measure_latencies(running, inputs[b]).items():
            ms[name].append(value)
    for name in deployed:
        run.results[name]["latency_ms"] = {
            str(b): v for b, v in zip(batches, ms[name], strict=True)
        }
    latency = None
    if final != "dense":
        compressed = deployed[final]
        result = measure(compressed, ds, run.example, cfg["decomposition"])
        for key in ("ranks", "full_ranks", "train_seconds", "train_cpu_seconds", "latency_ms"):
            result[key] = run.results[final][key]
        result["from"] = final
        result["forms"] = deployed_forms(trained[final], compressed)
        run.results["compressed"] = result
        latency = {
            "device": str(env.device),
            "batches": batches,
            "ms": {"dense": ms["dense"], "compressed": ms[final]},
            "policy": cfg.get("compress_policy", "flops"),
            "runtime": runtime,
        }
    spec = {}
    if "svd" in run.results:
        spec = {
            "before": spectra(trained["dense"], cfg["decomposition"]),
            "after": spectra(trained["svd"], cfg["decomposition"]),
        }
    doc = {
        "models": run.results,
        "config": cfg,
        "latency": latency,
        "prune": run.info,
        "spectra": spec,
        "environment": {
            "device": str(env.device),
            "processes": env.world,
            "torch": torch.__version__,
            "backend": svdkern.backend(),
            "train_size": len(ds.y_train),
            "test_size": len(ds.y_test),
            "wall_time_s": run.wall_time(),
            "phase_seconds": run.info.get("phase_seconds", {}),
            "phase_cpu_seconds": run.info.get("phase_cpu_seconds", {}),
        },
    }
    return doc, write_report(run.dir, doc, epochs=run.files.metrics())


def _deploy(run: Pipeline, model: nn.Module, inputs: dict[int, torch.Tensor]) -> nn.Module:
    """`model` compressed by --compress-policy with its batch norms folded, in eval mode:
    the latency policy times it in --deploy-runtime at the report's batches (a language
    model at the largest: token ids cannot be drawn as random floats), the others count
    MACs at the run's example input."""
    policy = run.cfg.get("compress_policy", "flops")
    model = model.eval()
    if policy != "latency":
        return svdkern.compress(model, policy, example_inputs=(run.example,), fold_bn=True)
    timing = {"runtime": run.cfg.get("deploy_runtime", "eager"), "fold_bn": True}
    if run.ds.task == "lm":
        return svdkern.compress(model, policy, example_inputs=(inputs[max(inputs)],), **timing)
    shapes = [x.shape for x in inputs.values()]
    return svdkern.compress(model, policy, input_shape=shapes, **timing)


def write_report(
    run_dir: Path, report: dict[str, Any], epochs: list[dict[str, Any]] = ()
) -> dict[str, Path]:
    """report.json, the plots and report.md in `run_dir`; returns the written paths.

    `epochs` are the run's metrics rows (one per epoch) for the rank-over-epochs and
    step-time-over-epochs plots."""
    run_dir = Path(run_dir)
    written = {"json": run_dir / "report.json"}
    written["json"].write_text(json.dumps(report, indent=2) + "\n")
    models = report["models"]
    pictures: dict[str, str] = {}
    spec = report.get("spectra", {})
    if spec.get("before") and spec.get("after"):
        written["spectra"] = plots.plot_spectra(
            spec["before"], spec["after"], run_dir / "spectra.png"
        )
        pictures["singular values per layer"] = "spectra.png"
    full = next((m["full_ranks"] for m in models.values() if m.get("full_ranks")), None)
    pruned = {k: models[k]["ranks"] for k in PRUNED if k in models}
    if full and pruned:
        written["ranks"] = plots.plot_ranks(full, pruned, run_dir / "ranks.png")
        pictures["rank per layer"] = "ranks.png"
    written["accuracy_vs_macs"] = plots.plot_accuracy_vs_macs(
        {report["config"]["out"]: models}, run_dir / "accuracy_vs_macs.png"
    )
    pictures["accuracy vs MACs"] = "accuracy_vs_macs.png"
    if any("rank_fraction" in row for row in epochs):
        written["ranks_over_epochs"] = plots.plot_rank_over_epochs(
            epochs, run_dir / "ranks_over_epochs.png"
        )
        pictures["rank over epochs"] = "ranks_over_epochs.png"
    if any("step_ms" in row for row in epochs):
        written["step_time"] = plots.plot_step_time(epochs, run_dir / "step_time.png")
        pictures["step time over epochs"] = "step_time.png"
    written["markdown"] = run_dir / "report.md"
    written["markdown"].write_text(_markdown(report, pictures))
    return written


def compare(run_dirs: Sequence[str], plot: str | None = "compare.png") -> str:
    """One table of every model of every run, and one accuracy-vs-MACs plot."""
    runs = {str(d): _load_models(Path(d)) for d in run_dirs}
    every = [m for models in runs.values() for m in models.values()]
    header = ["run", "model", quality_header(every), "params", "MACs", "MACs ÷"]
    rows = []
    for run, models in runs.items():
        dense = models.get("dense", {}).get("macs")
        for name in _ordered(models):
            m = models[name]
            ratio = f"{dense / m['macs']:.2f}×" if dense and m.get("macs") else "-"
            rows.append(
                [
                    run,
                    name,
                    quality(m),
                    f"{m['params']:,}",
                    f"{m['macs']:,}",
                    ratio,
                ]
            )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )

    text = "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])
    if plot:
        try:
            plots.plot_accuracy_vs_macs(runs, Path(plot))
        except (OSError, ValueError) as exc:  # ValueError: a file type matplotlib cannot write
            raise ReportError(
                f"--plot {plot}: cannot write: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        text += f"\n\nplot: {plot}"
    return text


def _load_models(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The "models" table of a run's report.json, each model's accuracy (a fraction), params
    and macs (integers) checked; FileNotFoundError for a directory without one, ReportError
    naming the file for one that cannot be read as a report."""
    path = run_dir / "report.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir}: no report.json (is it a finished `svdkern train` run?)"
        )
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ReportError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not UTF-8 text (not a report of svdkern train)") from None
    except json.JSONDecodeError as exc:
        raise ReportError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            "rerun the run's training or remove it from the list"
        ) from None
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, dict) or not models:
        raise ReportError(f'{path}: no "models" table (not a report of svdkern train)')
    for name, m in models.items():
        ok = (
            isinstance(m, dict)
            and isinstance(m.get("accuracy"), int | float)
            and not isinstance(m.get("accuracy"), bool)
            and all(
                isinstance(m.get(k), int) and not isinstance(m.get(k), bool)
                for k in ("params", "macs")
            )
        )
        if not ok:
            raise ReportError(
                f"{path}: model {name!r} lacks a numeric accuracy or integer params and macs"
            )
    return models
