"""svdkern.costs: the one cost model. Its rule (the compressed form of a layer is the cheaper
of dense and chain, dense if its weight is read) decides what `flops` reports, what `prune`
aims at, what `compress(policy="flops")` builds and what training's cuts count; per output
element without input shapes (a spatial conv's first factor at stride·W_out)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import svdkern
from svdkern import layers
from svdkern.costs import CostModel, LayerCost
from svdkern.examples import Example
from svdkern.flops import macs_at
from svdkern.nn import SVDConv2d, SVDLinear
from svdkern.trace import UncountedError, layer_inputs

# A spatial SVDConv2d of 8 → 8 channels, 3×3: W viewed as (c_in·kh) × (c_out·kw) = 24 × 24.
# Its chain costs r·(m·W_in/W_out + n) per output position against m·n dense: at stride 2
# the pair is cheaper below rank 576 / (2·24 + 24) = 8, and would be below 576 / 48 = 12 if
# the first factor ran at W_out.
M = N = 24
BETWEEN, BELOW = 10, 6


def _spatial(rank: int) -> SVDConv2d:
    conv = nn.Conv2d(8, 8, 3, stride=2, padding=1)
    layer = SVDConv2d.from_dense(conv, decomposition="spatial")
    layer.prune_(rank)
    return layer


@pytest.mark.parametrize(
    "rank, form", [(BETWEEN, nn.Conv2d), (BELOW, nn.Sequential)], ids=["between", "below"]
)
def test_stride_2_spatial_conv_without_input_shape_counts_the_first_factor_at_stride_w_out(
    rank, form
):
    layer = _spatial(rank)
    assert layer.matrix_shape == (M, N) and M * N / (2 * M + N) < BETWEEN < M * N / (M + N)
    plain = svdkern.compress(nn.Sequential(layer), policy="flops")
    assert type(plain[0]) is form
    # The measured MACs at a real input agree with the per-element rule.
    dense, chain = layer.macs((1, 8, 32, 32))
    assert (chain < dense) == (form is nn.Sequential)
    with_shape = svdkern.compress(nn.Sequential(layer), input_shape=(1, 8, 32, 32))
    assert type(with_shape[0]) is form
    assert LayerCost("0", layer, None).lowrank() == (form is nn.Sequential)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(F.relu(self.conv(x)).flatten(1))))


SHAPE = (2, 3, 6, 6)


def test_flops_prune_compress_and_training_count_with_one_rule():
    model = svdkern.decompose(_Net())
    svdkern.prune(model, ranks={"conv": 2, "fc1": 30, "fc2": 1})
    example = Example(SHAPE)
    costs = CostModel.from_model(model, example)
    forms = {name: cost.lowrank() for name, cost in costs.layers.items()}
    assert forms == {"conv": True, "fc1": False, "fc2": True}
    report = svdkern.flops(model, SHAPE)
    assert {lay.name: lay.compressed_form == "lowrank" for lay in report.layers} == forms
    assert (report.dense_macs, report.compressed_macs) == (costs.dense(), costs.compressed())
    assert report.svd_macs == costs.svd()
    pruned = svdkern.prune(model, ranks={"fc1": 30}, input_shape=SHAPE, dry_run=True)
    assert (pruned.dense_macs, pruned.macs_after) == (costs.dense(), costs.compressed())
    assert [lay.macs_after for lay in pruned.layers] == [
        costs.layers[name].compressed() for name in ("conv", "fc1", "fc2")
    ]
    deployed = svdkern.compress(model, input_shape=SHAPE)
    plain = {name: isinstance(getattr(deployed, name), nn.Sequential) for name in forms}
    assert plain == forms
    assert macs_at(model, layer_inputs(model, example)) == (costs.compressed(), costs.dense())
    # At other ranks, without cutting: fc1 at rank 4 is cheaper as a chain.
    assert costs.layers["fc1"].lowrank(4) and costs.compressed({"fc1": 4}) < costs.compressed()


class _ReadsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.linear(x, self.qkv.weight, self.qkv.bias))


def test_a_layer_decompose_found_read_is_dense_in_every_count_without_an_example():
    with pytest.warns(svdkern.DecomposeWarning, match="qkv"):
        model = svdkern.decompose(_ReadsWeight(), example_inputs=torch.randn(3, 16))
    model.qkv.prune_(1)
    assert model.qkv.weight_read is not None
    report = svdkern.flops(model)
    qkv = next(lay for lay in report.layers if lay.name == "qkv")
    assert qkv.weight_read and qkv.compressed_form == "dense" and qkv.compressed_macs == 16 * 16
    assert svdkern.prune(model, energy=0.0, dry_run=True).macs_after == report.compressed_macs
    assert type(svdkern.compress(model).qkv) is nn.Linear
    # The mark is the layer's: without it, the rule counts the rank-1 chain.
    model.qkv.weight_read = None
    assert svdkern.flops(model).layers[0].compressed_form == "lowrank"


def test_convs_without_an_example_are_not_counted_but_have_forms():
    model = nn.Sequential(SVDConv2d(3, 8, 3), nn.Flatten(), SVDLinear(8, 2))
    costs = CostModel.from_model(model)
    assert costs.uncounted == ["0"] and costs.layers["2"].calls == ((1, 8),)
    with pytest.raises(UncountedError, match="'0'"):
        costs.dense()
    with pytest.raises(ValueError, match="input_shape"):
        svdkern.flops(model)
    assert costs.layers["0"].lowrank() is (costs.layers["0"].module.rank * (27 + 8) < 27 * 8)
    assert svdkern.prune(model, energy=0.1, dry_run=True).macs_after is None


def test_deprecated_layers_cost_functions_warn_and_follow_the_cost_model():
    layer = _spatial(BETWEEN)
    shapes = [(1, 8, 32, 32), (2, 8, 16, 16)]
    cost = LayerCost("", layer, tuple(shapes))
    with pytest.warns(DeprecationWarning, match=r"svd_costs.*LayerCost"):
        svd_costs = layers.svd_costs
    assert svd_costs(layer, shapes) == (cost.dense(), cost.svd())
    assert svd_costs(layer, shapes, rank=1)[1] * BETWEEN == cost.svd()
    with pytest.warns(DeprecationWarning, match="lowrank_is_cheaper"):
        lowrank_is_cheaper = layers.lowrank_is_cheaper
    assert lowrank_is_cheaper(layer, shapes) is cost.lowrank() is False
    assert lowrank_is_cheaper(layer, None) is LayerCost("", layer, None).lowrank()
    with pytest.raises(AttributeError, match="no_such_name"):
        layers.no_such_name  # noqa: B018
