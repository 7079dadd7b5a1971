"""Rows of benchmark results, appended to bench/results/<name>.csv with their provenance.

Every row carries the device, torch/triton versions, git sha and date, so a CSV
mixing several runs stays readable and BENCHMARKS.md can be regenerated from it.
"""

from __future__ import annotations

import csv
import datetime as _dt
import platform
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=RESULTS.parent,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(device: str | torch.device = "cpu") -> dict[str, str]:
    """Device name, versions, git sha and UTC date of this run."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "git_sha": _git_sha(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def append_rows(name: str, rows: list[dict], device: str | torch.device = "cpu") -> Path:
    """Append result rows (dicts with the same keys) to bench/results/<name>.csv."""
    if not rows:
        raise ValueError("append_rows: rows must be a non-empty list of dicts")
    meta = provenance(device)
    full = [{**row, **meta} for row in rows]
    fields = list(full[0])
    path = RESULTS / f"{name}.csv"
    RESULTS.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    if not new:
        with path.open(newline="") as f:
            existing = next(csv.reader(f), None)
        if existing and existing != fields:
            raise ValueError(
                f"append_rows: columns {fields} differ from those of {path} ({existing}); "
                "use a new result name for a new layout"
            )
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(full)
    return path
