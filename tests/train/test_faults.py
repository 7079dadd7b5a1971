"""Fault injection into `svdkern train`: kill -9 at seeded random points (inside a checkpoint
write, between a metrics row and its checkpoint, half-way through a row, at a random time),
then `--resume`, must end bit-identical to an uninterrupted run with the same metrics rows;
a write that fails with ENOSPC or EROFS must end in one message naming the file and the
cause, with the previous checkpoint intact and resumable."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TRAIN, cli_env, run_cli

from svdkern.__main__ import main
from svdkern.train import checkpoint, loop, rundir

# dense 2 → svd 1 → finetune 1: four checkpoints, three phase files, four metrics rows.
ARGS = ["--data", "synthetic", "--quiet", "--method", "svd", "--no-baselines"]
ARGS += ["--dense-epochs", "2", "--svd-epochs", "1", "--finetune-epochs", "1"]
ARGS += ["--compress-policy", "flops"]  # the latency policy's choice depends on timings
TIMES = ("seconds", "train_seconds", "train_cpu_seconds", "step_ms")
MODELS = ("dense.pt", "svd.pt", "pruned.pt")

# `svdkern train` in a subprocess that SIGKILLs itself at the n-th write of a kind:
#   mid:     half of a checkpoint's temporary file written (checkpoint.pt or a phase file)
#   written: the temporary file complete, before os.replace
#   row:     half of a metrics row written (before that epoch's checkpoint)
LAUNCHER = """
import json, os, signal, sys
from svdkern.train import checkpoint, rundir
from svdkern.__main__ import main

n, stage = int(sys.argv[1]), sys.argv[2]
count = [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

write = checkpoint._write

def _write(path, data):
    count[0] += stage in ("mid", "written")
    if count[0] == n and stage == "mid":
        write(path, data[: len(data) // 2])
        die()
    write(path, data)
    if count[0] == n and stage == "written":
        die()

append_metrics = rundir.RunFiles.append_metrics

def _append_metrics(self, row):
    count[0] += stage == "row"
    if count[0] == n and stage == "row":
        with open(self.directory / rundir.METRICS, "a") as f:
            f.write(json.dumps(row)[:25])
        die()
    append_metrics(self, row)

checkpoint._write = _write
rundir.RunFiles.append_metrics = _append_metrics
sys.exit(main(["train", *sys.argv[3:]]))
"""


def _train(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", LAUNCHER, *launcher] if launcher else TRAIN
    return run_cli([*cmd, *args])


def _rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMES} for x in lines]


def _same_run(a: Path, b: Path) -> None:
    for name in MODELS:
        sa, sb = checkpoint.load(a / name)["model"], checkpoint.load(b / name)["model"]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)
    assert _rows(a) == _rows(b)
    ra = json.loads((a / "report.json").read_text())["models"]
    rb = json.loads((b / "report.json").read_text())["models"]
    for name in ra:
        for key in ("accuracy", "loss", "params", "macs", "ranks"):
            assert ra[name][key] == rb[name][key], (name, key)
    assert not [p.name for p in b.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", *ARGS, "--out", str(run)]) == 0
    return run


# Seeded random kill points, one per process: the run is killed, resumed and killed again
# until the last resume finishes it. Each process counts its own writes; a resumed one makes
# (checkpoint, phase file) writes in epoch order, and one row per epoch.
_rng = random.Random(14)
KILLS = [
    (1, "row"),  # before the first checkpoint: the resume starts the run again
    (_rng.randint(1, 2), "mid"),
    (_rng.randint(1, 2), "written"),
    (_rng.randint(1, 2), "mid"),
    (1, "row"),
]


@pytest.mark.slow
def test_kill_9_at_writes_then_resume_ends_like_an_uninterrupted_run(reference, tmp_path):
    run = tmp_path / "run"
    argv = [*ARGS, "--out", str(run)]
    expect = None  # what the next process must say about the directory it finds
    for n, stage in [*KILLS, (0, "none")]:
        done = _train(*argv, launcher=[str(n), stage])
        if expect:
            assert expect in done.stderr, (n, stage, done.stderr)
        if stage == "none":
            assert done.returncode == 0, done.stderr
            break
        assert done.returncode == -signal.SIGKILL, (n, stage, done.stderr)
        assert not (run / "report.json").exists()
        expect = None
        if not (run / "checkpoint.pt").exists():
            expect = "starting it from the beginning"
        if stage == "mid":
            assert [p for p in run.iterdir() if p.name.endswith(".tmp")]  # the dead writer's
            expect = "removed temporary files of a stopped run"
        argv = ["--resume", str(run), "--quiet"]
    _same_run(reference, run)


@pytest.mark.slow
def test_kill_9_at_a_random_time_then_resume_ends_like_an_uninterrupted_run(reference, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [*TRAIN, *ARGS, "--out", str(run)],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Once the run directory has its config, kill after a seeded random delay.
    deadline = time.monotonic() + 120
    while not (run / "config.json").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(random.Random(7).uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    if not (run / "report.json").exists():
        resumed = _train("--resume", str(run), "--quiet")
        assert resumed.returncode == 0, resumed.stderr
    _same_run(reference, run)


# --- failed writes ------------------------------------------------------------------------


def _fail_at(monkeypatch, n: int, code: int) -> None:
    """The n-th checkpoint write raises OSError(code) as a full or read-only disk would."""
    count = [0]
    write = checkpoint._write

    def _write(path, data):
        count[0] += 1
        if count[0] == n:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 3])  # part of it reached the disk
            raise OSError(code, os.strerror(code))
        write(path, data)

    monkeypatch.setattr(checkpoint, "_write", _write)


@pytest.mark.parametrize(
    "code, n, before",
    [(errno.ENOSPC, 2, ("dense", 1)), (errno.EROFS, 4, ("dense", 2)), (errno.ENOSPC, 1, None)],
    ids=["ENOSPC-checkpoint-2", "EROFS-checkpoint-3", "ENOSPC-first"],
)
def test_failed_checkpoint_write_names_the_file_and_keeps_the_previous_checkpoint(
    reference, tmp_path, monkeypatch, capsys, code, n, before
):
    run = tmp_path / "run"
    _fail_at(monkeypatch, n, code)
    assert main(["train", *ARGS, "--out", str(run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("svdkern train: error: cannot write ")
    assert os.strerror(code) in err[0]  # "No space left on device" / "Read-only file system"
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    if before is None:
        assert "no checkpoint yet" in err[0] and not (run / "checkpoint.pt").exists()
    else:
        assert f"the previous {run / 'checkpoint.pt'} is intact ({before[0]}, epoch " in err[0]
        state = checkpoint.load(run / "checkpoint.pt")
        assert (state["phase"], state["epoch"]) == before
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # room again: it goes on
    _same_run(reference, run)


def test_failed_metrics_write_names_the_file(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        if Path(path).name == rundir.METRICS and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(rundir, "open", fake_open, raising=False)
    assert main(["train", *ARGS, "--out", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"svdkern train: error: cannot write {run / 'metrics.jsonl'}: No space left on device; "
        f"no checkpoint yet: make room and start again with --resume {run}"
    )


# --- divergence -----------------------------------------------------------------------------

# One SGD step per epoch (the synthetic training set is 320 samples) at a learning rate that
# ruins the weights: with 1e36 the first epoch already ends with a NaN test loss; with 1e12 the
# first ends with weights of ~1e34 and a finite test loss, the second with a NaN test loss.
DIVERGING = ["--data", "synthetic", "--quiet", "--method", "dense", "--dense-epochs", "3"]
DIVERGING += ["--batch-size", "320", "--optimizer", "sgd", "--momentum", "0"]


def _good_checkpoint(run: Path, err: str) -> tuple[str, int] | None:
    """The (phase, epoch) the error names as the last good checkpoint, checked to be good:
    all its weights finite, and so the test loss metrics.jsonl recorded for it."""
    named = re.search(r"last good checkpoint is (\S+) \((\w+), epoch (\d+)\)", err)
    if named is None:
        return None
    assert named[1] == str(run / "checkpoint.pt")
    state = checkpoint.load(run / "checkpoint.pt")
    assert (state["phase"], state["epoch"]) == (named[2], int(named[3]))
    for name, tensor in state["model"].items():
        assert tensor.isfinite().all(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in rows][-1] == (state["phase"], state["epoch"])
    assert all(math.isfinite(r["test_loss"]) for r in rows), rows
    return state["phase"], state["epoch"]


@pytest.mark.parametrize(
    "lr, good", [("1e36", None), ("1e12", ("dense", 1))], ids=["lr-1e36", "lr-1e12"]
)
def test_divergence_names_the_last_checkpoint_with_finite_weights_and_test_loss(
    tmp_path, capsys, lr, good
):
    run = tmp_path / "run"
    assert main(["train", *DIVERGING, "--lr", lr, "--out", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("svdkern train: error: "), err
    assert "test loss became nan after phase 'dense', epoch " in err
    assert _good_checkpoint(run, err) == good
    if good is None:
        assert "No good checkpoint yet" in err and not (run / "checkpoint.pt").exists()


def test_non_finite_weights_after_an_epoch_are_not_checkpointed_and_resume_goes_on(
    reference, tmp_path, monkeypatch, capsys
):
    # The loss is finite before every step, but the last step of dense epoch 2 leaves a NaN.
    train_epoch = loop.Pipeline._train_epoch

    def poisoned(self, index, epoch, epochs, net, model, opt, sched, st, steps):
        if (self.phases[index], epoch) == ("dense", 1):
            step, calls = opt.step, []

            def last_step_poisons(*args, **kwargs):
                out = step(*args, **kwargs)
                calls.append(1)
                if len(calls) == steps:
                    with torch.no_grad():
                        model.fc2.weight[0, 0] = math.nan
                return out

            opt.step = last_step_poisons
        return train_epoch(self, index, epoch, epochs, net, model, opt, sched, st, steps)

    monkeypatch.setattr(loop.Pipeline, "_train_epoch", poisoned)
    run = tmp_path / "run"
    assert main(["train", *ARGS, "--out", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert "the weights became NaN or inf in phase 'dense', epoch 2 (fc2.weight)" in err
    assert _good_checkpoint(run, err) == ("dense", 1)
    assert not (run / "dense.pt").exists()

    # A checkpoint with non-finite weights (as an older svdkern wrote them) is not called good.
    monkeypatch.undo()
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    state = checkpoint.load(bad / "checkpoint.pt")
    state["model"]["fc2.weight"][0, 0] = math.inf
    checkpoint.save_atomic(state, bad / "checkpoint.pt")
    assert main(["train", "--resume", str(bad), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"No good checkpoint: {bad / 'checkpoint.pt'} (dense, epoch 1) holds NaN or inf" in err

    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    _same_run(reference, run)
