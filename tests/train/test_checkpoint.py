"""Checkpoints: atomic writes, weights_only loading, RNG states, pruned models reloading."""

from __future__ import annotations

import errno
import os
import random

import numpy as np
import pytest
import torch

import svdkern
from svdkern.train import checkpoint
from svdkern.train.models import CLASSIFIER, build_model


def test_save_atomic_round_trip_weights_only(tmp_path):
    model = build_model("mlp", (1, 8, 8), 10)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2, 3])
    obj = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": checkpoint.get_rng_state(),
        "config": {"seed": 0, "milestones": [0.5, 0.75], "data_dir": None},
        "phase": "dense",
        "epoch": 3,
    }
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic(obj, path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3 and loaded["config"] == obj["config"]
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    opt.load_state_dict(loaded["optimizer"])
    sched.load_state_dict(loaded["scheduler"])


def test_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"epoch": 1}, path)
    with pytest.raises(Exception):
        checkpoint.save_atomic({"epoch": 2, "bad": lambda: None}, path)
    assert checkpoint.load(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_rng_states_round_trip(tmp_path):
    random.gauss(0, 1)
    state = checkpoint.get_rng_state()
    first = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(1).item())
    checkpoint.save_atomic(state, tmp_path / "rng.pt")
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "rng.pt"))
    again = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(1).item())
    assert first == again


def test_pruned_checkpoint_reloads_through_svdkern_load_state_dict(tmp_path):
    model = svdkern.decompose(build_model("cnn", (1, 8, 8), 10), skip=[CLASSIFIER]).eval()
    svdkern.prune(model, energy=0.3, input_shape=(1, 1, 8, 8))
    checkpoint.save_atomic({"model": model.state_dict()}, tmp_path / "pruned.pt")
    fresh = svdkern.decompose(build_model("cnn", (1, 8, 8), 10), skip=[CLASSIFIER]).eval()
    state = checkpoint.load(tmp_path / "pruned.pt")["model"]
    with pytest.raises(RuntimeError, match="rank mismatch"):
        fresh.load_state_dict(state)
    svdkern.load_state_dict(fresh, state)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(fresh(x), model(x))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["ENOSPC", "EROFS"])
def test_write_error_carries_errno_and_file_and_keeps_the_old_file(tmp_path, monkeypatch, code):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"epoch": 1, "w": torch.ones(1000)}, path)
    real_open = open

    def full_disk(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode:  # the data does not fit: the write fails after the file exists
            f.close()
            raise OSError(code, os.strerror(code))
        return f

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(OSError) as exc:
        checkpoint.save_atomic({"epoch": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert exc.value.errno == code and exc.value.filename == str(path)
    assert os.strerror(code) in str(exc.value)
    assert checkpoint.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_digest_detects_a_changed_value_and_load_strips_it(tmp_path):
    obj = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3, "phase": "dense"}
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic(obj, path)
    raw = torch.load(path, weights_only=True)
    assert raw[checkpoint.DIGEST_KEY] == checkpoint.digest(obj)
    assert checkpoint.load(path).keys() == obj.keys()
    changed = {**obj, "model": {"w": torch.arange(6.0).reshape(3, 2)}}  # same bytes, new shape
    assert checkpoint.digest(changed) != checkpoint.digest(obj)
    assert checkpoint.digest({**obj, "epoch": 4}) != checkpoint.digest(obj)
    raw["epoch"] = 4  # written by hand without a new digest
    torch.save(raw, path)
    with pytest.raises(checkpoint.CheckpointError, match="do not match the sha256 digest"):
        checkpoint.load(path)


def test_temp_files_lists_writers_temporary_files_with_their_pid(tmp_path):
    for name in (".checkpoint.pt.123.tmp", ".metrics.jsonl.45.tmp", "checkpoint.pt", ".x.tmp"):
        (tmp_path / name).write_text("")
    found = {p.name: pid for p, pid in checkpoint.temp_files(tmp_path)}
    assert found == {".checkpoint.pt.123.tmp": 123, ".metrics.jsonl.45.tmp": 45}
