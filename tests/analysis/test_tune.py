"""Measured form selection (`svdkern.tune_forms`): forms are set from timings, followed by
`mode="auto"`, cached per (geometry, rank, input, ...), forgotten on a rank change."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import svdkern
from svdkern import tune
from svdkern.nn import SVDConv2d, SVDLinear


@pytest.fixture(autouse=True)
def _fresh_cache():
    svdkern.clear_tune_cache()
    yield
    svdkern.clear_tune_cache()


def _cnn() -> nn.Module:
    return nn.Sequential(
        SVDConv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        SVDConv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        SVDConv2d(8, 8, 3, padding=1, decomposition="spatial"),
        nn.Flatten(),
        SVDLinear(8 * 6 * 6, 10),
    )


class _LeNet(nn.Module):
    """Flattens with `.view()`, which needs NCHW strides: its forward fails channels-last."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        return self.fc(x.view(x.size(0), -1))


def _lenet() -> nn.Module:
    return svdkern.decompose(_LeNet())


class _TwoShapes(nn.Module):
    """One SVD layer called at two input shapes in one forward."""

    def __init__(self):
        super().__init__()
        self.lin = SVDLinear(16, 16)

    def forward(self, x):
        return self.lin(x).sum() + self.lin(x[:2]).sum()


def test_interleaved_timing_ranks_a_slow_function_above_a_fast_one():
    times = tune._time_interleaved(
        {"slow": lambda: time.sleep(0.003), "fast": lambda: None}, 3, torch.device("cpu")
    )
    assert times["slow"] >= 3.0 > times["fast"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_tune_reports_every_layer_and_auto_follows_training_forms(training):
    model = _cnn()
    x = torch.randn(2, 3, 6, 6)
    report = svdkern.tune_forms(model, x, training=training, repeats=1)
    layers = [m for m in model.modules() if isinstance(m, SVDLinear | SVDConv2d)]
    assert [lay.name for lay in report.layers] == ["0", "3", "6", "8"]
    forms = ("compose", "chain") if training else ("dense", "lowrank")
    for lay, layer in zip(report.layers, layers, strict=True):
        assert set(lay.times_ms) == set(forms) and lay.form in forms
        t = lay.times_ms
        if training:
            assert lay.form == min(t, key=t.get)
        else:  # the pair must be ≥ 5% faster to replace the dense layer
            assert (lay.form == "lowrank") == (t["lowrank"] <= 0.95 * t["dense"])
        # Inference choices are reported only (they decide compress(policy="latency")).
        expected = {(True, lay.input_shape): lay.form == "chain"} if training else {}
        assert layer.forms == expected
    if training:
        model.train()
        model(x)
        for lay, layer in zip(report.layers, layers, strict=True):
            assert layer._last_chain == (lay.form == "chain")
    assert "form" in str(report) and report.to_dict()["timed"] == 4


def test_set_form_overrides_the_mac_rule_and_outputs_agree():
    layer = SVDLinear(64, 64, rank=2)  # the MAC rule takes the chain here
    x = torch.randn(5, 64)
    chain = layer(x)
    assert layer._last_chain
    layer.set_form(x.shape, chain=False)
    compose = layer(x)
    assert not layer._last_chain
    torch.testing.assert_close(compose, chain, atol=1e-5, rtol=1e-4)
    layer.eval()
    layer(x)  # eval mode was not tuned: the MAC rule again
    assert layer._last_chain


def test_tuning_leaves_batch_norm_statistics_and_train_flags_alone():
    model = _cnn().train()
    model[4].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    svdkern.tune_forms(model, torch.randn(2, 3, 6, 6), repeats=1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model[1].training and not model[4].training


def test_cache_times_equal_layers_once_and_a_rank_cut_retunes_only_that_layer():
    model = nn.Sequential(
        SVDLinear(16, 16), nn.ReLU(), SVDLinear(16, 16), SVDLinear(16, 16), SVDLinear(16, 4)
    )
    x = torch.randn(3, 16)
    first = svdkern.tune_forms(model, x, repeats=1)
    # The first layer gets no input gradient, the next two are equal: one timing for both.
    assert [lay.cached for lay in first.layers] == [False, False, True, False]
    again = svdkern.tune_forms(model, x, repeats=1)
    assert again.timed == 0 and again.forms() == first.forms()
    model[3].prune_(5)
    assert model[3].forms == {}  # a rank change forgets the layer's forms
    assert model[2].forms != {}
    after = svdkern.tune_forms(model, x, repeats=1)
    assert [lay.cached for lay in after.layers] == [True, True, False, True]
    assert after.layers[2].rank == 5
    fresh = svdkern.tune_forms(model, x, repeats=1, use_cache=False)
    assert fresh.timed == 4


def test_inference_tuning_does_not_reuse_training_times():
    model = nn.Sequential(SVDLinear(8, 8))
    svdkern.tune_forms(model, torch.randn(4, 8), repeats=1)
    report = svdkern.tune_forms(model, torch.randn(4, 8), training=False, repeats=1)
    assert report.timed == 1 and set(report.layers[0].times_ms) == {"dense", "lowrank"}


def test_inference_tuning_leaves_the_layers_forms_alone():
    # The eval forward of an SVD layer recomposes W per call: the deployed dense layer's time
    # must not decide it.
    model = nn.Sequential(SVDLinear(16, 16))
    svdkern.tune_forms(model, torch.randn(4, 16), training=False, repeats=1)
    assert model[0].forms == {}
    svdkern.compress(model, "latency", [(1, 16), (4, 16)])
    assert model[0].forms == {}


def test_tuned_model_compiles_fullgraph_and_matches_eager():
    model = nn.Sequential(SVDLinear(12, 12, rank=3), nn.ReLU(), SVDLinear(12, 5))
    x = torch.randn(4, 12)
    svdkern.tune_forms(model, x, repeats=1)
    model[0].set_form(x.shape, chain=False)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param({"repeats": 0}, ValueError, "repeats", id="repeats-0"),
        pytest.param({"example_inputs": "x"}, TypeError, "example_inputs", id="inputs"),
        pytest.param({"example_inputs": [1, 2]}, ValueError, "example_inputs", id="forward"),
        pytest.param({"example_kwargs": [1]}, TypeError, "example_kwargs", id="kwargs"),
    ],
)
def test_tune_rejects_bad_arguments(kwargs, error, match):
    args = {"example_inputs": torch.randn(2, 4), **kwargs}
    with pytest.raises(error, match=match):
        svdkern.tune_forms(nn.Sequential(SVDLinear(4, 4)), **args)


def test_layer_called_at_two_shapes_gets_a_form_for_each():
    model = _TwoShapes()
    report = svdkern.tune_forms(model, torch.randn(5, 16), repeats=1)
    assert [(lay.name, lay.input_shape) for lay in report.layers] == [
        ("lin", (5, 16)),
        ("lin", (2, 16)),
    ]
    assert model.lin.forms == {
        (True, lay.input_shape): lay.form == "chain" for lay in report.layers
    }
    assert "5×16" in str(report) and "2×16" in str(report)
    inference = svdkern.tune_forms(model, torch.randn(5, 16), training=False, repeats=1)
    assert [lay.input_shape for lay in inference.layers] == [(5, 16), (2, 16)]


def test_cache_keeps_autocast_states_and_input_dtypes_apart():
    model = nn.Sequential(SVDLinear(16, 16))
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = svdkern.tune_forms(model, x, repeats=1)
    plain = svdkern.tune_forms(model, x, repeats=1)
    assert autocast.timed == 1 and plain.timed == 1 and "(cached)" not in str(plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert svdkern.tune_forms(model, x, repeats=1).timed == 0  # the same state again
        bf16 = svdkern.tune_forms(model, x.bfloat16(), repeats=1)  # fp32 timed, not bf16
    assert bf16.timed == 1 and bf16.layers[0].input_shape == (4, 16)
    assert len(tune._CACHE) == 3


class _Noisy(nn.Module):
    """Draws from the global generator in every forward, eval mode included."""

    def forward(self, x):
        return x + torch.rand_like(x)


@pytest.mark.parametrize("memory_format", [None, "auto"])
def test_tuning_and_timing_leave_the_random_number_generator_as_found(memory_format):
    model = nn.Sequential(_cnn(), nn.Dropout(0.5))  # "auto" times train steps: dropout draws
    x = torch.randn(2, 3, 6, 6)
    state = torch.get_rng_state()
    svdkern.tune_forms(model, x, repeats=1, memory_format=memory_format)
    assert torch.equal(torch.get_rng_state(), state)
    tune.time_models({"noisy": _Noisy()}, [((x,), {})], repeats=1, max_calls=2)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.cuda
def test_tuning_on_cuda_leaves_its_random_number_generator_as_found():
    model = nn.Sequential(_cnn(), nn.Dropout(0.5)).cuda()
    x = torch.randn(2, 3, 6, 6, device="cuda")
    cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state()
    svdkern.tune_forms(model, x, repeats=1, memory_format="auto")
    assert torch.equal(torch.get_rng_state(), cpu)
    assert torch.equal(torch.cuda.get_rng_state(), cuda)


def test_tune_needs_svd_layers():
    with pytest.raises(ValueError, match="decompose"):
        svdkern.tune_forms(nn.Linear(4, 4), torch.randn(2, 4))


# ---------------------------------------------------------------- memory format


def test_set_memory_format_keeps_the_function_and_is_undone():
    torch.manual_seed(0)
    model = _cnn().eval()
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    tune.set_memory_format(model, "channels_last")
    assert tune.memory_format_of(model) == "channels_last"
    seen = []
    hook = model[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    after = model(x)
    assert seen[-1].is_contiguous(memory_format=torch.channels_last)
    assert not seen[-1].is_contiguous()
    torch.testing.assert_close(after, before)
    # Setting it again registers no second hook; "contiguous" removes it.
    tune.set_memory_format(model, "channels_last")
    assert len(model._forward_pre_hooks) == 1
    tune.set_memory_format(model, "contiguous")
    assert tune.memory_format_of(model) == "contiguous" and not model._forward_pre_hooks
    model(x)
    assert seen[-1].is_contiguous()
    hook.remove()


def test_set_memory_format_survives_deepcopy_independently():
    import copy

    model = tune.set_memory_format(_cnn(), "channels_last")
    twin = copy.deepcopy(model)
    tune.set_memory_format(twin, "contiguous")
    assert tune.memory_format_of(model) == "channels_last"
    assert tune.memory_format_of(twin) == "contiguous"


def test_set_memory_format_rejects_unknown_formats():
    with pytest.raises(ValueError, match="memory_format must be one of"):
        tune.set_memory_format(_cnn(), "nhwc")
    with pytest.raises(ValueError, match="memory_format must be None, 'auto'"):
        svdkern.tune_forms(_cnn(), torch.randn(2, 3, 6, 6), memory_format=torch.channels_last)


def test_auto_memory_format_times_both_and_changes_nothing_else(monkeypatch):
    torch.manual_seed(0)
    model = _cnn()
    x = torch.randn(4, 3, 6, 6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    before = model(x)
    model.train()
    # Make channels-last the clear winner so the choice is deterministic.
    real = tune._time_interleaved

    def timed(fns, repeats, device):
        if set(fns) == set(tune.MEMORY_FORMATS):
            return {"contiguous": 2.0, "channels_last": 1.0}
        return real(fns, repeats, device)

    monkeypatch.setattr(tune, "_time_interleaved", timed)
    report = svdkern.tune_forms(model, x, training=True, repeats=1, memory_format="auto")
    assert report.memory_format == "channels_last"
    assert report.memory_format_ms == {"contiguous": 2.0, "channels_last": 1.0}
    assert "chosen: channels_last" in str(report)
    assert tune.memory_format_of(model) == "channels_last"
    for key, value in model.state_dict().items():  # BN statistics and weights untouched
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    torch.testing.assert_close(model(x), before)
    # The convs were timed under both layouts (separate cache entries), so going back to
    # contiguous times nothing again.
    layouts = {key[5] for key in tune._CACHE if key[0] == "SVDConv2d"}
    assert layouts == {True, False}
    tune.set_memory_format(model, "contiguous")
    again = svdkern.tune_forms(model, x, training=True, repeats=1)
    assert again.memory_format == "contiguous" and again.timed == 0


def test_auto_memory_format_keeps_contiguous_unless_clearly_faster(monkeypatch):
    real = tune._time_interleaved

    def timed(fns, repeats, device):
        if set(fns) == set(tune.MEMORY_FORMATS):
            return {"contiguous": 1.0, "channels_last": 0.97}  # within the 5% margin
        return real(fns, repeats, device)

    monkeypatch.setattr(tune, "_time_interleaved", timed)
    model = _cnn()
    report = svdkern.tune_forms(model, torch.randn(2, 3, 6, 6), repeats=1, memory_format="auto")
    assert report.memory_format == "contiguous"
    assert tune.memory_format_of(model) == "contiguous"


def test_auto_memory_format_keeps_the_current_layout_in_a_near_tie(monkeypatch):
    # Re-tuning (after each rank cut) must not flip the layout on timing noise either way.
    times = {"contiguous": 1.0, "channels_last": 1.0}  # ms of a model step in each layout
    monkeypatch.setattr(tune, "_tune_memory_format", lambda *args: (dict(times), {}))
    model = tune.set_memory_format(_cnn(), "channels_last")
    x = torch.randn(2, 3, 6, 6)
    for contiguous in (1.0, 0.97, 1.03):  # a tie, 3% either way: stays channels-last
        times["contiguous"] = contiguous
        assert svdkern.tune_forms(model, x, repeats=1, memory_format="auto").memory_format == (
            "channels_last"
        )
    times["contiguous"] = 0.9  # clearly faster: back to contiguous
    assert svdkern.tune_forms(model, x, repeats=1, memory_format="auto").memory_format == (
        "contiguous"
    )
    assert tune.memory_format_of(model) == "contiguous"


def test_auto_memory_format_leaves_out_channels_last_when_the_forward_fails_in_it():
    model = _lenet()
    x = torch.randn(2, 3, 8, 8)
    for preset in ("contiguous", "channels_last"):  # an unchecked channels-last goes back
        tune.set_memory_format(model, preset)
        report = svdkern.tune_forms(model, x, repeats=1, memory_format="auto")
        assert report.memory_format == "contiguous" and report.memory_format_ms == {}
        assert set(report.memory_format_skipped) == {"channels_last"}
        assert "view size is not compatible" in report.memory_format_skipped["channels_last"]
        assert "chosen: contiguous" in str(report) and "channels_last left out" in str(report)
        assert tune.memory_format_of(model) == "contiguous"
        assert [lay.name for lay in report.layers] == ["conv1", "conv2", "fc"]
        model(x)


def test_set_memory_format_refuses_a_layout_the_forward_fails_in():
    model = _lenet().eval()
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"memory_format='channels_last'.*view size.*unchanged"):
        tune.set_memory_format(model, "channels_last", x)
    with pytest.raises(ValueError, match=r"memory_format='channels_last'"):
        svdkern.tune_forms(model, x, repeats=1, memory_format="channels_last")
    assert tune.memory_format_of(model) == "contiguous" and not model._forward_pre_hooks
    for key, value in model.state_dict().items():
        assert value.is_contiguous() and torch.equal(value, state[key]), key
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    # Inputs the model fails on in any layout are the inputs' fault.
    with pytest.raises(ValueError, match="example_inputs: the model's forward failed"):
        tune.set_memory_format(model, "channels_last", torch.randn(2, 5))
    with pytest.raises(TypeError, match="example_kwargs"):
        tune.set_memory_format(model, "channels_last", x, example_kwargs=[1])
    # A model that runs channels-last is set.
    cnn = tune.set_memory_format(_cnn(), "channels_last", torch.randn(2, 3, 6, 6))
    assert tune.memory_format_of(cnn) == "channels_last"


def test_auto_memory_format_ignores_models_without_image_inputs():
    model = nn.Sequential(SVDLinear(8, 8), nn.ReLU(), SVDLinear(8, 4))
    report = svdkern.tune_forms(model, torch.randn(3, 8), repeats=1, memory_format="auto")
    assert report.memory_format == "contiguous" and report.memory_format_ms == {}
    assert not model._forward_pre_hooks


def test_time_models_times_every_model_at_every_example_and_restores_modes():
    slow = nn.Sequential(nn.Linear(64, 64), *[nn.Linear(64, 64) for _ in range(30)]).train()
    fast = nn.Linear(64, 64).train()
    examples = [((torch.randn(2, 64),), {}), ((torch.randn(64, 64),), {})]
    times = tune.time_models({"slow": slow, "fast": fast}, examples, repeats=3)
    assert set(times) == {"slow", "fast"} and all(len(v) == 2 for v in times.values())
    assert all(s > f for s, f in zip(times["slow"], times["fast"], strict=True))
    assert slow.training and fast.training
