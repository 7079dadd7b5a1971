"""The run directory of `svdkern train`: one run at a time (lock, stale locks, unique default
names), directories left without a checkpoint, temporary files of dead writers, damaged
checkpoints and metrics, unusable --out directories and --init files: every one ends in a
message naming the file, never in a traceback or in the rows of two runs; checkpoints of
older versions still resume."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import types
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TRAIN, cli_env, kill_at

from svdkern.__main__ import main
from svdkern.train import checkpoint, config, rundir
from svdkern.train.models import build_model

DENSE = ["--data", "synthetic", "--quiet", "--method", "dense", "--dense-epochs", "2"]
TIMES = ("seconds", "train_seconds", "train_cpu_seconds", "step_ms")


def _rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMES} for x in lines]


def _error(capsys, argv: list[str]) -> str:
    """Run `svdkern train argv`, expect exit 2, return the one error line."""
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("svdkern train: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A complete 2-epoch dense run (the reference of the runs below)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *DENSE, "--out", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """The same run killed (kill -9) once it has a checkpoint, before its report."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    kill_at([*TRAIN, *DENSE, "--out", str(run)], run, ["dense"], ("dense", 1))
    assert not (run / "report.json").exists()
    return run


@pytest.fixture
def copy_of_stopped(stopped, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    return run


# --- one run at a time --------------------------------------------------------------------


def test_second_run_on_a_locked_directory_is_refused_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = rundir.RunLock.acquire(run)  # another run, alive, holding the directory
    try:
        line = _error(capsys, [*DENSE, "--out", str(run)])
        assert f"{run} is in use by another run (pid {os.getpid()} on " in line
        line = _error(capsys, ["--resume", str(run)])
        assert f"argument --resume: {run} is in use by another run" in line
    finally:
        holder.release()
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.slow
def test_two_processes_on_one_directory_never_interleave_rows(tmp_path):
    run = tmp_path / "run"
    argv = [*TRAIN, *DENSE, "--out", str(run)]
    procs = [
        subprocess.Popen(
            [*argv, "--seed", str(seed)],
            cwd=ROOT,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "Traceback" not in refused
    assert re.search(r"in use by another run|already holds a run", refused), refused
    seed = json.loads((run / "config.json").read_text())["seed"]
    assert [r["epoch"] for r in _rows(run)] == [1, 2]
    assert checkpoint.load(run / "checkpoint.pt")["config"]["seed"] == seed


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.LOCK).write_text("pid 999999999 on elsewhere since 2020-01-01T00:00:00\n")
    assert main(["train", *DENSE, "--out", str(run)]) == 0
    assert "took over the lock of a stopped run" in capsys.readouterr().err
    assert (run / "report.json").exists()


def test_default_run_names_started_in_the_same_second_differ(tmp_path, monkeypatch, capsys):
    import datetime as real

    frozen = real.datetime(2030, 1, 2, 3, 4, 5)
    fake = types.SimpleNamespace(datetime=types.SimpleNamespace(now=lambda: frozen))
    monkeypatch.setattr(config, "datetime", fake)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "20300102-030405").mkdir(parents=True)  # the other run's
    assert main(["train", *DENSE]) == 0
    assert "run runs/20300102-030405-2 " in capsys.readouterr().out
    assert (tmp_path / "runs" / "20300102-030405-2" / "report.json").exists()
    assert list((tmp_path / "runs" / "20300102-030405").iterdir()) == []
    assert rundir.unique_dir(tmp_path / "a") == tmp_path / "a"
    assert rundir.unique_dir(tmp_path / "a") == tmp_path / "a-2"


# --- directories without a checkpoint -----------------------------------------------------


def _died_before_first_checkpoint(finished: Path, run: Path) -> None:
    run.mkdir()
    shutil.copy(finished / "config.json", run / "config.json")
    (run / "metrics.jsonl").write_text('{"phase": "dense", "epo')  # cut mid-row


def test_resume_of_a_run_without_checkpoint_starts_it_from_the_beginning(
    finished, tmp_path, capsys
):
    run = tmp_path / "run"
    _died_before_first_checkpoint(finished, run)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert "starting it from the beginning" in capsys.readouterr().err
    assert _rows(run) == _rows(finished)
    assert checkpoint.load(run / "dense.pt")["model"].keys() == (
        checkpoint.load(finished / "dense.pt")["model"].keys()
    )
    for k, v in checkpoint.load(finished / "dense.pt")["model"].items():
        assert torch.equal(checkpoint.load(run / "dense.pt")["model"][k], v), k


def test_out_on_a_run_without_checkpoint_reuses_it(finished, tmp_path, capsys):
    run = tmp_path / "run"
    _died_before_first_checkpoint(finished, run)
    assert main(["train", *DENSE, "--out", str(run)]) == 0
    assert f"reusing {run}" in capsys.readouterr().err
    assert _rows(run) == _rows(finished)


def test_out_on_a_finished_run_is_still_refused(finished, capsys):
    line = _error(capsys, [*DENSE, "--out", str(finished)])
    assert "already holds a run" in line


# --- leftovers and damage -----------------------------------------------------------------


def test_resume_removes_temp_files_of_dead_writers_and_a_cut_metrics_row(
    copy_of_stopped, finished, capsys
):
    run = copy_of_stopped
    dead = [run / ".checkpoint.pt.999999999.tmp", run / ".metrics.jsonl.999999999.tmp"]
    for p in dead:
        p.write_bytes(b"half a file")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"phase": "dense", "epoch": 2, "lr": 0.0')  # the crash cut this row
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert "removed temporary files of a stopped run" in capsys.readouterr().err
    assert not any(p.exists() for p in dead)
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert _rows(run) == _rows(finished)


def _flip_bit(path: Path, seed: int) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    pos = rng.randrange(len(data) // 4, len(data) * 3 // 4)  # inside the tensor data
    data[pos] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, why",
    [
        ("empty", "not a readable checkpoint \\(empty file\\)"),
        ("truncated", "not a readable checkpoint"),
        ("random", "not a readable checkpoint"),
        ("bit-flip", "damaged|not a readable checkpoint"),
        ("no-config", "not a checkpoint of svdkern train \\(no 'config'\\)"),
        ("not-a-dict", "not a checkpoint of svdkern train"),
    ],
)
def test_resume_on_a_damaged_checkpoint_is_one_line_naming_the_file(
    copy_of_stopped, capsys, damage, why
):
    path = copy_of_stopped / "checkpoint.pt"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "random":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif damage == "bit-flip":
        _flip_bit(path, seed=3)
    elif damage == "no-config":
        state = checkpoint.load(path)
        del state["config"]
        checkpoint.save_atomic(state, path)
    else:
        checkpoint.save_atomic([1, 2, 3], path)
    line = _error(capsys, ["--resume", str(copy_of_stopped)])
    assert re.search(f"argument --resume: {re.escape(str(path))}: ({why})", line), line
    assert "--resume" in line.split(";")[-1]  # says what to do


@pytest.mark.parametrize("seed", range(8))
def test_every_bit_flip_in_a_checkpoint_is_refused(tmp_path, seed):
    model = build_model("mlp", (1, 8, 8), 10)
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"model": model.state_dict(), "epoch": 3}, path)
    _flip_bit(path, seed)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(str(path))):
        checkpoint.load(path)


def test_resume_rechecks_the_saved_config_at_once(copy_of_stopped, capsys):
    path = copy_of_stopped / "checkpoint.pt"
    state = checkpoint.load(path)
    state["config"]["lr"] = -5.0
    checkpoint.save_atomic(state, path)
    line = _error(capsys, ["--resume", str(copy_of_stopped)])
    assert str(path) in line and "'lr'" in line


def test_resume_of_a_checkpoint_saved_with_the_retired_stop_key_goes_on(copy_of_stopped, finished):
    # Checkpoints of older versions hold the configuration key of a test-only flag since
    # removed: a run stopped by such a version still resumes, and its report lacks the key.
    path = copy_of_stopped / "checkpoint.pt"
    state = checkpoint.load(path)
    state["config"]["stop_after_epochs"] = None
    checkpoint.save_atomic(state, path)
    assert main(["train", "--resume", str(copy_of_stopped), "--quiet"]) == 0
    assert _rows(copy_of_stopped) == _rows(finished)
    saved = json.loads((copy_of_stopped / "report.json").read_text())["config"]
    assert "stop_after_epochs" not in saved and saved["seed"] == state["config"]["seed"]


def test_resume_of_a_checkpoint_saved_before_the_size_and_epoch_flags_goes_on(
    copy_of_stopped, finished
):
    # Runs saved before --seq-len, --width, --layers, --heads and --epoch-size existed ran
    # with what those keys now default to: they resume with those values filled in.
    path = copy_of_stopped / "checkpoint.pt"
    state = checkpoint.load(path)
    for key in ("seq_len", "width", "layers", "heads", "epoch_size"):
        del state["config"][key]
    checkpoint.save_atomic(state, path)
    assert main(["train", "--resume", str(copy_of_stopped), "--quiet"]) == 0
    assert _rows(copy_of_stopped) == _rows(finished)


# --- unusable --out and --init ------------------------------------------------------------


def test_out_at_a_regular_file_under_proc_or_read_only_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    line = _error(capsys, [*DENSE, "--out", str(tmp_path / "file")])
    assert f"argument --out: {tmp_path / 'file'} is a file, not a directory" in line
    line = _error(capsys, [*DENSE, "--out", str(tmp_path / "file" / "run")])
    assert f"argument --out: cannot create the run directory {tmp_path / 'file' / 'run'}" in line
    line = _error(capsys, [*DENSE, "--out", "/proc/svdkern-run"])
    assert "argument --out: cannot create the run directory /proc/svdkern-run" in line

    statvfs = os.statvfs

    def read_only(path):
        real = statvfs(path)
        return types.SimpleNamespace(f_flag=real.f_flag | os.ST_RDONLY)

    monkeypatch.setattr(os, "statvfs", read_only)
    line = _error(capsys, [*DENSE, "--out", str(tmp_path / "ro")])
    assert f"argument --out: {tmp_path / 'ro'} is on a read-only file system" in line


def test_init_with_a_dense_runs_checkpoint_uses_its_model(finished, tmp_path):
    args = ["--data", "synthetic", "--quiet", "--no-baselines", "--svd-epochs", "1"]
    args += ["--finetune-epochs", "1"]
    init = checkpoint.load(finished / "checkpoint.pt")["model"]
    run = tmp_path / "run"
    assert main(["train", *args, "--init", str(finished / "checkpoint.pt"), "--out", str(run)]) == 0
    dense = checkpoint.load(run / "dense.pt")["model"]
    for k, v in init.items():
        assert torch.equal(dense[k], v), k


def test_init_with_an_svd_checkpoint_or_a_mismatching_state_dict_is_one_line(
    finished, tmp_path, capsys
):
    args = ["--data", "synthetic", "--quiet", "--no-baselines", "--out", str(tmp_path / "r")]
    svd_ckpt = tmp_path / "svd_checkpoint.pt"
    state = checkpoint.load(finished / "checkpoint.pt")
    state["phase"] = "svd"
    checkpoint.save_atomic(state, svd_ckpt)
    line = _error(capsys, [*args, "--init", str(svd_ckpt)])
    assert f"argument --init: {svd_ckpt} holds the SVD model of phase 'svd'" in line

    other = tmp_path / "cnn.pt"
    torch.save(build_model("cnn", (1, 8, 8), 10).state_dict(), other)
    line = _error(capsys, [*args, "--init", str(other)])
    assert f"argument --init: {other} does not match --model mlp" in line
    assert "missing keys" in line and "unexpected keys" in line

    wide = build_model("mlp", (1, 8, 8), 10).state_dict()
    wide = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in wide.items()}
    torch.save(wide, other)
    line = _error(capsys, [*args, "--init", str(other)])
    assert "shapes (file vs model)" in line

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    line = _error(capsys, [*args, "--init", str(tmp_path / "junk.pt")])
    assert f"argument --init: {tmp_path / 'junk.pt'}: not a readable checkpoint" in line
    assert not (tmp_path / "r").exists()  # refused before anything was written
