"""Checkpoints: atomic writes, weights_only loading, RNG states, pruned models reloading."""

from __future__ import annotations

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
