"""svdkern.prune: the energy rule exactly, target_flops by bisection within 2%, multiple_of,
the report, and argument errors."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import svdkern
from svdkern.nn import SVDConv2d, SVDLinear


def _expected_rank(s: torch.Tensor, eps: float) -> int:
    e = sorted((float(v) ** 2 for v in s), reverse=True)
    total = sum(e)
    acc = 0.0
    for k, v in enumerate(e, start=1):
        acc += v
        if acc >= (1 - eps) * total:
            return k
    return len(e)


def _layer_with(s_values) -> SVDLinear:
    layer = SVDLinear(len(s_values), len(s_values), dtype=torch.float64)
    with torch.no_grad():
        layer.s.copy_(torch.tensor(s_values, dtype=torch.float64))
    return layer


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.05, 0.3, 0.9, 0.999])
def test_energy_pruning_keeps_exactly_the_rule_k(eps):
    s = [3.0, -0.01, 1.5, 0.2, -2.0, 0.0, 0.7, 0.05]
    model = nn.Sequential(_layer_with(s), nn.ReLU(), _layer_with([1.0, 1.0, 1.0, 1.0]))
    svdkern.prune(model, energy=eps)
    k = _expected_rank(torch.tensor(s), eps)
    assert model[0].rank == k
    kept = sorted((abs(v) for v in model[0].s.tolist()), reverse=True)
    assert kept == sorted((abs(v) for v in s), reverse=True)[:k]
    assert model[2].rank == _expected_rank(torch.ones(4), eps)


def test_energy_boundary_is_inclusive():
    # s² = 9, 4, 1 (total 14): keeping 2 keeps exactly 13/14, so ε = 1/14 keeps k = 2
    layer = _layer_with([1.0, 3.0, 2.0])
    svdkern.prune(nn.Sequential(layer), energy=1 / 14)
    assert layer.rank == 2 and sorted(layer.s.tolist()) == [2.0, 3.0]


def test_all_zero_singular_values_keep_rank_one():
    layer = _layer_with([0.0, 0.0, 0.0])
    report = svdkern.prune(nn.Sequential(layer), energy=0.1)
    assert layer.rank == 1 and report.layers[0].energy_kept == 1.0


def test_multiple_of_rounds_up_and_caps_at_rank():
    model = nn.Sequential(SVDLinear(40, 40), SVDLinear(40, 6))
    with torch.no_grad():
        model[0].s.copy_(torch.logspace(0, -8, 40))
    svdkern.prune(model, energy=1e-3, multiple_of=8)
    assert model[0].rank == 8  # the rule gives 2, rounded up
    assert model[1].rank == 6  # rounded up to 8, capped at the layer's rank


def test_report_table_and_dict():
    model = nn.Sequential(SVDConv2d(3, 8, 3), nn.Flatten(), SVDLinear(8 * 16, 4))
    report = svdkern.prune(model, energy=0.2, input_shape=(1, 3, 6, 6))
    rows = {lay.name: lay for lay in report.layers}
    assert set(rows) == {"0", "2"}
    conv = rows["0"]
    assert conv.shape == (8, 3, 3, 3) and conv.rank_before == 8 and conv.rank_after == model[0].rank
    assert 0.8 <= conv.energy_kept <= 1.0
    assert conv.macs_before == 16 * 8 * 27 and conv.macs_after <= conv.macs_before
    text = str(report)
    assert "energy kept" in text and "8 → " in text and "total" in text
    data = report.to_dict()
    assert data["energy"] == 0.2 and data["layers"][1]["name"] == "2"
    assert data["flops_ratio"] == report.macs_after / report.dense_macs


def test_report_without_input_shape_has_no_conv_macs():
    model = nn.Sequential(SVDConv2d(3, 8, 3), nn.Flatten(), SVDLinear(8 * 16, 4))
    report = svdkern.prune(model, energy=0.2)
    assert report.layers[0].macs_before is None and report.macs_after is None
    assert "-" in str(report)


@functools.cache
def _wide_template() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for c_in, c_out in [(3, 32), (32, 48), (48, 48), (48, 64)]:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
    return svdkern.decompose(
        nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 8 * 8, 10)), "channel"
    )


def _wide_model() -> nn.Module:
    return copy.deepcopy(_wide_template())


@pytest.mark.parametrize("target", [0.2, 0.35, 0.5, 0.8])
def test_target_flops_lands_within_two_percent(target):
    model = _wide_model()
    shape = (1, 3, 8, 8)
    report = svdkern.prune(model, target_flops=target, input_shape=shape)
    achieved = svdkern.flops(model, shape).ratio
    assert achieved == pytest.approx(report.flops_ratio)
    assert target - 0.02 <= achieved <= target
    assert report.target_flops == target and 0 < report.energy < 1


def test_target_flops_with_multiple_of_meets_the_target():
    model = _wide_model()
    report = svdkern.prune(model, target_flops=0.4, input_shape=(1, 3, 8, 8), multiple_of=8)
    assert report.flops_ratio <= 0.4
    assert all(
        lay.rank_after % 8 == 0 or lay.rank_after == lay.rank_before for lay in report.layers
    )


def test_target_flops_of_one_prunes_only_what_costs_nothing():
    model = _wide_model()
    report = svdkern.prune(model, target_flops=1.0, input_shape=(1, 3, 8, 8))
    assert report.energy == 0.0


def test_unreachable_target_is_an_error():
    model = nn.Sequential(nn.Linear(50, 50), SVDLinear(50, 50))
    with pytest.raises(ValueError, match=r"target_flops=0\.1 cannot be reached"):
        svdkern.prune(model, target_flops=0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"energy": 1.0}, "energy", id="energy-1"),
        pytest.param({"energy": -0.1}, "energy", id="energy-negative"),
        pytest.param({"target_flops": 0.0}, "target_flops", id="target-0"),
        pytest.param({"target_flops": 1.5}, "target_flops", id="target-1.5"),
        pytest.param({}, "exactly one", id="neither"),
        pytest.param({"energy": 0.1, "target_flops": 0.5}, "exactly one", id="both"),
        pytest.param({"energy": 0.1, "multiple_of": 0}, "multiple_of", id="multiple-of"),
    ],
)
def test_prune_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        svdkern.prune(nn.Sequential(SVDLinear(4, 4)), **kwargs)


def test_target_flops_on_convs_needs_input_shape():
    with pytest.raises(ValueError, match="input_shape"):
        svdkern.prune(nn.Sequential(SVDConv2d(3, 4, 3)), target_flops=0.5)


def test_prune_is_exposed_at_top_level():
    assert callable(svdkern.prune) and svdkern.PruneReport.__name__ == "PruneReport"


def test_multiple_of_rounds_a_rule_rank_above_the_multiple_up():
    # s² = 1, 1, ..., 1 (10 ones) then tiny values: the rule keeps 10; multiple_of=8 gives 16,
    # not 8 (rounding down would drop energy the rule asked to keep).
    s = [1.0] * 10 + [1e-6] * 14
    layer = _layer_with(s)
    svdkern.prune(nn.Sequential(layer), energy=1e-3, multiple_of=8)
    assert _expected_rank(torch.tensor(s), 1e-3) == 10
    assert layer.rank == 16
