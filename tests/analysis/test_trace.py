"""svdkern.trace: the input shapes the counted layers see in the example forward, where its
MACs go (cross-checked against torch.utils.flop_counter.FlopCounterMode), and the former
keyword forms of `svdkern.layers`."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import svdkern
from svdkern import layers, trace
from svdkern.examples import Example

B, LQ, LK, E, KDIM, VDIM, HEADS = 2, 3, 7, 8, 5, 6, 2


class _CrossAttention(nn.Module):
    """Queries from one sequence attend to keys and values of another (lengths LQ ≠ LK,
    kdim and vdim ≠ embed_dim), as in a decoder attending to an encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(E, HEADS, kdim=KDIM, vdim=VDIM, batch_first=True)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        return self.mha(query, key, value, need_weights=False)[0]


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(B, LQ, E), torch.randn(B, LK, KDIM), torch.randn(B, LK, VDIM)


def _flop_counter_macs(model: nn.Module, args: tuple) -> int:
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        mapping = trace.FLOP_FORMULAS
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model.eval()(*args)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("svd", [False, True], ids=["dense", "svd"])
def test_cross_attention_out_projection_counts_the_query_rows(svd):
    model = _CrossAttention()
    if svd:
        model = svdkern.decompose(model)
    args = _inputs()
    report = svdkern.flops(model, example_inputs=args)
    layers = {lay.name: lay for lay in report.layers}
    # The out-projection maps the attention output, one row per query, not per key.
    assert layers["mha.out_proj"].dense_macs == B * LQ * E * E
    assert trace.layer_inputs(model, Example(example_inputs=args))["mha.out_proj"] == [(B, LQ, E)]
    in_proj = B * LQ * E * E + B * LK * KDIM * E + B * LK * VDIM * E
    if svd:
        projections = ("mha.q_proj", "mha.k_proj", "mha.v_proj")
        assert sum(layers[name].dense_macs for name in projections) == in_proj
    else:
        assert layers["mha"].dense_macs == in_proj
    assert report.dense_macs == in_proj + B * LQ * E * E
    # QKᵀ and AV: LQ × LK scores per head.
    assert report.attention_macs == 2 * B * LQ * LK * E
    assert report.total_macs == report.svd_macs + report.uncounted_macs
    # FlopCounterMode agrees: on the model, and on its dense and its low-rank deployment.
    if svd:
        measured = {
            "svd": _flop_counter_macs(svdkern.compress(model, "lowrank"), args),
            "dense": _flop_counter_macs(svdkern.compress(model, "dense"), args),
        }
    else:
        measured = dict.fromkeys(("svd", "dense"), _flop_counter_macs(model, args))
    assert measured["svd"] == report.svd_macs + report.uncounted_macs
    assert measured["dense"] == report.dense_macs + report.uncounted_macs


def test_pruned_cross_attention_counts_its_chains_as_flop_counter_does():
    model = svdkern.decompose(_CrossAttention())
    svdkern.prune(model, ranks={"mha.*": 2})
    args = _inputs()
    report = svdkern.flops(model, example_inputs=args)
    assert report.total_macs == _flop_counter_macs(model, args)
    deployed = svdkern.compress(model, example_inputs=args)
    assert _flop_counter_macs(deployed, args) == report.compressed_macs + report.uncounted_macs


def test_without_an_example_linear_layers_count_one_row_and_convs_none():
    model = nn.Sequential(nn.Linear(4, 6), nn.Conv2d(3, 2, 1), svdkern.SVDLinear(6, 2))
    assert trace.one_row_inputs(model) == {"0": [(1, 4)], "1": None, "2": [(1, 6)]}
    with pytest.raises(trace.UncountedError, match=r"input_shape or example_inputs.*'1'"):
        trace.layer_inputs(model)


def test_layers_keeps_its_keyword_forms():
    model = _CrossAttention()
    args = _inputs()
    example = Example(example_inputs=args)
    assert layers.layer_inputs(model, example_inputs=args) == trace.layer_inputs(model, example)
    old = layers.trace_macs(model, example_inputs=args)
    assert old == trace.trace_macs(model, example)
    assert layers.weight_reads(model, args, {}) == trace.weight_reads(model, example) == {}
    dense = nn.Sequential(nn.Linear(4, 3))
    assert layers.layer_inputs(dense) == {"0": [(1, 4)]}
    assert layers.trace_macs(dense, (2, 4)).layers == {"0": 2 * 4 * 3}
    assert layers.COUNTED is trace.COUNTED and layers.format_table is not None


def test_trace_takes_an_example_only():
    with pytest.raises(TypeError, match=r"example must be a svdkern\.Example"):
        trace.trace_macs(nn.Linear(2, 2), (1, 2))
    with pytest.raises(ValueError, match="input_shape: trace_macs runs one"):
        trace.trace_macs(nn.Linear(2, 2), Example([(1, 2), (3, 2)]))
