"""The LR schedules of `svdkern train`'s phases: warm-up and cosine act every optimizer step,
the step schedule without warm-up every epoch, and a run saved when cosine acted every
epoch resumes that way."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from svdkern.train import loop


def _lrs(cfg: dict, epochs: int, steps: int) -> list[float]:
    """The LR of every optimizer step of a phase, stepping the scheduler as the loop does."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = loop._make_scheduler(opt, cfg, epochs, steps)
    lrs = []
    for _ in range(epochs):
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            if loop._per_step(sched):
                sched.step()
        if not loop._per_step(sched):
            sched.step()
    return lrs


BASE = {"milestones": [0.5, 0.75], "gamma": 0.1}


def test_cosine_with_warmup_rises_linearly_then_anneals_every_step_to_zero():
    lrs = _lrs({**BASE, "schedule": "cosine", "warmup_steps": 4}, epochs=3, steps=10)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # Every step after the warm-up lowers the LR, along the half cosine over steps 4..29.
    after = lrs[4:]
    assert all(b < a for a, b in itertools.pairwise(after))
    assert after == pytest.approx([0.5 * (1 + math.cos(math.pi * t / 26)) for t in range(26)])


def test_step_schedule_acts_on_epoch_boundaries_with_or_without_warmup():
    per_epoch = _lrs({**BASE, "schedule": "step", "warmup_steps": 0}, epochs=4, steps=5)
    per_step = _lrs({**BASE, "schedule": "step", "warmup_steps": 1}, epochs=4, steps=5)
    expected = [1.0] * 10 + [0.1] * 5 + [0.01] * 5
    assert per_epoch == pytest.approx(expected)
    assert per_step == pytest.approx(expected)  # a warm-up of one step is no warm-up


def test_a_run_saved_with_a_per_epoch_cosine_resumes_per_epoch():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    old = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    opt.step()
    old.step()
    state = {"optimizer": opt.state_dict(), "scheduler": old.state_dict()}

    cfg = {**BASE, "schedule": "cosine", "warmup_steps": 0, "optimizer": "sgd", "lr": 1.0}
    cfg |= {"momentum": 0.0, "weight_decay": 0.0}
    run = SimpleNamespace(cfg=cfg)  # what Pipeline._optimizer reads
    model = torch.nn.Linear(1, 1, bias=False)
    opt2, sched = loop.Pipeline._optimizer(run, model, 4, 5, state)
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert not loop._per_step(sched)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
