"""SVDLinear and SVDConv2d: exact full-rank equality with the dense layers, both forward
paths equal, pruning, conversions, state_dict behaviour and argument errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import svdkern
from svdkern import reference
from svdkern.nn import SVDConv2d, SVDLinear

DTYPE_TOL = [
    pytest.param(torch.float64, 1e-10, id="fp64"),
    pytest.param(torch.float32, 1e-5, id="fp32"),
]

# (kernel_size, stride, padding, dilation)
CONV_CASES = [
    pytest.param((3, 3), 1, 1, 1, id="k3-s1-p1"),
    pytest.param((3, 3), 2, 1, 1, id="k3-s2-p1"),
    pytest.param((1, 1), 2, 0, 1, id="k1-s2"),
    pytest.param((3, 5), (2, 1), (1, 2), (1, 2), id="k3x5-s2x1-p1x2-d1x2"),
    pytest.param((5, 2), (1, 3), (0, 1), (2, 1), id="k5x2-s1x3-p0x1-d2x1"),
    pytest.param((3, 3), 1, "same", 2, id="k3-same-d2"),
    pytest.param((3, 5), 1, "same", 1, id="k3x5-same"),
    pytest.param((3, 3), 1, "valid", 1, id="k3-valid"),
    pytest.param(
        (4, 3),
        1,
        "same",
        1,
        id="k4x3-same-asym",
        marks=pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"),
    ),
]


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    scale = expected.abs().max().clamp_min(1e-30)
    assert (actual - expected).abs().max() / scale <= rtol


@pytest.mark.parametrize("mode", ["compose", "chain", "auto"])
@pytest.mark.parametrize("dtype, rtol", DTYPE_TOL)
@pytest.mark.parametrize(
    "n_in, n_out, bias",
    [pytest.param(29, 37, True, id="29to37"), pytest.param(40, 6, False, id="40to6-nobias")],
)
def test_svd_linear_full_rank_equals_dense(n_in, n_out, bias, dtype, rtol, mode):
    dense = nn.Linear(n_in, n_out, bias=bias, dtype=dtype)
    layer = SVDLinear.from_dense(dense, mode=mode)
    assert layer.rank == min(n_in, n_out) == layer.full_rank
    assert layer.U.dtype == dtype
    x = torch.randn(3, 5, n_in, dtype=dtype)
    _close(layer(x), dense(x), rtol)


@pytest.mark.parametrize("mode", ["compose", "chain"])
@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
@pytest.mark.parametrize("kernel, stride, padding, dilation", CONV_CASES)
def test_svd_conv_full_rank_equals_dense(kernel, stride, padding, dilation, decomposition, mode):
    conv = nn.Conv2d(5, 7, kernel, stride, padding, dilation, dtype=torch.float64)
    if decomposition == "spatial" and padding == "same" and kernel == (4, 3):
        with pytest.raises(ValueError, match="padding='same'"):
            SVDConv2d.from_dense(conv, decomposition=decomposition)
        return
    layer = SVDConv2d.from_dense(conv, decomposition=decomposition, mode=mode)
    x = torch.randn(2, 5, 11, 9, dtype=torch.float64)
    expected = conv(x)
    _close(layer(x), expected, 1e-10)
    _close(layer.to_dense()(x), expected, 1e-10)
    _close(layer.to_lowrank()(x), expected, 1e-10)


@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
def test_svd_conv_fp32_full_rank_equals_dense(decomposition):
    conv = nn.Conv2d(6, 10, (3, 2), stride=(1, 2), padding=(1, 0), bias=False)
    layer = SVDConv2d.from_dense(conv, decomposition=decomposition)
    x = torch.randn(2, 6, 12, 12)
    for mode in ("compose", "chain"):
        layer.mode = mode
        _close(layer(x), conv(x), 1e-5)


def test_svd_conv_unbatched_input():
    conv = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
    layer = SVDConv2d.from_dense(conv, decomposition="spatial", mode="chain")
    x = torch.randn(3, 6, 6, dtype=torch.float64)
    _close(layer(x), conv(x), 1e-10)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: SVDLinear(13, 9, rank=4, dtype=torch.float64), id="linear"),
        pytest.param(
            lambda: SVDConv2d(3, 8, (3, 5), stride=2, padding=(1, 2), rank=5, dtype=torch.float64),
            id="conv-channel",
        ),
        pytest.param(
            lambda: SVDConv2d(
                3, 8, 3, padding="same", rank=5, decomposition="spatial", dtype=torch.float64
            ),
            id="conv-spatial",
        ),
    ],
)
def test_compose_and_chain_paths_equal_with_gradients(make):
    layer = make()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    if isinstance(layer, SVDLinear):
        x = torch.randn(4, 13, dtype=torch.float64)
    results = []
    for mode in ("compose", "chain"):
        layer.mode = mode
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(torch.ones_like(y))
        results.append((y, xi.grad, *(p.grad.clone() for p in layer.parameters())))
    for a, b in zip(*results, strict=True):
        _close(a, b, 1e-10)


def test_auto_mode_follows_the_cost_model():
    layer = SVDLinear(256, 256, rank=4)
    x_many = torch.randn(64, 256)
    # chain: 64·4·512 MACs ≪ compose: 256·256·4 + 64·256·256
    assert layer._use_chain(x_many.shape)
    full = SVDLinear(64, 64)
    # full rank on many rows: chain 64·128 per row > compose 64·64 per row (+ 64³ once)
    assert not full._use_chain((100_000, 64))
    assert full._use_chain((1, 64))
    conv = SVDConv2d(8, 8, 3, padding=1)
    dense, chain = conv.macs((1, 8, 10, 10))
    assert dense == 100 * 8 * 72 and chain == 100 * 8 * (72 + 8)
    assert conv._use_chain((1, 8, 10, 10)) == (chain <= 8 * 72 * 8 + dense)


def test_from_dense_truncated_rank_keeps_largest_singular_values():
    dense = nn.Linear(20, 12, dtype=torch.float64)
    layer = SVDLinear.from_dense(dense, rank=5)
    s_full = torch.linalg.svdvals(dense.weight)
    torch.testing.assert_close(layer.s, s_full[:5])
    best = reference.compose(layer.U, layer.s, layer.V)
    err = torch.linalg.matrix_norm(dense.weight - best, ord=2)
    torch.testing.assert_close(err, s_full[5])


def test_new_layer_is_initialised_like_dense_and_factors_are_orthonormal():
    layer = SVDConv2d(4, 6, 3, rank=3, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(layer.U.T @ layer.U, eye)
    torch.testing.assert_close(layer.V.T @ layer.V, eye)
    assert (layer.s[:-1] >= layer.s[1:]).all() and (layer.s > 0).all()
    assert layer.bias.abs().max() <= 1 / 6


def test_prune_int_keeps_largest_abs_singular_values_in_order():
    layer = SVDLinear(6, 6, rank=6, dtype=torch.float64)
    with torch.no_grad():
        layer.s.copy_(torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 1.0]))
    U, V = layer.U.detach().clone(), layer.V.detach().clone()
    layer.prune_(3)
    torch.testing.assert_close(
        layer.s.detach(), torch.tensor([-3.0, 2.0, 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(layer.U.detach(), U[:, [1, 3, 5]])
    torch.testing.assert_close(layer.V.detach(), V[:, [1, 3, 5]])
    assert layer.rank == 3 and isinstance(layer.s, nn.Parameter)


@pytest.mark.parametrize(
    "keep",
    [
        pytest.param(torch.tensor([0, 2]), id="index"),
        pytest.param(torch.tensor([True, False, True, False]), id="mask"),
    ],
)
def test_prune_with_index_or_mask(keep):
    layer = SVDConv2d(2, 4, 3, rank=4, decomposition="channel", dtype=torch.float64)
    s = layer.s.detach().clone()
    layer.prune_(keep)
    torch.testing.assert_close(layer.s.detach(), s[[0, 2]])
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    _close(layer(x), layer.to_lowrank()(x), 1e-10)


@pytest.mark.parametrize(
    "keep, match",
    [
        pytest.param(0, "keep", id="zero"),
        pytest.param(5, "keep", id="too-many"),
        pytest.param(torch.tensor([0, 7]), "keep indices", id="out-of-range"),
        pytest.param(torch.tensor([1, 1]), "distinct", id="duplicate"),
        pytest.param(torch.tensor([True, False]), "bool mask", id="mask-shape"),
        pytest.param(torch.zeros(4, dtype=torch.bool), "at least one", id="empty-mask"),
    ],
)
def test_prune_rejects_bad_keep(keep, match):
    layer = SVDLinear(4, 4)
    with pytest.raises(ValueError, match=match):
        layer.prune_(keep)


def test_to_lowrank_linear_structure_and_equality():
    layer = SVDLinear(10, 7, rank=3, dtype=torch.float64)
    pair = layer.to_lowrank()
    assert isinstance(pair, nn.Sequential) and len(pair) == 2
    assert pair[0].weight.shape == (3, 10) and pair[0].bias is None
    assert pair[1].weight.shape == (7, 3) and pair[1].bias is not None
    x = torch.randn(5, 10, dtype=torch.float64)
    _close(pair(x), layer(x), 1e-10)
    _close(layer.to_dense()(x), layer(x), 1e-10)


def test_state_dict_keys_and_repr():
    layer = SVDConv2d(3, 8, 3, stride=2, padding=1, rank=4, decomposition="spatial")
    assert list(layer.state_dict()) == ["U", "s", "V", "bias"]
    assert layer.U.shape == (9, 4) and layer.V.shape == (24, 4)
    text = repr(layer)
    assert "decomposition=spatial" in text and "rank=4/9" in text and "stride=(2, 2)" in text
    lin = SVDLinear(5, 3, bias=False, rank=2, mode="chain")
    assert list(lin.state_dict()) == ["U", "s", "V"]
    assert "rank=2/3" in repr(lin) and "mode=chain" in repr(lin)


def test_plain_load_state_dict_of_other_rank_points_to_svdkern_load_state_dict():
    model = nn.Sequential(SVDLinear(8, 6))
    pruned = nn.Sequential(SVDLinear(8, 6))
    pruned[0].prune_(2)
    with pytest.raises(RuntimeError, match=r"rank mismatch for 0.*svdkern\.load_state_dict"):
        model.load_state_dict(pruned.state_dict())


def test_weight_property_is_the_dense_weight():
    conv = nn.Conv2d(3, 4, (2, 3), dtype=torch.float64)
    layer = SVDConv2d.from_dense(conv, decomposition="spatial")
    torch.testing.assert_close(layer.weight, conv.weight)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"groups": 2}, "groups", id="groups"),
        pytest.param({"padding_mode": "reflect"}, "padding_mode", id="padding_mode"),
        pytest.param({"decomposition": "tucker"}, "decomposition", id="decomposition"),
        pytest.param({"rank": 0}, "rank", id="rank-zero"),
        pytest.param({"rank": 100}, "rank", id="rank-too-big"),
        pytest.param({"mode": "fast"}, "mode", id="mode"),
        pytest.param({"padding": "full"}, "padding", id="padding-string"),
        pytest.param({"padding": "same", "stride": 2}, "stride", id="same-stride"),
    ],
)
def test_svd_conv_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SVDConv2d(4, 4, 3, **kwargs)


def test_from_dense_rejects_grouped_conv():
    with pytest.raises(ValueError, match="groups"):
        SVDConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=4))


def test_top_level_exports():
    assert svdkern.SVDLinear is SVDLinear and svdkern.SVDConv2d is SVDConv2d


def test_svd_linear_compiles_with_aot_eager():
    layer = SVDLinear(16, 12, rank=5)
    x = torch.randn(3, 16)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
