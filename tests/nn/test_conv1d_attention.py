"""SVDConv1d, SVDLinear from a transformers-style Conv1D, and SVDMultiheadAttention:
exact at full rank against the dense modules they replace (fp64 tight, fp32 within
rounding), pruning, conversions back to dense and low-rank modules, gradients (gradcheck
in fp64), state dicts, MAC counts and argument errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import svdkern
from svdkern import reference
from svdkern.nn import (
    SVDConv1d,
    SVDConv2d,
    SVDLinear,
    SVDMultiheadAttention,
    grouped_compose,
    is_conv1d_like,
    svd_layers,
)

F64 = torch.float64


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp_min(1e-30)
    assert (actual - expected).abs().max() / scale <= rtol


def _flop_count(module: nn.Module, *args, **kwargs) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*args, **kwargs)
    return counter.get_total_flops()


def _gradcheck_module(module: nn.Module, *inputs: torch.Tensor, **kwargs) -> None:
    """gradcheck of module(*inputs, **kwargs) in every parameter and every input."""
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in module.named_parameters()]
    inputs = [x.detach().clone().requires_grad_() for x in inputs]

    def fn(*tensors):
        values = dict(zip(names, tensors[: len(names)], strict=True))
        out = functional_call(module, values, tuple(tensors[len(names) :]), kwargs)
        return out[0] if isinstance(out, tuple) else out

    assert torch.autograd.gradcheck(fn, (*params, *inputs), eps=1e-6, atol=1e-6)


# --- SVDConv1d --------------------------------------------------------------------------

# (kernel_size, stride, padding, dilation)
CONV1D_CASES = [
    pytest.param(3, 1, 1, 1, id="k3-s1-p1"),
    pytest.param(5, 2, 2, 1, id="k5-s2-p2"),
    pytest.param(1, 3, 0, 1, id="k1-s3"),
    pytest.param(3, 2, (1,), 3, id="k3-s2-p1-d3"),
    pytest.param(3, 1, "same", 2, id="k3-same-d2"),
    pytest.param(3, 1, "valid", 1, id="k3-valid"),
    pytest.param(
        4,
        1,
        "same",
        1,
        id="k4-same-asym",
        marks=pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"),
    ),
]


@pytest.mark.parametrize("mode", ["compose", "chain", "auto"])
@pytest.mark.parametrize("kernel, stride, padding, dilation", CONV1D_CASES)
def test_svd_conv1d_full_rank_equals_dense(kernel, stride, padding, dilation, mode):
    conv = nn.Conv1d(5, 7, kernel, stride, padding, dilation, dtype=F64)
    layer = SVDConv1d.from_dense(conv, mode=mode)
    assert layer.rank == layer.full_rank == min(7, 5 * kernel)
    assert layer.kernel_size == (kernel,)
    x = torch.randn(3, 5, 17, dtype=F64)
    expected = conv(x)
    _close(layer(x), expected, 1e-10)
    _close(layer.to_dense()(x), expected, 1e-10)
    _close(layer.to_lowrank()(x), expected, 1e-10)
    # unbatched (c_in, L) input, as nn.Conv1d takes it
    _close(layer(x[0]), conv(x[0]), 1e-10)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_svd_conv1d_fp32_full_rank_equals_dense(bias):
    conv = nn.Conv1d(6, 10, 3, stride=2, padding=1, bias=bias)
    layer = SVDConv1d.from_dense(conv)
    x = torch.randn(4, 6, 33)
    for mode in ("compose", "chain"):
        layer.mode = mode
        _close(layer(x), conv(x), 1e-5)
    assert isinstance(layer.to_dense(), nn.Conv1d)
    assert all(isinstance(m, nn.Conv1d) for m in layer.to_lowrank())


def test_svd_conv1d_attributes_mirror_conv1d():
    conv = nn.Conv1d(4, 9, 5, stride=2, padding=3, dilation=2, bias=False)
    layer = SVDConv1d.from_dense(conv)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation"):
        assert getattr(layer, name) == getattr(conv, name), name
    assert layer.weight.shape == conv.weight.shape and layer.bias is None
    assert (layer.U.shape, layer.s.shape, layer.V.shape) == ((9, 9), (9,), (20, 9))


def test_svd_conv1d_prune_keeps_the_largest_triplets_and_conversions_agree():
    conv = nn.Conv1d(6, 8, 3, padding=1, dtype=F64)
    layer = SVDConv1d.from_dense(conv)
    U, s, V = (t.detach().clone() for t in (layer.U, layer.s, layer.V))
    layer.prune_(3)
    assert layer.rank == 3
    idx = torch.sort(torch.topk(s.abs(), 3).indices).values
    expected_w = reference.compose(U[:, idx], s[idx], V[:, idx]).reshape(8, 6, 3)
    _close(layer.weight, expected_w, 1e-12)
    x = torch.randn(2, 6, 20, dtype=F64)
    expected = F.conv1d(x, expected_w, conv.bias, padding=1)
    for mode in ("compose", "chain"):
        layer.mode = mode
        _close(layer(x), expected, 1e-10)
    _close(layer.to_dense()(x), expected, 1e-10)
    pair = layer.to_lowrank()
    assert [m.weight.shape for m in pair] == [(3, 6, 3), (8, 3, 1)]
    _close(pair(x), expected, 1e-10)


def test_svd_conv1d_rank_argument_truncates_and_new_layer_runs():
    layer = SVDConv1d(3, 8, 5, padding=2, rank=2, dtype=F64)
    assert layer.rank == 2 and layer.full_rank == 8
    x = torch.randn(2, 3, 11, dtype=F64)
    assert layer(x).shape == (2, 8, 11)
    conv = nn.Conv1d(3, 8, 5, padding=2, dtype=F64)
    truncated = SVDConv1d.from_dense(conv, rank=2)
    W = conv.weight.detach().reshape(8, 15)
    svals = torch.linalg.svdvals(W)
    # Eckart–Young: the rank-2 error is the norm of the dropped singular values
    err = torch.linalg.matrix_norm(truncated.weight.detach().reshape(8, 15) - W)
    assert torch.isclose(err, svals[2:].norm(), rtol=1e-10)


@pytest.mark.parametrize("mode", ["compose", "chain"])
def test_svd_conv1d_gradcheck(mode):
    layer = SVDConv1d(2, 3, 3, stride=2, padding=1, rank=2, mode=mode, dtype=F64)
    _gradcheck_module(layer, torch.randn(2, 2, 7, dtype=F64))


def test_svd_conv1d_state_dict_round_trip():
    layer = SVDConv1d(4, 6, 3, padding=1, dtype=F64)
    layer.prune_(2)
    state = layer.state_dict()
    assert set(state) == {"U", "s", "V", "bias"}
    fresh = SVDConv1d(4, 6, 3, padding=1, dtype=F64)
    svdkern.load_state_dict(fresh, state)
    assert fresh.rank == 2
    x = torch.randn(2, 4, 9, dtype=F64)
    _close(fresh(x), layer(x), 1e-12)
    with pytest.raises(RuntimeError, match="rank mismatch"):
        SVDConv1d(4, 6, 3, padding=1, dtype=F64).load_state_dict(state)


def test_svd_conv1d_repr():
    layer = SVDConv1d(4, 6, 3, stride=2, padding=1, bias=False, rank=3, mode="chain")
    assert repr(layer) == (
        "SVDConv1d(4, 6, kernel_size=(3,), stride=(2,), padding=(1,), bias=False, "
        "rank=3/6, mode=chain)"
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"groups": 2}, "groups=1", id="groups"),
        pytest.param({"padding_mode": "reflect"}, "padding_mode", id="padding_mode"),
        pytest.param({"kernel_size": (3, 3)}, "kernel_size must be an int or a 1-tuple", id="k2"),
        pytest.param({"padding": "full"}, "padding must be", id="padding"),
        pytest.param({"stride": 2, "padding": "same"}, "stride 1", id="same-stride"),
        pytest.param({"rank": 7}, r"rank must be an int in \[1, 6\]", id="rank"),
    ],
)
def test_svd_conv1d_argument_errors(kwargs, match):
    args = {"in_channels": 4, "out_channels": 6, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        SVDConv1d(**args)


def test_svd_conv1d_from_dense_rejects_other_modules():
    with pytest.raises(TypeError, match=r"nn\.Conv1d"):
        SVDConv1d.from_dense(nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match=r"nn\.Conv2d"):
        SVDConv2d.from_dense(nn.Conv1d(3, 4, 3))


# _macs follows svdkern.flops' convention; FlopCounterMode counts 2·MACs of the same convs
@pytest.mark.parametrize(
    "make, shape",
    [
        pytest.param(
            lambda c: SVDConv1d.from_dense(c, rank=2),
            (nn.Conv1d(5, 7, 3, stride=2, padding=1), (3, 5, 21)),
            id="conv1d",
        ),
        pytest.param(
            lambda c: SVDConv1d.from_dense(c, rank=2),
            (nn.Conv1d(5, 7, 4, padding="same"), (5, 16)),
            id="conv1d-same-unbatched",
        ),
        pytest.param(
            lambda c: SVDConv2d.from_dense(c, rank=2),
            (nn.Conv2d(3, 8, (3, 5), stride=(2, 1), padding=(1, 2)), (2, 3, 9, 10)),
            id="conv2d-channel",
        ),
        pytest.param(
            lambda c: SVDConv2d.from_dense(c, "spatial", rank=2),
            (nn.Conv2d(3, 8, (3, 5), stride=(2, 3), padding=(1, 2)), (2, 3, 9, 10)),
            id="conv2d-spatial",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_conv_macs_match_flop_counter(make, shape):
    conv, shape = shape
    layer = make(conv)
    x = torch.randn(shape)
    dense, chain = layer.macs(shape)
    assert 2 * dense == _flop_count(conv, x)
    assert 2 * chain == _flop_count(layer.to_lowrank(), x)
    assert 2 * layer.macs(shape, rank=1)[1] == chain


def test_conv1d_and_conv2d_geometries_differ():
    one = SVDConv1d(4, 4, 3)
    two = SVDConv2d(4, 4, (3, 1))
    assert one.geometry != two.geometry
    assert one.geometry == SVDConv1d(4, 4, 3, rank=2).geometry


# --- transformers' Conv1D ---------------------------------------------------------------


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D as GPT-2 uses it: y = x·W + b with W (nx, nf)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = (*x.size()[:-1], self.nf)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2Conv1D(Conv1D):
    """A subclass still counts as Conv1D."""


class Conv1DWithoutNf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3, 4))


Conv1DWithoutNf.__name__ = "Conv1D"


def test_is_conv1d_like_recognises_transformers_conv1d_only():
    assert is_conv1d_like(Conv1D(6, 4))
    assert is_conv1d_like(GPT2Conv1D(6, 4))
    assert not is_conv1d_like(Conv1DWithoutNf())
    assert not is_conv1d_like(nn.Conv1d(4, 6, 1))
    assert not is_conv1d_like(nn.Linear(4, 6))
    assert not is_conv1d_like(torch.zeros(4, 6))


@pytest.mark.parametrize("dtype, rtol", [(F64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode", ["compose", "chain"])
def test_svd_linear_from_conv1d_equals_it(dtype, rtol, mode):
    dense = Conv1D(nf=12, nx=7).to(dtype)
    layer = SVDLinear.from_dense(dense, mode=mode)
    assert (layer.in_features, layer.out_features) == (7, 12)
    assert layer.rank == 7
    x = torch.randn(2, 5, 7, dtype=dtype)
    expected = dense(x)
    _close(layer(x), expected, rtol)
    _close(layer.to_dense()(x), expected, rtol)
    _close(layer.to_lowrank()(x), expected, rtol)
    _close(layer.weight, dense.weight.detach().mT, rtol)


def test_svd_linear_from_conv1d_prunes_and_keeps_train_flag():
    dense = Conv1D(nf=9, nx=6).double().eval()
    layer = SVDLinear.from_dense(dense, rank=4)
    assert not layer.training and layer.rank == 4
    W = dense.weight.detach().mT
    err = torch.linalg.matrix_norm(layer.weight.detach() - W)
    assert torch.isclose(err, torch.linalg.svdvals(W)[4:].norm(), rtol=1e-10)
    layer.prune_(2)
    x = torch.randn(3, 6, dtype=F64)
    _close(layer(x), layer.to_dense()(x), 1e-12)


def test_svd_linear_from_dense_rejects_other_modules():
    with pytest.raises(TypeError, match=r"nn\.Linear or a transformers Conv1D"):
        SVDLinear.from_dense(nn.Conv1d(3, 4, 1))


# --- SVDMultiheadAttention --------------------------------------------------------------

E, H = 8, 2

MHA_CONFIGS = {
    "plain": {},
    "nobias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "bias_kv-zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
    "kdim5-vdim7": {"kdim": 5, "vdim": 7},
}

WEIGHTS = [
    pytest.param(True, True, id="weights-avg"),
    pytest.param(True, False, id="weights-per-head"),
    pytest.param(False, True, id="no-weights"),
]


def _pair(config: dict, batch_first: bool, in_proj: str, dtype=F64):
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, dtype=dtype, **config)
    if mha.bias_k is not None:
        with torch.no_grad():
            mha.bias_k.normal_()
            mha.bias_v.normal_()
    if mha.in_proj_bias is not None:
        with torch.no_grad():  # nn.MultiheadAttention starts with zero biases
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha, SVDMultiheadAttention.from_dense(mha, in_proj=in_proj)


def _seq(batch_first: bool, n: int, length: int, dim: int, dtype=F64) -> torch.Tensor:
    return torch.randn((n, length, dim) if batch_first else (length, n, dim), dtype=dtype)


def _compare(mha, layer, args, kwargs, rtol=1e-10):
    expected, expected_w = mha(*args, **kwargs)
    actual, actual_w = layer(*args, **kwargs)
    _close(actual, expected, rtol)
    if expected_w is None:
        assert actual_w is None
    else:
        _close(actual_w, expected_w, rtol)


@pytest.mark.parametrize("need_weights, average", WEIGHTS)
@pytest.mark.parametrize("in_proj", ["split", "fused"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("config", MHA_CONFIGS.values(), ids=MHA_CONFIGS.keys())
def test_svd_mha_equals_mha(config, batch_first, in_proj, need_weights, average):
    if in_proj == "fused" and "kdim" in config:
        with pytest.raises(ValueError, match="in_proj='fused' needs kdim = vdim = embed_dim"):
            _pair(config, batch_first, in_proj)
        return
    mha, layer = _pair(config, batch_first, in_proj)
    kw = {"need_weights": need_weights, "average_attn_weights": average}
    kdim, vdim = config.get("kdim", E), config.get("vdim", E)
    q = _seq(batch_first, 3, 5, E)
    k, v = _seq(batch_first, 3, 4, kdim), _seq(batch_first, 3, 4, vdim)
    calls = [(q, k, v)]
    if kdim == vdim == E:
        calls += [(q, q, q), (q, k, k)]  # self-attention; key is value
    for args in calls:
        _compare(mha, layer, args, kw)


MASKS = ["kpm-bool", "kpm-float", "attn-2d-bool", "attn-3d-float", "attn-2d-float+kpm-bool"]


def _masks(kind: str, n: int, length: int, src: int, dtype=F64) -> dict:
    kpm = torch.zeros(n, src, dtype=torch.bool)
    kpm[0, -1] = kpm[-1, :2] = True  # never a whole row: an all-masked row gives NaN
    kpm_float = torch.randn(n, src, dtype=dtype)
    attn_bool = torch.rand(length, src) < 0.3
    attn_bool[:, 2] = False
    attn_float = torch.randn(n * H, length, src, dtype=dtype)
    return {
        "kpm-bool": {"key_padding_mask": kpm},
        "kpm-float": {"key_padding_mask": kpm_float},
        "attn-2d-bool": {"attn_mask": attn_bool},
        "attn-3d-float": {"attn_mask": attn_float},
        "attn-2d-float+kpm-bool": {"attn_mask": attn_float[0], "key_padding_mask": kpm},
    }[kind]


@pytest.mark.parametrize("need_weights, average", WEIGHTS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("config", ["plain", "bias_kv-zero_attn"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask")
def test_svd_mha_masks_equal_mha(mask, config, batch_first, need_weights, average):
    mha, layer = _pair(MHA_CONFIGS[config], batch_first, "split")
    q, kv = _seq(batch_first, 3, 5, E), _seq(batch_first, 3, 6, E)
    kw = {"need_weights": need_weights, "average_attn_weights": average}
    _compare(mha, layer, (q, kv, kv), {**kw, **_masks(mask, 3, 5, 6)})


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no-weights"])
@pytest.mark.parametrize("padding", [False, True], ids=["no-kpm", "kpm"])
@pytest.mark.parametrize("config", ["plain", "bias_kv-zero_attn"])
def test_svd_mha_is_causal_equals_mha(config, padding, need_weights):
    mha, layer = _pair(MHA_CONFIGS[config], True, "fused")
    x = _seq(True, 2, 5, E)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True = not attended
    kw = {"attn_mask": causal, "is_causal": True, "need_weights": need_weights}
    if padding:
        kw["key_padding_mask"] = torch.tensor([[False] * 4 + [True], [False] * 5])
    _compare(mha, layer, (x, x, x), kw)


def test_svd_mha_is_causal_needs_attn_mask_like_mha():
    mha, layer = _pair({}, True, "split")
    x = _seq(True, 2, 5, E)
    for module in (mha, layer):
        with pytest.raises(RuntimeError, match="attn_mask"):
            module(x, x, x, is_causal=True, need_weights=False)


@pytest.mark.parametrize("need_weights, average", WEIGHTS)
@pytest.mark.parametrize("in_proj", ["split", "fused"])
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask")
def test_svd_mha_unbatched_inputs_equal_mha(in_proj, need_weights, average):
    mha, layer = _pair({"add_bias_kv": True}, True, in_proj)
    q, kv = torch.randn(5, E, dtype=F64), torch.randn(4, E, dtype=F64)
    kw = {"need_weights": need_weights, "average_attn_weights": average}
    _compare(mha, layer, (q, kv, kv), kw)
    kpm = torch.tensor([False, True, False, False])
    attn = torch.randn(H, 5, 4, dtype=F64)  # unbatched 3-D: (num_heads, L, S)
    _compare(mha, layer, (q, kv, kv), {**kw, "key_padding_mask": kpm, "attn_mask": attn})


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no-weights"])
@pytest.mark.parametrize("in_proj", ["split", "fused"])
def test_svd_mha_fp32_eval_equals_mha_fast_path(in_proj, need_weights):
    # In eval mode without gradients nn.MultiheadAttention takes its native fast path.
    mha, layer = _pair({}, True, in_proj, dtype=torch.float32)
    mha.eval()
    layer.eval()
    x = _seq(True, 4, 7, E, torch.float32)
    kpm = torch.zeros(4, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    with torch.no_grad():
        _compare(mha, layer, (x, x, x), {"need_weights": need_weights}, 1e-5)
        _compare(mha, layer, (x, x, x), {"need_weights": False, "key_padding_mask": kpm}, 1e-5)


def test_svd_mha_dropout_follows_the_training_flag():
    mha = nn.MultiheadAttention(E, H, dropout=0.5, batch_first=True, dtype=F64)
    layer = SVDMultiheadAttention.from_dense(mha)
    assert layer.training and layer.dropout == 0.5
    x = _seq(True, 2, 6, E)
    for need_weights in (True, False):
        a, w = layer(x, x, x, need_weights=need_weights)
        b, _ = layer(x, x, x, need_weights=need_weights)
        assert a.shape == (2, 6, E) and not torch.allclose(a, b)
        if need_weights:
            assert w.shape == (2, 6, 6)
    layer.eval()
    mha.eval()
    _compare(mha, layer, (x, x, x), {"need_weights": True})
    assert not SVDMultiheadAttention.from_dense(mha).training


@pytest.mark.parametrize(
    "config, in_proj",
    [
        pytest.param({}, "split", id="split"),
        pytest.param({"add_bias_kv": True}, "fused", id="fused-bias_kv"),
        pytest.param({"kdim": 5, "vdim": 7, "bias": False}, "split", id="kdim-vdim-nobias"),
    ],
)
def test_svd_mha_to_dense_equals_layer_and_original(config, in_proj):
    mha, layer = _pair(config, False, in_proj)
    dense = layer.to_dense()
    assert type(dense) is nn.MultiheadAttention
    for name, p in mha.named_parameters():
        _close(dict(dense.named_parameters())[name], p, 1e-12)
    q = _seq(False, 2, 5, E)
    k, v = _seq(False, 2, 3, config.get("kdim", E)), _seq(False, 2, 3, config.get("vdim", E))
    _compare(dense, layer, (q, k, v), {})


@pytest.mark.parametrize("in_proj", ["split", "fused"])
def test_svd_mha_children_prune_and_conversions_agree(in_proj):
    mha, layer = _pair({"add_bias_kv": True}, True, in_proj)
    names = [name for name, _ in svd_layers(layer)]
    expected_names = ["in_proj"] if in_proj == "fused" else ["q_proj", "k_proj", "v_proj"]
    assert names == [*expected_names, "out_proj"]
    for i, (_, child) in enumerate(svd_layers(layer)):
        child.prune_(3 + i)
    q, kv = _seq(True, 2, 5, E), _seq(True, 2, 4, E)
    for need_weights in (True, False):
        _compare(layer.to_dense(), layer, (q, kv, kv), {"need_weights": need_weights})
    # the pruned layer differs from the full-rank original
    assert not torch.allclose(layer(q, kv, kv)[0], mha(q, kv, kv)[0])
    # children are called as modules: plain Linear or low-rank pairs in their place
    expected = layer(q, kv, kv)
    for name, child in svd_layers(layer):
        setattr(layer, name, child.to_lowrank() if name != "out_proj" else child.to_dense())
    _compare(layer.to_dense(), layer, (q, kv, kv), {})
    _close(layer(q, kv, kv)[0], expected[0], 1e-10)


def test_svd_mha_children_modes_agree():
    mha, layer = _pair({}, False, "split")
    q = _seq(False, 3, 5, E)
    expected = mha(q, q, q, need_weights=False)[0]
    for mode in ("compose", "chain"):
        for _, child in svd_layers(layer):
            child.mode = mode
        _close(layer(q, q, q, need_weights=False)[0], expected, 1e-10)


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no-weights"])
@pytest.mark.parametrize(
    "config, in_proj",
    [
        pytest.param({"add_bias_kv": True}, "fused", id="fused-bias_kv"),
        pytest.param({"kdim": 3, "vdim": 5, "add_zero_attn": True}, "split", id="split-kdim"),
    ],
)
def test_svd_mha_gradcheck(config, in_proj, need_weights):
    layer = SVDMultiheadAttention(4, 2, batch_first=True, dtype=F64, in_proj=in_proj, **config)
    for _, child in svd_layers(layer):
        child.prune_(2)
        child.mode = "chain" if child is layer.out_proj else "compose"
    q = torch.randn(2, 3, 4, dtype=F64)
    k = torch.randn(2, 2, config.get("kdim", 4), dtype=F64)
    v = torch.randn(2, 2, config.get("vdim", 4), dtype=F64)
    mask = torch.tensor([[False, True], [False, False]])
    _gradcheck_module(layer, q, k, v, need_weights=need_weights, key_padding_mask=mask)


def test_svd_mha_state_dict_round_trip():
    layer = SVDMultiheadAttention(E, H, add_bias_kv=True, batch_first=True, dtype=F64)
    layer.k_proj.prune_(3)
    state = layer.state_dict()
    assert {"q_proj.U", "k_proj.s", "v_proj.V", "out_proj.bias", "bias_k", "bias_v"} <= set(state)
    fresh = SVDMultiheadAttention(E, H, add_bias_kv=True, batch_first=True, dtype=F64)
    svdkern.load_state_dict(fresh, state)
    assert fresh.k_proj.rank == 3
    x = _seq(True, 2, 4, E)
    _close(fresh(x, x, x)[0], layer(x, x, x)[0], 1e-12)


def test_svd_mha_new_layer_initialised_like_mha():
    layer = SVDMultiheadAttention(E, H, add_bias_kv=True, dtype=F64)
    bound = (6 / (E + 3 * E)) ** 0.5  # Xavier-uniform on the stacked (3E × E) weight
    W = layer.in_proj_weight
    assert W.shape == (3 * E, E) and W.abs().max() <= bound and W.abs().max() > bound / 2
    assert torch.equal(layer.in_proj_bias, torch.zeros(3 * E, dtype=F64))
    assert torch.equal(layer.out_proj.bias, torch.zeros(E, dtype=F64))
    assert layer.q_proj_weight is None and layer.bias_k.abs().sum() > 0
    other = SVDMultiheadAttention(E, H, kdim=3, vdim=5)
    assert other.in_proj_weight is None and other.k_proj_weight.shape == (E, 3)


def test_svd_mha_attributes_and_repr():
    mha = nn.MultiheadAttention(E, H, dropout=0.1, kdim=5, vdim=7, batch_first=True)
    layer = SVDMultiheadAttention.from_dense(mha)
    for name in ("embed_dim", "num_heads", "head_dim", "kdim", "vdim", "batch_first", "dropout"):
        assert getattr(layer, name) == getattr(mha, name), name
    assert layer._qkv_same_embed_dim is False and layer.add_zero_attn is False
    assert repr(layer).startswith(
        "SVDMultiheadAttention(\n  embed_dim=8, num_heads=2, kdim=5, vdim=7, in_proj=split, "
        "dropout=0.1, batch_first=True\n  (q_proj): SVDLinear(in_features=8, out_features=8, "
        "rank=8/8, bias=True)\n  (k_proj): SVDLinear(in_features=5"
    )


def test_svd_mha_in_transformer_encoder_layer_training_and_fast_path():
    block = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True)
    x = torch.randn(3, 5, E)
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 5])
    expected = block(x, src_key_padding_mask=kpm)
    block.self_attn = SVDMultiheadAttention.from_dense(block.self_attn, in_proj="fused")
    _close(block(x, src_key_padding_mask=kpm), expected, 1e-5)
    block.eval()
    with torch.no_grad():
        # the inference fast path reads in_proj_weight / in_proj_bias / out_proj.weight
        _close(block(x), block.train()(x).detach(), 1e-5)


def test_svd_mha_grouped_compose_equals_per_layer_compose():
    mha, layer = _pair({}, True, "split")
    x = _seq(True, 2, 4, E)
    layer(x, x, x)
    with grouped_compose(layer):
        out = layer(x, x, x)[0]
    _close(out, mha(x, x, x)[0], 1e-10)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param({"embed_dim": 9}, ValueError, "divisible by num_heads", id="heads"),
        pytest.param({"in_proj": "packed"}, ValueError, "in_proj must be one of", id="in_proj"),
        pytest.param({"kdim": 4, "in_proj": "fused"}, ValueError, "use in_proj='split'", id="fu"),
        pytest.param({"dropout": 1.5}, ValueError, "dropout must be", id="dropout"),
    ],
)
def test_svd_mha_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        SVDMultiheadAttention(**{"embed_dim": E, "num_heads": H, **kwargs})


@pytest.mark.parametrize(
    "change, match",
    [
        pytest.param(lambda q, k, v: (q[0, 0], k, v), "query must be", id="query-1d"),
        pytest.param(lambda q, k, v: (q, k[..., :3], v), "key must have 8 features", id="kdim"),
        pytest.param(lambda q, k, v: (q, k, v[:2]), "key and value must agree", id="kv-len"),
        pytest.param(lambda q, k, v: (q, k[:, :1], v[:, :1]), "same batch size", id="batch"),
    ],
)
def test_svd_mha_input_errors(change, match):
    layer = SVDMultiheadAttention(E, H)
    q, kv = torch.randn(5, 2, E), torch.randn(4, 2, E)
    with pytest.raises(ValueError, match=match):
        layer(*change(q, kv, kv))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        layer(q, kv, kv, attn_mask=torch.zeros(5, 5))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        layer(q, kv, kv, key_padding_mask=torch.zeros(4, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mha must be an nn\.MultiheadAttention"):
        SVDMultiheadAttention.from_dense(nn.Linear(E, E))


def test_new_layers_compile_fullgraph_equal_eager():
    layer = SVDMultiheadAttention(E, H, add_bias_kv=True, batch_first=True, in_proj="fused")
    conv = SVDConv1d(E, E, 3, padding=1, rank=4)
    x = torch.randn(2, 5, E)
    kpm = torch.tensor([[False] * 4 + [True], [False] * 5])

    def block(x):
        h = conv(x.transpose(1, 2)).transpose(1, 2)
        return layer(h, h, h, key_padding_mask=kpm, need_weights=False)[0]

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    _close(compiled(x), block(x), 1e-6)


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no-weights"])
@pytest.mark.parametrize("in_proj", ["split", "fused"])
def test_svd_mha_autocast_bf16_close_to_mha(in_proj, need_weights):
    mha, layer = _pair({"add_bias_kv": True}, True, in_proj, dtype=torch.float32)
    x = _seq(True, 2, 5, E, torch.float32)
    kw = {
        "need_weights": need_weights,
        "key_padding_mask": torch.tensor([[False] * 4 + [True], [False] * 5]),
        "attn_mask": torch.rand(5, 5) < 0.2,
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = mha(x, x, x, **kw)[0], layer(x, x, x, **kw)[0]
    assert actual.dtype == expected.dtype == torch.bfloat16
    _close(actual.float(), expected.float(), 3e-2)
