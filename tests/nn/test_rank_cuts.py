"""Rank cuts during training: `prune(..., optimizer=opt)` / `prune_(keep, optimizer)` slice
the optimizer's state with the parameters, bit-exactly.

- A cut that keeps every triplet changes nothing: training goes on bit-identically.
- Training after a cut equals training a model built at the cut ranks whose optimizer
  state is the old state sliced by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounter

import svdkern
from svdkern.nn import SVDConv2d, SVDLinear

OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
}


class Net(nn.Module):
    def __init__(self, ranks=(None, None, None)) -> None:
        super().__init__()
        self.conv = SVDConv2d(3, 6, 3, padding=1, rank=ranks[0])
        self.spatial = SVDConv2d(6, 5, 3, padding=1, rank=ranks[1], decomposition="spatial")
        self.fc = SVDLinear(5 * 4 * 4, 7, rank=ranks[2])

    def forward(self, x):
        x = F.relu(self.conv(x))
        return self.fc(F.relu(self.spatial(x)).flatten(1))


def _data(steps: int):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 3, 4, 4, generator=g), torch.randint(0, 7, (4,), generator=g))
        for _ in range(steps)
    ]


def _train(model, opt, batches, reg=None):
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        if reg is not None:
            loss = loss + reg(model)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cut_keeping_every_triplet_changes_nothing(name):
    model = Net()
    opt = OPTIMIZERS[name](model.parameters())
    batches = _data(6)
    _train(model, opt, batches[:3])
    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS[name](twin.parameters())
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict aliases
    for layer in (model.conv, model.spatial, model.fc):
        old = layer.U
        layer.prune_(torch.arange(layer.rank), optimizer=opt)
        assert layer.U is not old and old not in opt.state
        assert any(p is layer.U for g in opt.param_groups for p in g["params"])
    _train(model, opt, batches[3:])
    _train(twin, twin_opt, batches[3:])
    _assert_same(model, twin)


def _sliced_state(opt, model, keep: dict[str, torch.Tensor]) -> dict:
    """The optimizer's state_dict with every factor's per-element state sliced by hand."""
    state = copy.deepcopy(opt.state_dict())
    names = [n for n, _ in model.named_parameters()]  # state_dict ids follow this order
    for i, name in enumerate(names):
        layer, param = name.rsplit(".", 1)
        if layer not in keep or param == "bias":
            continue
        idx = keep[layer]
        for key, value in state["state"].get(i, {}).items():
            if value.dim() > 0:
                state["state"][i][key] = value[idx] if param == "s" else value[:, idx]
    return state


def _built_at(model: Net, ranks: dict[str, int], with_grads: bool = False):
    """(kept indices per layer, a Net built at `ranks` holding the model's triplets of the
    largest |s| and its biases, and with `with_grads` their gradients)."""
    keep = {
        layer: torch.sort(torch.topk(getattr(model, layer).s.detach().abs(), k).indices).values
        for layer, k in ranks.items()
    }
    built = Net(ranks=tuple(ranks.values()))
    with torch.no_grad():
        for layer, idx in keep.items():
            src, dst = getattr(model, layer), getattr(built, layer)
            for key in ("U", "s", "V", "bias"):
                a, b = getattr(src, key), getattr(dst, key)
                cols = slice(None) if key == "bias" else idx
                index = (cols,) if key in ("s", "bias") else (slice(None), cols)
                b.copy_(a[index])
                if with_grads:
                    b.grad = a.grad[index].clone()
    return keep, built


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_training_after_a_cut_equals_a_model_built_at_the_cut_ranks(name):
    torch.manual_seed(0)
    model = Net()
    reg = svdkern.SVDRegularizer(model, orth=1.0, sparsity="hoyer", strength=0.05)
    opt = OPTIMIZERS[name](model.parameters())
    batches = _data(7)
    _train(model, opt, batches[:4], reg)

    ranks = {"conv": 3, "spatial": 5, "fc": 2}
    keep, built = _built_at(model, ranks)
    built_opt = OPTIMIZERS[name](built.parameters())
    built_opt.load_state_dict(_sliced_state(opt, model, keep))

    report = svdkern.prune(model, ranks=ranks, optimizer=opt)
    assert [lay.rank_after for lay in report.layers] == [3, 5, 2]
    assert str(report).endswith("ranks given per layer")
    _train(model, opt, batches[4:], svdkern.SVDRegularizer(model, 1.0, "hoyer", 0.05))
    _train(built, built_opt, batches[4:], svdkern.SVDRegularizer(built, 1.0, "hoyer", 0.05))
    _assert_same(model, built)
    step = [s["step"] for s in opt.state.values() if "step" in s]
    assert all(int(v) == 7 for v in step)


def test_energy_cut_with_optimizer_slices_state_of_the_kept_columns():
    model = nn.Sequential(SVDLinear(6, 6))
    with torch.no_grad():
        model[0].s.copy_(torch.tensor([5.0, 0.001, 4.0, 0.002, 3.0, 0.001]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train(model, opt, [(torch.randn(3, 6), torch.randint(0, 6, (3,)))])
    before = opt.state[model[0].s]["exp_avg"].clone()
    svdkern.prune(model, energy=1e-3, optimizer=opt, multiple_of=1)
    assert model[0].rank == 3
    torch.testing.assert_close(opt.state[model[0].s]["exp_avg"], before[[0, 2, 4]])
    assert len(opt.state) == 4  # U, s, V, bias: no stale entries


def test_dry_run_reports_ranks_and_changes_nothing():
    model = Net()
    before = copy.deepcopy(model.state_dict())
    report = svdkern.prune(model, energy=0.5, dry_run=True)
    assert any(lay.rank_after < lay.rank_before for lay in report.layers)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_cut_is_reproducible_from_the_ranks_of_a_dry_run():
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    report = svdkern.prune(a, energy=0.2, dry_run=True)
    svdkern.prune(a, energy=0.2)
    svdkern.prune(b, ranks={lay.name: lay.rank_after for lay in report.layers})
    _assert_same(a, b)


def test_optimizer_state_that_is_not_per_element_is_an_error():
    model = nn.Sequential(SVDLinear(6, 6))
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    _train(model, opt, [(torch.randn(3, 6), torch.randint(0, 6, (3,)))])
    params = [model[0].U, model[0].s, model[0].V]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    with pytest.raises(ValueError, match="rebuild this optimizer"):
        model[0].prune_(2, optimizer=opt)
    # Nothing was committed: the layer keeps its rank and parameters, the optimizer its state.
    assert model[0].rank == 6
    assert all(a is b for a, b in zip((model[0].U, model[0].s, model[0].V), params))
    for p, before in zip(params, states):
        assert opt.state[p].keys() == before.keys()
        for key, value in before.items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    "ranks, error, match",
    [
        pytest.param({"nope": 2}, ValueError, "not SVD layers", id="unknown"),
        pytest.param({"0": 0}, ValueError, r"ranks\['0'\]", id="zero"),
        pytest.param({"0": 9}, ValueError, r"\[1, 4\]", id="above-rank"),
        pytest.param([2], TypeError, "dict", id="not-dict"),
    ],
)
def test_bad_ranks_are_rejected(ranks, error, match):
    with pytest.raises(error, match=match):
        svdkern.prune(nn.Sequential(SVDLinear(4, 4)), ranks=ranks)


def test_ranks_and_energy_are_exclusive():
    with pytest.raises(ValueError, match="exactly one"):
        svdkern.prune(nn.Sequential(SVDLinear(4, 4)), energy=0.1, ranks={"0": 2})


def test_compiled_training_recompiles_once_per_distinct_rank():
    torch._dynamo.reset()
    model = nn.Sequential(SVDLinear(16, 16), nn.ReLU(), SVDLinear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    counts = CompileCounter()
    step = torch.compile(lambda x: model(x).square().mean(), backend=counts, fullgraph=True)
    x = torch.randn(5, 16)
    for k in (16, 12, 12, 8):
        if model[0].rank != k:
            svdkern.prune(model, ranks={"0": k}, optimizer=opt)
        for _ in range(2):
            opt.zero_grad()
            step(x).backward()
            opt.step()
    assert counts.frame_count == 3


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cut_between_backward_and_step_equals_a_model_built_at_the_cut_ranks(name):
    model = Net()
    opt = OPTIMIZERS[name](model.parameters())
    batches = _data(6)
    _train(model, opt, batches[:3])
    x, y = batches[3]
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()

    ranks = {"conv": 3, "spatial": 5, "fc": 2}
    keep, built = _built_at(model, ranks, with_grads=True)
    built_opt = OPTIMIZERS[name](built.parameters())
    built_opt.load_state_dict(_sliced_state(opt, model, keep))

    svdkern.prune(model, ranks=ranks, optimizer=opt)
    for layer in ranks:
        for key in ("U", "s", "V"):
            torch.testing.assert_close(
                getattr(getattr(model, layer), key).grad,
                getattr(getattr(built, layer), key).grad,
                rtol=0,
                atol=0,
            )
    opt.step()
    built_opt.step()
    _assert_same(model, built)
    _train(model, opt, batches[4:])
    _train(built, built_opt, batches[4:])
    _assert_same(model, built)
    step = [s["step"] for s in opt.state.values() if "step" in s]
    assert all(int(v) == 6 for v in step)
