"""Plots of a run (matplotlib, Agg backend, PNG).

spectra.png           singular values per layer: dense (= at decomposition) vs after SVD training
ranks.png             rank per layer: full, and each pruned model
accuracy_vs_macs.png  test accuracy vs MACs of every model of one or more runs
ranks_over_epochs.png Σ rank / Σ full rank of the SVD layers after every epoch, per phase
step_time.png         mean training-step time of every epoch, per phase
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = [
    "plot_accuracy_vs_macs",
    "plot_rank_over_epochs",
    "plot_ranks",
    "plot_spectra",
    "plot_step_time",
]

_MARKERS = {"dense": "s", "svd": "D", "pruned": "o", "compressed": "x", "posthoc": "^", "trp": "v"}


def _save(fig, path: Path) -> None:
    """Write `fig` to `path` (PNG, 110 dpi) and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spectra(
    before: dict[str, list[float]], after: dict[str, list[float]], path: Path, title: str = ""
) -> Path:
    """One panel per layer: singular values before and after SVD training (log scale)."""
    names = [n for n in before if n in after] or list(before)
    cols = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for label, values, style in (("dense", before, "-"), ("after SVD training", after, "--")):
            if values.get(name):
                s = [max(v, 1e-12) for v in values[name]]
                ax.semilogy(range(1, len(s) + 1), s, style, label=label)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title or "singular values per layer (|s|, sorted)", fontsize=10)
    fig.supxlabel("index", fontsize=8)
    _save(fig, path)
    return path


def plot_ranks(
    full: dict[str, int], models: dict[str, dict[str, int]], path: Path, title: str = ""
) -> Path:
    """Grouped bars per layer: full rank and the rank of each given model."""
    names = list(full)
    series = [("full", full), *models.items()]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(names) * len(series) / 2 + 2), 3.6))
    for i, (label, values) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [values.get(n, 0) for n in names], width, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("rank")
    ax.set_title(title or "rank per layer", fontsize=10)
    ax.legend(fontsize=7)
    _save(fig, path)
    return path


def plot_accuracy_vs_macs(runs: dict[str, dict[str, dict[str, Any]]], path: Path) -> Path:
    """Test accuracy (%) vs MACs (log) of every model of every run; validation bits per
    byte instead when every model is a language model.

    One run: a colour per model. Several runs: a colour per run, a marker per model.
    `compressed` is left out (it is the pruned model, at the same MACs and accuracy).
    """
    lm = all("bits_per_byte" in m for models in runs.values() for m in models.values())
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, models) in enumerate(runs.items()):
        names = [n for n in models if n != "compressed"]
        for j, name in enumerate(names):
            m = models[name]
            if m.get("macs") is None or m.get("accuracy") is None:
                continue
            single = len(runs) == 1
            ax.scatter(
                m["macs"],
                m["bits_per_byte"] if lm else 100 * m["accuracy"],
                marker=_MARKERS.get(name, "o"),
                color=colors[(j if single else i) % len(colors)],
                s=50,
                label=name if single else f"{run}: {name}",
                alpha=0.85,
            )
    ax.set_xscale("log")
    ax.set_xlabel("MACs per sample (log)")
    ax.set_ylabel("validation bits per byte (lower is better)" if lm else "test accuracy (%)")
    ax.set_title("bits per byte vs MACs" if lm else "accuracy vs MACs", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    return path


def _per_phase(rows: list[dict[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """{phase: (global epoch numbers, values of `key`)}, epochs counted over the whole run."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for i, row in enumerate(rows, start=1):
        if key in row:
            xs, ys = out.setdefault(row["phase"], ([], []))
            xs.append(i)
            ys.append(row[key])
    return out


def _epoch_plot(series, ylabel: str, title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for phase, (xs, ys) in series.items():
        ax.plot(xs, ys, marker=".", label=phase)
    ax.set_xlabel("epoch of the run")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    return path


def plot_rank_over_epochs(rows: list[dict[str, Any]], path: Path) -> Path:
    """Σ rank / Σ full rank of the SVD layers at the end of every epoch, one line per phase."""
    return _epoch_plot(
        _per_phase(rows, "rank_fraction"),
        "Σ rank / Σ full rank",
        "rank of the SVD layers over training",
        path,
    )


def plot_step_time(rows: list[dict[str, Any]], path: Path) -> Path:
    """Mean training-step time (ms) of every epoch, one line per phase."""
    return _epoch_plot(_per_phase(rows, "step_ms"), "ms per step", "training-step time", path)
