"""The analysis helpers under their former address. They live in modules named for what they
hold: example inputs in `svdkern.examples`, the traced forward (counted layers, input
shapes, weight reads, where the MACs go) in `svdkern.trace`, the cost model in
`svdkern.costs`, report tables in `svdkern.tables`, compiled-model names in
`svdkern.compiled`. This module re-exports them; `layer_inputs`, `trace_macs` and
`weight_reads` keep their former keyword forms here (the `svdkern.trace` functions take an
`Example`). `svd_costs` and `lowrank_is_cheaper` are deprecated: the cost model
(`svdkern.costs.LayerCost`) replaces them.

Example::

    shapes = layer_inputs(model, example_inputs=(ids,))     # {name: [input shape per call]}
    trace_macs(model, (1, 3, 32, 32)).attention
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

from torch import nn

from svdkern import trace
from svdkern.compiled import uncompiled, uncompiled_name
from svdkern.costs import (
    LayerCost,
    conv_out_hw,
    conv_out_size,
    dense_macs,
    dense_params,
    dense_weight_shape,
    layer_kind,
)
from svdkern.examples import Example, example_call
from svdkern.nn import SVDLayer, svd_layers
from svdkern.tables import format_table
from svdkern.trace import COUNTED, FLOP_FORMULAS, Conv1DLike, MacTrace

__all__ = [
    "COUNTED",
    "FLOP_FORMULAS",
    "Conv1DLike",
    "MacTrace",
    "conv_out_hw",
    "conv_out_size",
    "dense_macs",
    "dense_params",
    "dense_weight_shape",
    "example_call",
    "format_table",
    "layer_inputs",
    "layer_kind",
    "svd_layers",
    "trace_macs",
    "uncompiled",
    "uncompiled_name",
    "weight_reads",
]


def layer_inputs(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    example_inputs=None,
    example_kwargs: Mapping | None = None,
) -> dict[str, list[tuple[int, ...]]]:
    """`svdkern.trace.layer_inputs` of the example of these arguments (none: one row per
    Linear-like layer, convs raise)."""
    return trace.layer_inputs(model, Example.of(input_shape, example_inputs, example_kwargs))


def trace_macs(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    example_inputs=None,
    example_kwargs: Mapping | None = None,
    chain: bool = True,
) -> MacTrace:
    """`svdkern.trace.trace_macs` of the example of these arguments."""
    example = Example(input_shape, example_inputs, example_kwargs)
    return trace.trace_macs(model, example, chain=chain)


def weight_reads(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, str]:
    """`svdkern.trace.weight_reads` of the forward `model(*args, **kwargs)`."""
    return trace.weight_reads(model, Example(example_inputs=tuple(args), example_kwargs=kwargs))


def _svd_costs(
    module: SVDLayer, shapes: Sequence[Sequence[int]], rank: int | None = None
) -> tuple[int, int]:
    cost = LayerCost("", module, tuple(tuple(s) for s in shapes))
    return cost.dense(), cost.svd(rank)


def _lowrank_is_cheaper(module: SVDLayer, shapes: Sequence[Sequence[int]] | None) -> bool:
    return LayerCost("", module, None if shapes is None else tuple(map(tuple, shapes))).lowrank()


_DEPRECATED = {
    "svd_costs": (_svd_costs, "svdkern.costs.LayerCost(name, layer, shapes).dense() / .svd()"),
    "lowrank_is_cheaper": (
        _lowrank_is_cheaper,
        "svdkern.costs.LayerCost(name, layer, shapes).lowrank()",
    ),
}


def __getattr__(name: str):
    if name in _DEPRECATED:
        function, instead = _DEPRECATED[name]
        warnings.warn(
            f"svdkern.layers.{name} is deprecated and will be removed in the next release; "
            f"use {instead}",
            DeprecationWarning,
            stacklevel=2,
        )
        return function
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
