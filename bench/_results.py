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


def _git(*args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=RESULTS.parent, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def _git_sha() -> str:
    """HEAD's short sha, with "-dirty" when a tracked file outside bench/results differs
    from it: the figures were then measured on code that no commit holds."""
    try:
        sha = _git("rev-parse", "--short", "HEAD")
        changed = _git(
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ":/",
            ":(top,exclude)bench/results",
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if changed else sha


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


def _merged_header(path: Path, fields: list[str]) -> list[str]:
    """The CSV's columns followed by any of `fields` it lacks; if there are new ones the
    file is rewritten (atomically) with the wider header, its rows blank in them."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        existing = list(reader.fieldnames or [])
        old_rows = list(reader)
    merged = existing + [c for c in fields if c not in existing]
    if merged != existing:
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=merged, restval="")
            writer.writeheader()
            writer.writerows(old_rows)
        tmp.replace(path)
    return merged


def append_rows(name: str, rows: list[dict], device: str | torch.device = "cpu") -> Path:
    """Append result rows (dicts with the same keys) to bench/results/<name>.csv.

    A benchmark that gains a column (a new ratio) widens the CSV: earlier runs' rows get
    an empty value there, and rows lacking one of the CSV's columns are written blank in it.
    """
    if not rows:
        raise ValueError("append_rows: rows must be a non-empty list of dicts")
    meta = provenance(device)
    full = [{**row, **meta} for row in rows]
    fields = list(full[0])
    path = RESULTS / f"{name}.csv"
    RESULTS.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    if not new:
        fields = _merged_header(path, fields)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if new:
            writer.writeheader()
        writer.writerows(full)
    return path
