"""svdkern.flops: MACs of dense, SVD and compressed models, cross-checked against
torch.utils.flop_counter.FlopCounterMode (FLOPs = 2·MACs)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import svdkern
from svdkern.nn import SVDLinear


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 24, (3, 5), stride=2, padding=(1, 2), dilation=(1, 2)),
        nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding="same", groups=2),
        nn.Conv2d(24, 32, 1, stride=(2, 1)),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 40),
        nn.ReLU(),
        nn.Linear(40, 10),
    )


INPUT = (2, 3, 20, 18)


def _counted_macs(model: nn.Module, shape=INPUT) -> int:
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(shape))
    return counter.get_total_flops() // 2


def test_flops_of_dense_model_matches_flop_counter():
    model = _cnn()
    report = svdkern.flops(model, INPUT)
    assert report.dense_macs == report.svd_macs == report.compressed_macs == _counted_macs(model)
    params = sum(p.numel() for p in model.parameters())
    assert report.dense_params == report.svd_params == report.compressed_params == params


@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
def test_flops_of_pruned_svd_model_matches_compressed_and_dense_counts(decomposition):
    dense = _cnn()
    with pytest.warns(UserWarning, match="groups"):
        model = svdkern.decompose(copy.deepcopy(dense), decomposition)
    svdkern.prune(model, energy=0.4)
    report = svdkern.flops(model, INPUT)
    assert report.dense_macs == _counted_macs(dense)
    plain = svdkern.compress(model, input_shape=INPUT)
    assert report.compressed_macs == _counted_macs(plain)
    lowrank = svdkern.compress(model, policy="lowrank")
    assert report.svd_macs == _counted_macs(lowrank)
    assert report.compressed_params == sum(p.numel() for p in plain.parameters())
    assert report.dense_params == sum(p.numel() for p in dense.parameters())
    assert report.svd_params == sum(p.numel() for p in model.parameters())
    assert report.compressed_macs <= min(report.dense_macs, report.svd_macs)
    assert report.ratio == report.compressed_macs / report.dense_macs
    # counting the compressed model itself gives its own MACs as dense
    assert svdkern.flops(plain, INPUT).dense_macs == report.compressed_macs


def test_flops_per_layer_report():
    model = svdkern.decompose(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    )
    model[0].prune_(2)
    report = svdkern.flops(model, (1, 3, 6, 6))
    conv, fc = report.layers
    assert conv.name == "0" and conv.kind == "SVDConv2d/channel" and conv.shape == (8, 3, 3, 3)
    assert conv.rank == 2 and conv.full_rank == 8 and conv.calls == 1
    assert conv.dense_macs == 16 * 8 * 27 and conv.svd_macs == 16 * 2 * (27 + 8)
    assert conv.compressed_form == "lowrank" and conv.compressed_macs == conv.svd_macs
    assert fc.rank == 5 and fc.compressed_form == "dense" and fc.dense_macs == 128 * 5
    assert "total" in str(report) and "SVDConv2d/channel" in str(report)
    data = report.to_dict()
    assert data["layers"][0]["name"] == "0" and data["ratio"] == report.ratio


def test_flops_counts_every_call_of_a_shared_layer():
    shared = SVDLinear(6, 6, rank=2)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = svdkern.flops(model, (4, 6))
    assert report.layers[0].calls == 2 and report.svd_macs == 2 * 4 * 2 * 12


def test_flops_restores_training_mode_and_running_stats():
    model = _cnn().train()
    stats = model[1].running_mean.clone()
    svdkern.flops(model, INPUT)
    assert model.training and model[1].training
    torch.testing.assert_close(model[1].running_mean, stats)


def test_flops_exposed_at_top_level():
    assert callable(svdkern.flops) and svdkern.FlopsReport.__name__ == "FlopsReport"
