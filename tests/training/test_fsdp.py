"""svdkern.SVDTraining on a model sharded by FSDP2 (`fully_shard` on each block, then the
root; or on the root alone, over an HSDP mesh), 2 gloo processes on CPU, each taking half of
every global batch: the penalty trains the sharded factors, a rank cut decides the ranks
once and reshards U, s, V with their gradients and sharded optimizer state, and the run
equals a 1-process unsharded run of the same model, data and seed (same ranks; losses, full
parameters, gradients and optimizer state within float tolerance) at every step, right
after the first cut and at the end, after the second. What it does not support is refused
with an error naming the argument.

Run as a script, this file is one process of the sharded run:
`RANK=0 WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python test_fsdp.py CASE OUT`.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import svdkern
from svdkern.nn import svd_layers

fsdp = pytest.importorskip("torch.distributed.fsdp")

WORLD = 2
STEPS = 8
# Training arguments of both runs: a cut after steps 3 and 6 (the energy rule at 0.2 cuts
# the randomly initialised layers at once), both before the last step.
TRAINING = {"cut_every": 3, "cut_energy": 0.2, "orth": 1.0, "sparsity": "hoyer", "strength": 0.1}
# The sharded run's gradient is the mean of the two processes' half-batch gradients, reduced
# in another order than the 1-process full-batch one: equal within float32 rounding, which
# Adam's normalized steps carry on (a few units of 1e-6 after 8 steps).
ATOL, RTOL = 1e-5, 1e-4


def _mlp() -> nn.Module:
    # 47 rows: FSDP splits them 24 / 23 over the two processes (uneven shards).
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 47), nn.ReLU(), nn.Linear(47, 5)
    )
    return svdkern.decompose(model, skip=["4"])


def _mlp_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 24, generator=g), torch.randint(0, 5, (32,), generator=g))] * STEPS


def _mlp_loss(model, batch, part) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x[part]), y[part])


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", svdkern.DecomposeWarning)  # lm_head: tied to wte
        return svdkern.decompose(transformers.GPT2LMHeadModel(config))


def _gpt2_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 64, (8, 16), generator=g) for _ in range(STEPS)]


def _gpt2_loss(model, batch, part) -> torch.Tensor:
    ids = batch[part]
    return model(input_ids=ids, labels=ids).loss


class Case(NamedTuple):
    model: Callable[[], nn.Module]
    batches: Callable[[], list]
    batch_size: int
    loss: Callable  # (model, global batch, this process's slice of it) -> task loss
    blocks: Callable[[nn.Module], list[nn.Module]]  # fully_shard on each, then on the root
    mesh: tuple[int, int] | None = None  # None: 1-D; (replicas, shards): HSDP
    # SVDTraining.step() between backward() and optimizer.step(), so that the optimizer
    # steps the gradients a cut sliced (else after optimizer.step()).
    cut_before_step: bool = False


CASES = {
    "mlp": Case(_mlp, _mlp_batches, 32, _mlp_loss, lambda m: [m[0], m[2]]),
    # The SVD layers in the root's group, which keeps them unsharded after forward.
    "mlp-root-only-hsdp": Case(_mlp, _mlp_batches, 32, _mlp_loss, lambda m: [], (1, WORLD)),
    "gpt2": Case(_gpt2, _gpt2_batches, 8, _gpt2_loss, lambda m: list(m.transformer.h), None, True),
}


def _run(case: str, rank: int, world: int) -> dict:
    """Train `case` for STEPS steps on this process's part of every global batch (all of it
    when world is 1, unsharded); returns the mean task loss of every step over the
    processes, the cuts, and the full parameters and optimizer state at the end."""
    c = CASES[case]
    model = c.model()
    if world > 1:
        stale = torch.optim.SGD(model.parameters(), lr=0.1)  # built before fully_shard
        mesh = c.mesh and init_device_mesh("cpu", c.mesh, mesh_dim_names=("replicate", "shard"))
        for block in c.blocks(model):
            fsdp.fully_shard(block, mesh=mesh)
        fsdp.fully_shard(model, mesh=mesh)
    # eps well above float32 noise: GPT-2's key bias has a zero gradient (softmax ignores
    # it), whose rounding noise Adam at eps=1e-8 would turn into whole steps.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-6)
    st = svdkern.SVDTraining(model, opt, **TRAINING)
    size = c.batch_size // world
    part = slice(rank * size, (rank + 1) * size)
    losses, penalties, at_cut = [], [], None
    for batch in c.batches():
        task = c.loss(model, batch, part)
        penalty = st.penalty()
        opt.zero_grad()
        (task + penalty).backward()
        if c.cut_before_step:
            cut = st.step()
            opt.step()
        else:
            opt.step()
            cut = st.step()
        if cut is not None and at_cut is None:
            at_cut = _full_state(model, opt)
        task = task.detach().clone()
        if world > 1:
            dist.all_reduce(task)
            task /= world
        losses.append(task.item())
        penalties.append(penalty.item())
    result = {
        "losses": losses,
        "penalties": penalties,
        "cuts": [(cut.step, cut.ranks_before, cut.ranks) for cut in st.history],
        "ranks": st.ranks,
        "at_cut": at_cut,
        "end": _full_state(model, opt),
    }
    if world > 1:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        result["model_state"] = get_model_state_dict(model, options=options)
        result["refused"] = _refusals(model, opt, st, stale)
    return result


def _refusals(model, opt, st, stale) -> dict[str, str]:
    """{what: its error} of what SVDTraining does not do on a sharded model, and of a model
    whose SVD factor is a DTensor that FSDP does not manage."""
    from torch.distributed.tensor import Shard, distribute_tensor

    tensor_parallel = _mlp()
    mesh = init_device_mesh("cpu", (WORLD,))
    U = tensor_parallel[0].U
    tensor_parallel[0].U = nn.Parameter(distribute_tensor(U.detach(), mesh, [Shard(0)]))
    calls = {
        "compress": st.compress,
        "tune": st.tune,
        "tune_forms": lambda: svdkern.SVDTraining(model, opt, tune_forms=True),
        "optimizer": lambda: svdkern.SVDTraining(model, stale),
        "tensor_parallel": lambda: svdkern.SVDTraining(
            tensor_parallel, torch.optim.SGD(tensor_parallel.parameters(), lr=0.1)
        ),
    }
    refused = {}
    for what, call in calls.items():
        try:
            call()
        except ValueError as e:
            refused[what] = str(e)
    return refused


def _full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """{name: full tensor} of the parameters and of their gradients (those that have one),
    {name: {key: full tensor}} of the optimizer state, gathered from the shards (the same on
    every process)."""

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    params, grads, state = {}, {}, {}
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        assert id(p) in held, f"the optimizer does not train {name}"
        params[name] = full(p.detach()).clone()
        if p.grad is not None:
            grads[name] = full(p.grad).clone()
        state[name] = {k: full(v).clone() for k, v in opt.state[p].items()}
    return {"params": params, "grads": grads, "state": state}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_run(case: str, out: Path) -> list[dict]:
    """`_run(case)` on 2 gloo processes; the result of each."""
    from conftest import cli_env

    env = cli_env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(WORLD))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, case, str(out)],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


def _assert_states_equal(one: dict, two: dict, when: str) -> None:
    for part in ("params", "grads"):
        assert two[part].keys() == one[part].keys(), f"{when}: {part}"
        for name, value in one[part].items():
            torch.testing.assert_close(
                two[part][name], value, atol=ATOL, rtol=RTOL, msg=f"{when}: {part} {name}"
            )
    for name, state in one["state"].items():
        assert two["state"][name].keys() == state.keys(), f"{when}: {name}"
        for key, value in state.items():
            torch.testing.assert_close(
                two["state"][name][key], value, atol=ATOL, rtol=RTOL, msg=f"{when}: {name} {key}"
            )


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("case", list(CASES))
def test_fully_sharded_training_with_cuts_matches_one_unsharded_process(case, tmp_path):
    one = _run(case, rank=0, world=1)
    # The cuts cut, and training went on after the last one.
    assert len(one["cuts"]) == 2
    assert all(sum(after.values()) < sum(before.values()) for _, before, after in one["cuts"])
    assert one["cuts"][-1][0] < STEPS

    first, second = _sharded_run(case, tmp_path)
    assert second["cuts"] == first["cuts"]  # decided once, applied on both processes
    for name, p in first["end"]["params"].items():
        assert torch.equal(second["end"]["params"][name], p), name
    assert first["cuts"] == one["cuts"]
    assert first["ranks"] == one["ranks"]
    assert first["losses"] == pytest.approx(one["losses"], rel=RTOL, abs=ATOL)
    assert first["penalties"] == pytest.approx(one["penalties"], rel=RTOL, abs=ATOL)
    _assert_states_equal(one["at_cut"], first["at_cut"], "at the first cut")
    _assert_states_equal(one["end"], first["end"], "at the end")

    # The full state dict of the sharded model loads into an unsharded one at the cut
    # ranks, which compresses; on the sharded model compress and form tuning are refused.
    model = CASES[case].model()
    svdkern.load_state_dict(model, first["model_state"])
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), first["end"]["params"][name]), name
    assert {n: layer.rank for n, layer in svd_layers(model)} == one["ranks"]
    assert not svd_layers(svdkern.compress(model))
    refused = first["refused"]
    assert refused.keys() == {"compress", "tune", "tune_forms", "optimizer", "tensor_parallel"}
    assert "get_model_state_dict" in refused["compress"]
    assert refused["tune"].startswith("tune() is not supported on a model sharded by FSDP")
    assert refused["tune_forms"].startswith("tune_forms=True is not supported")
    assert refused["optimizer"].startswith("optimizer does not hold the SVD parameters")
    assert "after svdkern.decompose(model) and fully_shard" in refused["optimizer"]
    assert refused["tensor_parallel"].startswith(
        "model is sharded (0.U is a DTensor that FSDP2 does not manage)"
    )


# --- what is refused ----------------------------------------------------------------------


def test_fsdp1_is_refused_naming_the_model():
    model = _mlp()
    # The class FSDP1 wraps a module in (constructing it needs a process group).
    model.__class__ = type("FullyShardedDataParallel", (nn.Sequential,), {})
    with pytest.raises(ValueError, match=r"model is sharded \(FullyShardedDataParallel \(FSDP1\)"):
        svdkern.SVDTraining(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_a_module_of_fsdp2s_class_without_its_state_is_refused():
    model = _mlp()
    model.__class__ = type("FSDPSequential", (fsdp.FSDPModule, nn.Sequential), {})
    with pytest.raises(ValueError, match=r"model is sharded \(FSDPSequential, .*fully_shard"):
        svdkern.SVDTraining(model, torch.optim.SGD(model.parameters(), lr=0.1))


def _worker(case: str, out: str) -> None:
    dist.init_process_group("gloo")
    try:
        result = _run(case, dist.get_rank(), dist.get_world_size())
        torch.save(result, Path(out) / f"rank{dist.get_rank()}.pt")
        # Both processes done with every collective before either tears gloo down: a
        # process that destroys the group while the other's last ops are in flight aborts
        # ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:])
