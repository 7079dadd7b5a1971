"""Deployment options of compress: runtimes (eager, compile, onnxruntime) timed by policy
"latency" (choice logic with fake timers; one real compile and ONNX export each), batch norm
folding (exact, and refused where it would change the output), the size tolerance, the
report, and the errors of each runtime."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svdkern
from svdkern import runtimes, tune
from svdkern.compress import CANDIDATES
from svdkern.fold import fold_batchnorm, foldable_pairs
from svdkern.nn import SVDConv1d, SVDConv2d, SVDLinear

BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
SVD_CONV = {1: SVDConv1d, 2: SVDConv2d}


def _random_stats(model: nn.Module) -> nn.Module:
    """Batch norms with statistics and affine parameters far from the identity."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            if m.weight is not None:
                m.weight.data.normal_()
                m.bias.data.normal_()
    return model


def _conv_bn(dims: int, bias: bool, affine: bool = True, dtype=torch.float64) -> nn.Module:
    conv = SVD_CONV[dims](6, 10, 3, padding=1, bias=bias, rank=3)
    model = nn.Sequential(conv, BN[dims](10, affine=affine), nn.ReLU(), nn.Conv1d(10, 4, 1))
    if dims == 2:
        model[3] = nn.Conv2d(10, 4, 1)
    return _random_stats(model).to(dtype).eval()


def _no_bn(model: nn.Module) -> bool:
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("form", ["lowrank", "dense"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dims", [1, 2], ids=["conv1d", "conv2d"])
def test_fold_bn_equals_the_unfolded_model(dims, bias, form):
    model = _conv_bn(dims, bias)
    x = torch.randn((3, 6, 9) if dims == 1 else (3, 6, 9, 7), dtype=torch.float64)
    plain = svdkern.compress(model, form)
    folded, report = svdkern.compress(model, form, fold_bn=True, report=True)
    assert _no_bn(folded) and not _no_bn(plain)
    conv = "0.1" if form == "lowrank" else "0"
    assert report.folded == [(conv, "1")]
    assert folded.get_submodule(conv).bias is not None
    torch.testing.assert_close(folded(x), plain(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-12)


def test_fold_bn_without_affine_parameters_is_exact():
    model = _conv_bn(2, bias=False, affine=False)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    folded = svdkern.compress(model, "lowrank", fold_bn=True)
    assert _no_bn(folded)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", ["lowrank", "dense"])
def test_fold_bn_keeps_the_weights_layout_and_channels_last_outputs(form):
    model = _conv_bn(2, bias=False, dtype=torch.float32)
    svdkern.set_memory_format(model, "channels_last")
    x = torch.randn(2, 6, 8, 8)
    expected = model(x)
    plain = svdkern.compress(model, form)
    folded = svdkern.compress(model, form, fold_bn=True)
    name = "0.1" if form == "lowrank" else "0"
    layouts = [
        m.get_submodule(name).weight.is_contiguous(memory_format=torch.channels_last)
        for m in (plain, folded)
    ]
    assert _no_bn(folded) and layouts[0] == layouts[1]
    y = folded(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


class _Block(nn.Module):
    """The CIFAR BasicBlock pattern: conv-BN-ReLU-conv-BN plus a shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


class _ConvLayer(nn.Module):
    """transformers' ResNetConvLayer pattern: convolution → normalization → activation."""

    def __init__(self) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.normalization = nn.BatchNorm2d(4)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.normalization(self.convolution(x)))


class _Untraceable(nn.Module):
    """A forward with data-dependent control flow (no fx trace) around a foldable child."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.inner = _ConvLayer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return self.inner(self.bn(self.conv(x)))


def test_fold_bn_finds_block_and_conv_layer_patterns_and_skips_untraceable_parents():
    model = nn.Sequential(_Block(), _ConvLayer(), _Untraceable())
    model = svdkern.decompose(_random_stats(model).double().eval())
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    folded, report = svdkern.compress(model, "lowrank", fold_bn=True, report=True)
    assert [bn for _, bn in report.folded] == [
        "0.bn1",
        "0.bn2",
        "1.normalization",
        "2.inner.normalization",
    ]
    assert isinstance(folded[2].bn, nn.BatchNorm2d)  # its parent's forward does not trace
    torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-12)


class _Reuses(nn.Module):
    """Batch norms that must not be folded: the conv's output also feeds the sum; a BN of a
    sum; a conv called twice; a BN whose parent reads the conv's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.c, self.bn_c = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.d, self.bn_d = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = self.bn_a(y) + y
        y = self.bn_b(self.b(y) + y)
        y = self.bn_c(self.c(self.c(y)))
        return self.bn_d(self.d(y)) * self.d.weight.sum()


def test_fold_bn_leaves_a_bn_whose_input_is_not_exactly_one_conv_output():
    model = _random_stats(_Reuses()).double().eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    expected = model(x)
    assert foldable_pairs(model) == []
    assert fold_batchnorm(model) == []
    torch.testing.assert_close(model(x), expected)


def test_fold_bn_leaves_shared_and_hooked_modules():
    conv, bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    shared = nn.Sequential(nn.Sequential(conv, bn), nn.Sequential(conv, nn.ReLU()))
    assert foldable_pairs(shared.eval()) == []
    hooked = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    hooked[1].register_forward_hook(lambda m, i, o: None)
    assert foldable_pairs(hooked) == []
    hooked[1]._forward_hooks.clear()
    assert foldable_pairs(hooked) == [("0", "1")]


def test_fold_bn_of_a_model_in_train_mode_raises_naming_the_batch_norms():
    model = _conv_bn(2, bias=False).train()
    with pytest.raises(ValueError, match=r"fold_bn: batch norm layers \['1'\].*model.eval\(\)"):
        svdkern.compress(model, "lowrank", fold_bn=True)
    plain = svdkern.compress(model, "lowrank")  # without folding it deploys as before
    assert isinstance(plain[1], nn.BatchNorm2d) and plain.training


# Choice logic in a runtime, with fake timers: the layer timings (`_measure`, told the
# runtime) and the whole-model timing (`time_models`) are replaced;
# `runtimes.prepare` is replaced by a marker wrapper so that no compile or export runs.


class _Prepared(nn.Module):
    def __init__(self, runtime: str, model: nn.Module) -> None:
        super().__init__()
        self.runtime, self.model = runtime, model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _fake_runtime(monkeypatch, layer_ms: dict[int, tuple[float, float]], model_ms: dict):
    """Layers of rank r take layer_ms[r] = (dense, lowrank) ms alone; whole models take
    model_ms[candidate] ms per example. Returns the record of what ran where."""
    seen = {"layers": [], "models": []}

    def times(layer, shape, runtime):
        seen["layers"].append((layer.rank, shape, runtime))
        dense, lowrank = layer_ms[layer.rank]
        return {"dense": dense, "lowrank": lowrank}

    def measure(layer, shape, dtype, input_grad, channels_last, training, repeats, runtime):
        return times(layer, shape, runtime)

    def prepare(runtime, model, examples):
        model.eval()  # as the real runtimes do
        return model if runtime == "eager" else _Prepared(runtime, model)

    def time_models(models, examples, repeats=5, round_s=None):
        seen["models"].append({n: getattr(m, "runtime", "eager") for n, m in models.items()})
        return {name: list(model_ms[name][: len(examples)]) for name in models}

    monkeypatch.setattr(tune, "_measure", measure)
    monkeypatch.setattr(runtimes, "prepare", prepare)
    monkeypatch.setattr(tune, "time_models", time_models)
    svdkern.clear_tune_cache()
    return seen


def _two_layers() -> nn.Module:
    """Rank 4 of 64 (a pair by the MAC rule) and rank 40 of 64 (dense by the MAC rule)."""
    torch.manual_seed(0)
    return nn.Sequential(SVDLinear(64, 64, rank=4), nn.ReLU(), SVDLinear(64, 64, rank=40)).eval()


SHAPES = [(1, 64), (32, 64)]
# The forms of the whole-model candidates of _two_layers (per-layer choice "latency" as the
# fake layer times make it).
FORMS = {"dense": [False, False], "flops": [True, False], "lowrank": [True, True]}


def _pairs(plain: nn.Module) -> list[bool]:
    return [isinstance(plain[i], nn.Sequential) for i in (0, 2)]


@pytest.mark.parametrize("runtime", runtimes.RUNTIMES)
def test_latency_in_a_runtime_times_layers_and_models_there_and_is_never_slower_than_dense(
    monkeypatch, runtime
):
    # Alone, the rank-4 layer's pair is faster, the rank-40 one's is not (so the per-layer
    # choice equals the MAC rule's, timed once); whole, every model with pairs is slower
    # than dense at batch 1 (fusion in the runtime): dense is deployed.
    ms = {"dense": [1.0, 1.0], "latency": [1.1, 0.5], "lowrank": [1.2, 0.4]}
    seen = _fake_runtime(monkeypatch, {4: (1.0, 0.5), 40: (1.0, 1.2)}, ms)
    plain, report = svdkern.compress(_two_layers(), "latency", SHAPES, runtime=runtime, report=True)
    assert {r for _, _, r in seen["layers"]} == {runtime}
    assert sorted(r for r, _, _ in seen["layers"]) == [4, 4, 40, 40]
    assert seen["models"] == [dict.fromkeys(["dense", "latency", "lowrank"], runtime)]
    assert _pairs(plain) == FORMS["dense"]
    assert report.chosen == "dense" and report.runtime == runtime
    assert report.candidates["latency"]["ms"] == [1.1, 0.5]
    assert report.candidates["latency"]["confirm_ms"] == []
    alone = {"dense": 1.0, "lowrank": 0.5}
    assert report.layers[0].times_ms == {"1×64": alone, "32×64": alone}


@pytest.mark.parametrize("runtime", ["compile", "onnxruntime"])
def test_latency_in_a_runtime_keeps_the_fastest_model_confirmed_against_dense(monkeypatch, runtime):
    ms = {"dense": [1.0, 1.0], "latency": [0.9, 0.8], "lowrank": [0.95, 0.6]}
    seen = _fake_runtime(monkeypatch, {4: (1.0, 0.5), 40: (1.0, 1.2)}, ms)
    model = _two_layers()
    plain, report = svdkern.compress(model, "latency", SHAPES, runtime=runtime, report=True)
    assert report.chosen == "lowrank" and _pairs(plain) == FORMS["lowrank"]
    assert seen["models"][1] == dict.fromkeys(["lowrank", "dense"], runtime)
    assert report.candidates["lowrank"]["confirm_ms"] == [0.95, 0.6]
    x = torch.randn(3, 64)
    torch.testing.assert_close(plain(x), model(x))


def test_latency_keeps_the_train_flags_of_the_model_after_timing_in_a_runtime(monkeypatch):
    ms = {"dense": [1.0], "latency": [0.9], "lowrank": [0.8]}
    _fake_runtime(monkeypatch, {4: (1.0, 0.5), 40: (1.0, 1.2)}, ms)
    model = _two_layers().train()
    plain = svdkern.compress(model, "latency", SHAPES[:1], runtime="compile")
    assert all(m.training for m in plain.modules())


# Sizes: dense 8,320 params; "flops" (pair at rank 4) 4,736; "lowrank" 5,760; "latency"
# (pair at rank 40 only, where it is within the tolerance alone) 9,344.
NEAR_TIE = {
    "dense": [1.0, 1.0],
    "latency": [1.0, 1.0],
    "flops": [1.03, 1.01],
    "lowrank": [1.04, 1.02],
}


@pytest.mark.parametrize(
    "tolerance, ms, chosen",
    [
        # Within 3% of dense and the smallest: with a 5% tolerance it is deployed, without
        # one dense (nothing is faster).
        (0.05, NEAR_TIE, "flops"),
        (0.0, NEAR_TIE, "dense"),
        # 10% slower at one batch is beyond a 5% tolerance.
        (0.05, {**NEAR_TIE, "flops": [1.10, 0.99], "lowrank": [1.10, 0.99]}, "dense"),
        # The fastest is kept unless a smaller one is within the tolerance of it.
        (0.05, {**NEAR_TIE, "latency": [0.5, 0.5], "flops": [0.6, 0.6]}, "latency"),
        (0.05, {**NEAR_TIE, "latency": [0.5, 0.5], "flops": [0.52, 0.51]}, "flops"),
    ],
    ids=["near-tie-small", "no-tolerance", "beyond", "fastest", "near-fastest"],
)
def test_tolerance_deploys_the_smallest_model_within_it_of_the_fastest(
    monkeypatch, tolerance, ms, chosen
):
    # Alone, the rank-4 pair is 50% slower, the rank-40 pair 2% slower than dense.
    _fake_runtime(monkeypatch, {4: (1.0, 1.5), 40: (1.0, 1.02)}, ms)
    plain, report = svdkern.compress(
        _two_layers(), "latency", SHAPES, tolerance=tolerance, report=True
    )
    assert report.chosen == chosen
    assert _pairs(plain) == {**FORMS, "latency": [False, True]}[chosen]
    assert report.params == sum(p.numel() for p in plain.parameters())
    assert report.candidates[chosen]["params"] == report.params


def test_report_lists_every_layer_with_form_params_and_macs():
    model = nn.Sequential(SVDLinear(16, 16), SVDLinear(16, 16, rank=2))
    _, report = svdkern.compress(model, "flops", (3, 16), report=True)
    assert [(lay.name, lay.form) for lay in report.layers] == [("0", "dense"), ("1", "lowrank")]
    assert [lay.params for lay in report.layers] == [16 * 16 + 16, 2 * 16 + 2 * 16 + 16]
    assert [lay.macs for lay in report.layers] == [3 * 256, 3 * 64]
    assert report.chosen == "flops" and report.candidates["flops"]["pairs"] == 1
    assert "1" in str(report) and report.to_dict()["params"] == report.params


# Errors.


def test_unknown_runtime_is_refused_naming_the_runtimes():
    model = nn.Sequential(SVDLinear(8, 8))
    with pytest.raises(ValueError, match=r"runtime must be one of \('eager', 'compile'"):
        svdkern.compress(model, "latency", (1, 8), runtime="tensorrt")


def test_runtime_and_tolerance_need_policy_latency():
    model = nn.Sequential(SVDLinear(8, 8))
    with pytest.raises(ValueError, match="runtime='compile' is where policy='latency'"):
        svdkern.compress(model, "flops", runtime="compile")
    with pytest.raises(ValueError, match="policy 'latency' only"):
        svdkern.compress(model, "lowrank", tolerance=0.1)
    with pytest.raises(ValueError, match="tolerance must be a finite fraction"):
        svdkern.compress(model, "latency", (1, 8), tolerance=-0.1)


def test_missing_onnxruntime_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(RuntimeError, match=r"pip install svdkern\[deploy\]") as info:
        svdkern.compress(nn.Sequential(SVDLinear(8, 8)), "latency", (1, 8), runtime="onnxruntime")
    assert isinstance(info.value.__cause__, ImportError)


class _NotExportable(nn.Module):
    """An op ONNX has no translation for (eigh)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigh(x @ x.mT).eigenvalues


def test_a_model_that_does_not_export_raises_naming_the_exporter():
    pytest.importorskip("onnxruntime")
    with pytest.raises(RuntimeError, match=r"torch.onnx.export failed on _NotExportable") as info:
        runtimes.prepare("onnxruntime", _NotExportable(), [((torch.randn(2, 3, 3),), {})])
    assert info.value.__cause__ is not None


def test_a_model_that_does_not_compile_raises_naming_torch_compile(monkeypatch):
    def broken(fn, **kwargs):
        def run(*args):
            raise AssertionError("inductor lowering failed")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(RuntimeError, match=r"torch.compile failed on Linear .*inductor") as info:
        runtimes.prepare("compile", nn.Linear(4, 4), [((torch.randn(2, 4),), {})])
    assert isinstance(info.value.__cause__, AssertionError)


class _OtherWhenExported(nn.Module):
    """Computes x + 1 while exported or compiled, x eagerly: the runtime's check must see it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            return x + 1
        return x * 1


@pytest.mark.parametrize("runtime", ["compile", "onnxruntime"])
def test_runtime_outputs_that_differ_from_eager_are_an_error(runtime):
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    with pytest.raises(RuntimeError, match=rf"runtime='{runtime}': output 0 differs .* by 1"):
        runtimes.prepare(runtime, _OtherWhenExported(), [((torch.randn(2, 3),), {})])


# Real runtimes: one compile, one ONNX Runtime session per test.


def test_onnxruntime_runs_the_compressed_folded_model_with_the_pytorch_outputs():
    pytest.importorskip("onnxruntime")
    model = svdkern.decompose(_random_stats(nn.Sequential(_Block(), _ConvLayer())).eval())
    svdkern.prune(model, energy=0.3)
    deployed = svdkern.compress(model, "lowrank", fold_bn=True)
    assert _no_bn(deployed)
    x = torch.randn(2, 4, 8, 8)
    run = runtimes.prepare("onnxruntime", deployed, [((x,), {})])
    # Within the float32 tolerance of the runtimes' check (1e-4 of the largest output).
    torch.testing.assert_close(run(x), model(x), rtol=1e-4, atol=1e-4 * model(x).abs().max().item())


def test_compile_runs_the_compressed_model_with_the_pytorch_outputs():
    model = svdkern.decompose(_random_stats(nn.Sequential(_ConvLayer())).eval())
    deployed = svdkern.compress(model, "lowrank", fold_bn=True)
    x = torch.randn(2, 4, 8, 8)
    run = runtimes.prepare("compile", deployed, [((x,), {})])
    torch.testing.assert_close(run(x), model(x), rtol=1e-4, atol=1e-4 * model(x).abs().max().item())


def test_latency_in_onnxruntime_end_to_end_is_exact():
    pytest.importorskip("onnxruntime")
    svdkern.clear_tune_cache()
    model = svdkern.decompose(_random_stats(nn.Sequential(_ConvLayer())).eval())
    x = torch.randn(1, 4, 8, 8)
    plain, report = svdkern.compress(
        model, "latency", tuple(x.shape), runtime="onnxruntime", fold_bn=True, report=True
    )
    assert report.runtime == "onnxruntime" and report.chosen in CANDIDATES
    assert set(report.layers[0].times_ms["1×4×8×8"]) == {"dense", "lowrank"}
    torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)
    svdkern.clear_tune_cache()
