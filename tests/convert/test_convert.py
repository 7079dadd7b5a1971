"""decompose (dense → SVD, exact), compress (SVD → plain torch, exact, scriptable and
exportable) and load_state_dict of pruned checkpoints."""

from __future__ import annotations

import copy
import functools
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import svdkern
from svdkern.nn import SVDConv2d, SVDLinear


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = Block(width, width, 1)
        self.layer2 = Block(width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _resnet(dtype=torch.float64) -> TinyResNet:
    model = TinyResNet().to(dtype).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model


INPUT = (2, 3, 16, 16)


def _close(actual, expected, rtol=1e-10):
    assert (actual - expected).abs().max() <= rtol * expected.abs().max()


@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
def test_decompose_resnet_equals_original(decomposition):
    dense = _resnet()
    x = torch.randn(INPUT, dtype=torch.float64)
    expected = dense(x)
    model = svdkern.decompose(copy.deepcopy(dense), decomposition)
    kinds = {type(m) for m in model.modules()}
    assert nn.Conv2d not in kinds and nn.Linear not in kinds
    assert all(
        m.decomposition == decomposition for m in model.modules() if isinstance(m, SVDConv2d)
    )
    assert isinstance(model.layer2.shortcut[0], SVDConv2d)
    _close(model(x), expected)


def test_decompose_returns_the_same_model_and_keeps_training_flag():
    model = _resnet().train()
    assert svdkern.decompose(model) is model
    assert model.conv.training and isinstance(model.fc, SVDLinear)


def test_decompose_skip_by_names_and_predicate():
    model = svdkern.decompose(_resnet(), skip=["fc", "layer2"])
    assert type(model.fc) is nn.Linear
    assert type(model.layer2.conv1) is nn.Conv2d and type(model.layer2.shortcut[0]) is nn.Conv2d
    assert isinstance(model.layer1.conv1, SVDConv2d)

    def first_and_last(name, module):
        return name in ("conv", "fc")

    model = svdkern.decompose(_resnet(), skip=first_and_last)
    assert type(model.conv) is nn.Conv2d and type(model.fc) is nn.Linear
    assert isinstance(model.layer1.conv2, SVDConv2d)


def test_decompose_unknown_skip_name_is_an_error():
    with pytest.raises(ValueError, match="skip"):
        svdkern.decompose(_resnet(), skip=["layer9"])


def test_decompose_skip_glob_matching_nothing_raises_naming_the_glob_and_layers():
    with pytest.raises(ValueError, match=r"skip.*\['typo\*'\].*'layer1\.conv1'"):
        svdkern.decompose(_resnet(), skip=["fc", "typo*"])
    with pytest.raises(ValueError, match=r"\['typo\*'\]"):
        svdkern.plan(_resnet(), skip="typo*")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_decompose_non_finite_weight_raises_naming_the_layer(value):
    model = _resnet()
    with torch.no_grad():
        model.layer1.conv2.weight[0, 0, 0, 0] = value
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"'layer1\.conv2\.weight' \(\d NaN, \d inf.*not finite"):
        svdkern.decompose(model)
    assert type(model.layer1.conv1) is nn.Conv2d  # checked before any layer is converted
    assert str(model) == str(before)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_from_dense_non_finite_weight_raises(value):
    linear = nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight[1, 2] = value
    with pytest.raises(ValueError, match="weight of shape \\[3, 4\\] is not finite"):
        SVDLinear.from_dense(linear)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_decompose_and_plan_of_a_compiled_model_take_the_models_own_names():
    model = _resnet()
    compiled = torch.compile(model)
    report = svdkern.plan(compiled, skip=["fc", "layer2.*"])
    assert {p.name for p in report.left} >= {"fc", "layer2.conv1"}
    assert all(not p.name.startswith("_orig_mod") for p in report.layers)
    assert svdkern.decompose(compiled, skip=["fc", "_orig_mod.layer2.*"]) is compiled
    assert type(model.fc) is nn.Linear and type(model.layer2.conv1) is nn.Conv2d
    assert isinstance(model.layer1.conv1, SVDConv2d)


def test_decompose_leaves_grouped_conv_dense_with_warning():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 6, 1))
    with pytest.warns(UserWarning, match="groups=2"):
        svdkern.decompose(model)
    assert type(model[0]) is nn.Conv2d and isinstance(model[1], SVDConv2d)


def test_decompose_rejects_unknown_decomposition():
    with pytest.raises(ValueError, match="decomposition"):
        svdkern.decompose(_resnet(), decomposition="tucker")


def test_decompose_a_bare_layer_returns_its_svd_layer():
    layer = svdkern.decompose(nn.Linear(4, 3))
    assert isinstance(layer, SVDLinear)


def test_decompose_keeps_shared_modules_shared():
    shared = nn.Linear(5, 5)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    svdkern.decompose(model)
    assert model[0] is model[2] and isinstance(model[0], SVDLinear)


@pytest.mark.parametrize("policy", ["flops", "latency", "lowrank", "dense"])
@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
def test_compress_after_pruning_equals_svd_model(decomposition, policy):
    model = svdkern.decompose(_resnet(), decomposition)
    svdkern.prune(model, energy=0.3)
    x = torch.randn(INPUT, dtype=torch.float64)
    expected = model(x)
    plain = svdkern.compress(model, policy=policy, input_shape=INPUT)
    assert not any(isinstance(m, (SVDLinear, SVDConv2d)) for m in plain.modules())
    assert any(isinstance(m, SVDLinear) for m in model.modules()), "compress must copy"
    _close(plain(x), expected)
    if policy == "lowrank":
        assert isinstance(plain.fc, nn.Sequential)
    if policy == "dense":
        assert type(plain.fc) is nn.Linear


def test_compress_flops_policy_picks_dense_where_lowrank_costs_more():
    model = nn.Sequential(SVDLinear(16, 16), SVDLinear(16, 16, rank=2))
    plain = svdkern.compress(model)
    assert type(plain[0]) is nn.Linear  # rank 16: 16·32 MACs > 16·16
    assert isinstance(plain[1], nn.Sequential)  # rank 2: 2·32 < 16·16


def _fake_measure(lowrank_faster: dict[tuple[int, int], bool]):
    """A stand-in for the timer: the low-rank pair is faster exactly for the listed
    (rank, batch) pairs (the timer itself is tested in test_tune.py)."""

    def measure(layer, shape, dtype, input_grad, channels_last, training, repeats, runtime):
        assert not training and runtime == "eager"
        fast = lowrank_faster.get((layer.rank, shape[0]), False)
        return {"dense": 1.0, "lowrank": 0.5 if fast else 0.97}  # 3% faster is not enough

    return measure


def _fake_model_times(*calls: dict[str, list[float]]):
    """A stand-in for the whole-model timing: at its i-th call each model ("latency",
    "flops", "dense") takes calls[i] ms at the examples (the last entry from then on);
    records the models and the examples it was given."""
    seen, models_seen = [], []

    def time_models(models, examples, repeats=5, round_s=None):
        assert set(models) <= {"latency", "flops", "dense"} and "dense" in models
        ms = calls[min(len(seen), len(calls) - 1)]
        seen.append([tuple(args[0].shape) for args, _ in examples])
        models_seen.append(sorted(models))
        return {name: list(ms[name]) for name in models}

    time_models.seen = seen
    time_models.models = models_seen
    return time_models


FASTEST_LATENCY = {"latency": [0.5, 0.5], "flops": [0.9, 0.9], "dense": [1.0, 1.0]}


def test_compress_latency_policy_deploys_the_pair_only_where_it_is_faster_at_every_batch(
    monkeypatch,
):
    svdkern.clear_tune_cache()
    model = nn.Sequential(SVDLinear(16, 16, rank=2), SVDLinear(16, 16, rank=3))
    faster = {(2, 1): True, (2, 8): True, (3, 1): True, (3, 8): False}
    monkeypatch.setattr(svdkern.tune, "_measure", _fake_measure(faster))
    monkeypatch.setattr(svdkern.tune, "time_models", _fake_model_times(FASTEST_LATENCY))
    plain = svdkern.compress(model, "latency", [(1, 16), (8, 16)])
    assert isinstance(plain[0], nn.Sequential)  # faster at batch 1 and 8
    assert type(plain[1]) is nn.Linear  # slower at batch 8
    one = {name: ms[:1] for name, ms in FASTEST_LATENCY.items()}
    monkeypatch.setattr(svdkern.tune, "time_models", _fake_model_times(one))
    single = svdkern.compress(model, "latency", (1, 16))
    assert isinstance(single[1], nn.Sequential)
    svdkern.clear_tune_cache()


@pytest.mark.parametrize(
    "ms, chosen",
    [
        # Each rule's model is slower than dense at one batch: all dense.
        ({"latency": [0.99, 1.03], "flops": [1.2, 0.5], "dense": [1.0, 1.0]}, "dense"),
        # Within 2% of dense at every batch but not faster on average: all dense.
        ({"latency": [1.01, 0.99], "flops": [1.015, 1.0], "dense": [1.0, 1.0]}, "dense"),
        # The MAC rule's model is the fastest and nowhere slower: it is kept.
        ({"latency": [0.9, 0.95], "flops": [0.8, 0.7], "dense": [1.0, 1.0]}, "flops"),
        # A tie at one batch (within 2%, the timing's resolution) does not disqualify.
        ({"latency": [0.99, 0.98], "flops": [1.015, 0.83], "dense": [1.0, 1.0]}, "flops"),
        # Faster on average but slower at one batch does not count.
        ({"latency": [0.99, 0.98], "flops": [0.3, 1.05], "dense": [1.0, 1.0]}, "latency"),
    ],
    ids=["dense", "tie-dense", "flops", "tie-flops", "latency"],
)
def test_compress_latency_policy_keeps_the_fastest_whole_model_nowhere_slower_than_dense(
    monkeypatch, ms, chosen
):
    svdkern.clear_tune_cache()
    # Layer 0 (rank 2) measured faster alone: "latency" has a pair there, "flops" has
    # pairs at both layers (rank 2 and 3 of 16: fewer MACs), "dense" none.
    model = nn.Sequential(SVDLinear(16, 16, rank=2), SVDLinear(16, 16, rank=3))
    monkeypatch.setattr(svdkern.tune, "_measure", _fake_measure({(2, 1): True, (2, 8): True}))
    timer = _fake_model_times(ms)
    monkeypatch.setattr(svdkern.tune, "time_models", timer)
    plain = svdkern.compress(model, "latency", [(1, 16), (8, 16)])
    # Timed at every given shape; a winner other than dense is timed again against dense.
    assert timer.seen == [[(1, 16), (8, 16)]] * (1 if chosen == "dense" else 2)
    assert timer.models[1:] == ([] if chosen == "dense" else [sorted((chosen, "dense"))])
    pairs = [isinstance(m, nn.Sequential) for m in plain]
    assert (
        pairs == {"dense": [False, False], "flops": [True, True], "latency": [True, False]}[chosen]
    )
    x = torch.randn(3, 16)
    torch.testing.assert_close(plain(x), model(x))
    svdkern.clear_tune_cache()


def test_compress_latency_policy_keeps_dense_when_the_second_timing_does_not_confirm(
    monkeypatch,
):
    svdkern.clear_tune_cache()
    model = nn.Sequential(SVDLinear(16, 16, rank=2), SVDLinear(16, 16, rank=3))
    monkeypatch.setattr(svdkern.tune, "_measure", _fake_measure({(2, 1): True, (2, 8): True}))
    first = {"latency": [0.9, 0.95], "flops": [0.8, 0.7], "dense": [1.0, 1.0]}
    again = {"latency": [0.9, 0.95], "flops": [1.05, 0.7], "dense": [1.0, 1.0]}
    timer = _fake_model_times(first, again)
    monkeypatch.setattr(svdkern.tune, "time_models", timer)
    plain = svdkern.compress(model, "latency", [(1, 16), (8, 16)])
    assert timer.models == [["dense", "flops", "latency"], ["dense", "flops"]]
    assert [type(m) for m in plain] == [nn.Linear, nn.Linear]
    svdkern.clear_tune_cache()


@pytest.mark.parametrize("shape", [None, (1, "a"), [(1, 16), 3]], ids=["none", "str", "mixed"])
def test_compress_latency_policy_needs_input_shapes(shape):
    with pytest.raises(ValueError, match="input_shape"):
        svdkern.compress(nn.Sequential(SVDLinear(16, 16)), "latency", shape)


def test_compress_rejects_unknown_policy():
    with pytest.raises(ValueError, match="policy"):
        svdkern.compress(nn.Sequential(SVDLinear(3, 3)), policy="smallest")


@functools.cache
def _pruned(decomposition: str) -> nn.Module:
    model = svdkern.decompose(_resnet(torch.float32), decomposition)
    svdkern.prune(model, energy=0.2)
    return model


def _pruned_compressed(decomposition="channel"):
    model = copy.deepcopy(_pruned(decomposition))
    return model, svdkern.compress(model, policy="lowrank")


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_compressed_model_scripts_and_traces():
    model, plain = _pruned_compressed("spatial")
    x = torch.randn(INPUT)
    expected = model(x)
    torch.testing.assert_close(torch.jit.script(plain)(x), expected, rtol=1e-4, atol=1e-5)
    traced = torch.jit.trace(plain, (x,))
    torch.testing.assert_close(traced(x), expected, rtol=1e-4, atol=1e-5)


def test_compressed_model_exports():
    model, plain = _pruned_compressed("channel")
    x = torch.randn(INPUT)
    program = torch.export.export(plain, (x,))
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-5)


def test_compressed_model_has_no_svdkern_references():
    _, plain = _pruned_compressed()
    assert all(type(m).__module__.split(".")[0] != "svdkern" for m in plain.modules())


def test_pruned_state_dict_round_trip():
    model = svdkern.decompose(_resnet())
    svdkern.prune(model, energy=0.25)
    state = model.state_dict()
    fresh = svdkern.decompose(_resnet())
    result = svdkern.load_state_dict(fresh, state)
    assert not result.missing_keys and not result.unexpected_keys
    for (name, a), (_, b) in zip(model.named_modules(), fresh.named_modules(), strict=True):
        if isinstance(a, (SVDLinear, SVDConv2d)):
            assert a.rank == b.rank, name
            assert isinstance(b.U, nn.Parameter)
    x = torch.randn(INPUT, dtype=torch.float64)
    _close(fresh(x), model(x))


def test_load_state_dict_shape_mismatch_names_the_layer():
    state = svdkern.decompose(_resnet()).state_dict()
    other = svdkern.decompose(TinyResNet(width=4).double())
    with pytest.raises(ValueError, match=r"'conv'.*expects|layer 'conv'"):
        svdkern.load_state_dict(other, state)


def test_load_state_dict_decomposition_mismatch_names_the_layer():
    state = svdkern.decompose(_resnet(), "spatial").state_dict()
    other = svdkern.decompose(_resnet(), "channel")
    with pytest.raises(ValueError, match="'conv'"):
        svdkern.load_state_dict(other, state)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0])


_LOAD_MODELS = {
    "SVDLinear": lambda: nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6)),
    "SVDConv2d": lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3)),
    "SVDConv1d": lambda: nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 6, 3)),
    "SVDMultiheadAttention": _Attention,
}


def _pruned_and_fresh(kind: str) -> tuple[nn.Module, nn.Module]:
    """Two decomposed `_LOAD_MODELS[kind]`: one pruned to rank 2 everywhere, one at full rank."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", svdkern.DecomposeWarning)
        pruned = svdkern.decompose(_LOAD_MODELS[kind]())
        fresh = svdkern.decompose(_LOAD_MODELS[kind]())
    svdkern.prune(pruned, ranks={"*": 2})
    return pruned, fresh


def _last_svd_prefix(model: nn.Module) -> str:
    return svdkern.nn.svd_layers(model)[-1][0] + "."


def _bad_bias(state: dict, model: nn.Module) -> str:
    key = _last_svd_prefix(model) + "bias"
    state[key] = torch.zeros(state[key].shape[0] + 1)
    return key


def _missing(state: dict, model: nn.Module) -> str:
    key = _last_svd_prefix(model) + "s"
    del state[key]
    return key


def _unexpected(state: dict, model: nn.Module) -> str:
    state["extra.weight"] = torch.zeros(2)
    return "extra.weight"


def _rank_over_full(state: dict, model: nn.Module) -> str:
    prefix = _last_svd_prefix(model)
    layer = svdkern.nn.svd_layers(model)[-1][1]
    r = layer.full_rank + 1
    m, n = layer.matrix_shape
    state[prefix + "U"] = torch.zeros(m, r)
    state[prefix + "s"] = torch.ones(r)
    state[prefix + "V"] = torch.zeros(n, r)
    return prefix + "s"


@pytest.mark.parametrize("spoil", [_bad_bias, _missing, _unexpected, _rank_over_full])
@pytest.mark.parametrize("kind", list(_LOAD_MODELS))
def test_failed_load_state_dict_leaves_the_model_untouched(kind, spoil):
    pruned, fresh = _pruned_and_fresh(kind)
    state = dict(pruned.state_dict())
    key = spoil(state, fresh)
    before = {k: (id(v), v.detach().clone()) for k, v in fresh.state_dict(keep_vars=True).items()}
    ranks = [layer.rank for _, layer in svdkern.nn.svd_layers(fresh)]
    with pytest.raises(ValueError, match="nothing was loaded.*" + re.escape(key)):
        svdkern.load_state_dict(fresh, state)
    assert [layer.rank for _, layer in svdkern.nn.svd_layers(fresh)] == ranks
    after = fresh.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for k, (ident, value) in before.items():
        assert id(after[k]) == ident, k
        torch.testing.assert_close(after[k].detach(), value, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(_LOAD_MODELS))
def test_load_state_dict_non_strict_loads_what_fits(kind):
    pruned, fresh = _pruned_and_fresh(kind)
    state = dict(pruned.state_dict())
    _unexpected(state, fresh)
    result = svdkern.load_state_dict(fresh, state, strict=False)
    assert result.unexpected_keys == ["extra.weight"] and not result.missing_keys
    assert all(layer.rank == 2 for _, layer in svdkern.nn.svd_layers(fresh))
    for k, v in pruned.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)


def test_compress_with_a_wrong_input_shape_names_input_shape():
    model = nn.Sequential(SVDConv2d(3, 4, 3), nn.Flatten(), SVDLinear(4 * 4 * 4, 2))
    with pytest.raises(ValueError, match=r"input_shape=\(3, 6, 6\)"):
        svdkern.compress(model, input_shape=(3, 6, 6))


def _small_svd(dtype=torch.float32) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", svdkern.DecomposeWarning)
        model = svdkern.decompose(_LOAD_MODELS["SVDConv2d"]().to(dtype))
    return model


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def test_load_state_dict_copies_into_the_models_own_tensors():
    src, dst = _small_svd(), _small_svd()
    svdkern.prune(src, ranks={"*": 2})
    state = src.state_dict()
    metadata = copy.deepcopy(state._metadata)
    svdkern.load_state_dict(dst, state)
    assert state._metadata == metadata
    source_ptrs = {t.data_ptr() for t in state.values()}
    assert all(t.data_ptr() not in source_ptrs for t in _tensors(dst))
    assert all(isinstance(p, nn.Parameter) for p in dst.parameters())
    before = copy.deepcopy(src.state_dict())
    opt = torch.optim.SGD(dst.parameters(), lr=0.1)
    dst(torch.randn(2, 3, 6, 6)).square().sum().backward()
    opt.step()
    for key, value in src.state_dict().items():
        assert torch.equal(value, before[key]), key
        assert torch.equal(state[key], before[key]), key
    assert not torch.equal(dst[0].U, src[0].U)


def test_two_models_loaded_from_one_dict_are_independent():
    src = _small_svd()
    svdkern.prune(src, ranks={"*": 2})
    state = src.state_dict()
    a, b = _small_svd(), _small_svd()
    svdkern.load_state_dict(a, state)
    svdkern.load_state_dict(b, state)
    assert {t.data_ptr() for t in _tensors(a)}.isdisjoint(t.data_ptr() for t in _tensors(b))
    with torch.no_grad():
        a[0].U.add_(1.0)
    torch.testing.assert_close(b[0].U, src[0].U, rtol=0, atol=0)


def test_load_state_dict_keeps_a_float64_model_float64():
    src = _small_svd(torch.float32)
    svdkern.prune(src, ranks={"*": 2})
    dst = _small_svd(torch.float64)
    svdkern.load_state_dict(dst, src.state_dict())
    assert all(t.dtype == torch.float64 for t in _tensors(dst))
    assert all(layer.rank == 2 for _, layer in svdkern.nn.svd_layers(dst))
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(dst(x.double()).float(), src(x), rtol=1e-5, atol=1e-6)


def test_load_state_dict_of_a_higher_rank_checkpoint_grows_a_pruned_model():
    full, pruned = _small_svd(), _small_svd()
    svdkern.prune(pruned, ranks={"*": 1})
    svdkern.load_state_dict(pruned, full.state_dict())
    assert [lay.rank for _, lay in svdkern.nn.svd_layers(pruned)] == [
        lay.rank for _, lay in svdkern.nn.svd_layers(full)
    ]
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(pruned(x), full(x), rtol=0, atol=0)
    assert {t.data_ptr() for t in _tensors(pruned)}.isdisjoint(t.data_ptr() for t in _tensors(full))


def _channels_last_svd_model() -> nn.Module:
    model = _small_svd()
    svdkern.prune(model, ranks={"*": 2})
    return svdkern.set_memory_format(model, "channels_last")


def _hooks(model: nn.Module) -> list:
    return [h for m in model.modules() for h in m._forward_pre_hooks.values()]


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("policy", ["flops", "lowrank", "dense"])
def test_compress_drops_the_channels_last_hook_and_scripts(policy):
    model = _channels_last_svd_model()
    plain = svdkern.compress(model, policy)
    assert not any(getattr(h, "__module__", "").startswith("svdkern") for h in _hooks(plain))
    assert _hooks(model)  # the SVD model keeps its hook
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(torch.jit.script(plain)(x), model(x), rtol=1e-5, atol=1e-6)


def test_compressed_channels_last_model_loads_without_svdkern(tmp_path):
    model = _channels_last_svd_model()
    x = torch.randn(2, 3, 6, 6)
    path = tmp_path / "deployed.pt"
    torch.save(svdkern.compress(model, "lowrank"), path)
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "io.pt")
    script = (
        "import sys; sys.modules['svdkern'] = None\n"
        "import torch\n"
        f"model = torch.load({str(path)!r}, weights_only=False)\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "torch.testing.assert_close(model(io['x']), io['y'], rtol=1e-5, atol=1e-6)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("policy", ["flops", "latency", "lowrank", "dense"])
def test_compress_leaves_the_global_rng_as_it_found_it(monkeypatch, policy):
    svdkern.clear_tune_cache()
    model = nn.Sequential(SVDLinear(16, 16, rank=2), SVDLinear(16, 16, rank=3))
    monkeypatch.setattr(svdkern.tune, "_measure", _fake_measure({(2, 1): True}))
    monkeypatch.setattr(svdkern.tune, "time_models", _fake_model_times(FASTEST_LATENCY))
    state = torch.get_rng_state()
    svdkern.compress(model, policy, input_shape=(1, 16))
    assert torch.equal(torch.get_rng_state(), state)
    svdkern.clear_tune_cache()
