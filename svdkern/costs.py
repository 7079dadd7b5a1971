"""The cost model: the multiply-accumulates (MACs) of a model's counted layers in dense, SVD
and compressed form at any ranks, the one rule that `flops`, `prune`, `compress` and the
rank cuts of training count with.

Convention (in full in the docstring of `svdkern.flops`):

- The counted layers are `svdkern.trace.COUNTED`. Linear and transformers' Conv1D cost
  rows·in·out, ConvNd N·∏out·∏k·(c_in/groups)·c_out, the in-projection of
  nn.MultiheadAttention Σ_{q,k,v} rows·d_in·E; biases add nothing.
- An SVD layer costs, per call, its dense layer or its low-rank chain at rank r
  (`SVDLayer.macs`).
- The compressed form of an SVD layer is the low-rank pair where its chain costs fewer
  MACs than its dense layer, else the dense layer; and the dense layer whenever its parent
  reads its weight (found by the example forward, `svdkern.trace.weight_reads`, or by
  `decompose`, `SVDLayer.weight_read`): the parent multiplies by the full W whatever the
  rank, so such a layer costs its dense MACs plus those of the read in every form.
- Without the input shapes of a layer's calls (no example forward, or a layer not called
  in it) the comparison is per output element: exact for Linear and channel convs; a
  spatial conv's first factor runs at its input width, taken as stride·W_out.

Example::

    costs = CostModel.from_model(model, Example(input_shape=(1, 3, 32, 32)))
    costs.dense(), costs.compressed()          # MACs of the dense and the compressed model
    costs.compressed({"fc": 8})                # ... with fc at rank 8
    costs.layers["fc"].lowrank(rank=8)         # is fc's low-rank pair the cheaper at rank 8?
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from svdkern.examples import Example, Shape
from svdkern.nn import SVDConv2d, SVDLayer, SVDLinear, is_conv1d_like
from svdkern.trace import (
    MacTrace,
    UncountedError,
    layer_weights,
    one_row_inputs,
    trace_macs,
)

__all__ = [
    "CostModel",
    "LayerCost",
    "conv_out_hw",
    "conv_out_size",
    "dense_macs",
    "dense_params",
    "dense_weight_shape",
    "layer_kind",
]


@dataclass(frozen=True)
class LayerCost:
    """The MACs of one counted layer over the calls of the example forward, in each form.

    calls: input shapes of its calls; None when they are unknown (a conv without an
        example forward).
    read: measured MACs of the ops its weight flows into while its own forward does not
        run (`MacTrace.weight_reads`; 0 for a read of `.weight` that no op follows), None
        when the example forward found no such read.
    weight_ops: measured MACs of ops on its weights alone (an SVD layer composing its W for
        that read): part of the SVD form only for an SVD layer, of every form for a dense one.
    """

    name: str
    module: nn.Module
    calls: tuple[Shape, ...] | None
    read: int | None = None
    weight_ops: int = 0

    @property
    def weight_read(self) -> bool:
        """Whether the layer's parent reads its weight (the example forward found it, or
        `decompose` did: `SVDLayer.weight_read`): it stays dense in the compressed form."""
        if self.read is not None:
            return True
        return isinstance(self.module, SVDLayer) and self.module.weight_read is not None

    def _calls(self) -> tuple[Shape, ...]:
        if self.calls is None:
            raise UncountedError(self.name)
        return self.calls

    def _chain(self, rank: int | None) -> int:
        return sum(self.module.macs(shape, rank)[1] for shape in self._calls())

    def dense(self) -> int:
        """MACs of the dense form: the dense layer at every call, plus the read (and, for
        a dense layer, the ops on its weights alone)."""
        if isinstance(self.module, SVDLayer):
            return sum(self.module.macs(shape)[0] for shape in self._calls()) + (self.read or 0)
        macs = sum(dense_macs(self.module, shape) for shape in self._calls())
        return macs + (self.read or 0) + self.weight_ops

    def svd(self, rank: int | None = None) -> int:
        """MACs of the SVD form: an SVD layer's low-rank chain at `rank` (default its
        current rank) at every call, plus the read and the ops on its weights alone; a
        dense layer's `dense()`."""
        if not isinstance(self.module, SVDLayer):
            return self.dense()
        return self._chain(rank) + (self.read or 0) + self.weight_ops

    def lowrank(self, rank: int | None = None) -> bool:
        """Whether the compressed form at `rank` (default the current rank) is the
        low-rank pair: an SVD layer whose weight is not read and whose chain costs fewer
        MACs than its dense layer, summed over its calls (per output element without
        them, see the module docstring)."""
        module = self.module
        if not isinstance(module, SVDLayer) or self.weight_read:
            return False
        if self.calls:
            dense = sum(module.macs(shape)[0] for shape in self.calls)
            return self._chain(rank) < dense
        r = module.rank if rank is None else rank
        m, n = module.matrix_shape
        if isinstance(module, SVDConv2d) and module.decomposition == "spatial":
            return r * m * module.stride[1] + r * n < m * n
        return r * (m + n) < m * n

    def compressed(self, rank: int | None = None) -> int:
        """MACs of the compressed form at `rank`: the chain where `lowrank(rank)`, else
        `dense()`."""
        return self._chain(rank) if self.lowrank(rank) else self.dense()


class CostModel:
    """The costs of every counted layer of a model (`layers`, a `LayerCost` by qualified
    name in `named_modules` order) and their totals at any ranks.

    Args:
        model: the model.
        shapes: {name: input shapes of its calls, or None when unknown} of its counted
            layers, as `svdkern.trace.layer_inputs` records them; built from a model by
            `CostModel.from_model`. Recorded once, they count every later rank cut (the
            shapes a layer sees do not change with its rank).
        reads: {name: measured MACs} of the layers read through .weight.
        weight_ops: {name: measured MACs} of ops on a layer's weights alone.
        trace: the traced forward the costs come from, if any.
    """

    def __init__(
        self,
        model: nn.Module,
        shapes: Mapping[str, Sequence[Sequence[int]] | None],
        reads: Mapping[str, int] | None = None,
        weight_ops: Mapping[str, int] | None = None,
        trace: MacTrace | None = None,
    ) -> None:
        modules = dict(model.named_modules())
        reads, weight_ops = reads or {}, weight_ops or {}
        self.trace = trace
        self.layers: dict[str, LayerCost] = {
            name: LayerCost(
                name,
                modules[name],
                None if calls is None else tuple(tuple(s) for s in calls),
                reads.get(name),
                weight_ops.get(name, 0),
            )
            for name, calls in shapes.items()
        }

    @classmethod
    def from_model(cls, model: nn.Module, example: Example | None = None) -> CostModel:
        """The costs of `model` on `example`: one traced forward (`trace_macs`) gives the
        input shapes of every call and the layers read through .weight with the MACs of
        their reads. Without an example no forward runs: every Linear-like layer counts one
        row and convolutions are not counted (`uncounted`; their forms follow the rule per
        output element)."""
        if example is None:
            return cls(model, one_row_inputs(model))
        trace = trace_macs(model, example)
        reads = {name: trace.weight_reads.get(name, 0) for name in trace.reasons}
        return cls(model, trace.shapes, reads, trace.weight_ops, trace)

    @property
    def uncounted(self) -> list[str]:
        """The layers whose MACs cannot be counted (convolutions without an example)."""
        return [name for name, layer in self.layers.items() if layer.calls is None]

    def dense(self) -> int:
        """MACs of the model with every counted layer dense."""
        return sum(layer.dense() for layer in self.layers.values())

    def svd(self, ranks: Mapping[str, int] | None = None) -> int:
        """MACs with every SVD layer as its chain, at `ranks` ({name: rank}; others at
        their current rank)."""
        ranks = ranks or {}
        return sum(layer.svd(ranks.get(name)) for name, layer in self.layers.items())

    def compressed(self, ranks: Mapping[str, int] | None = None) -> int:
        """MACs with every SVD layer in its compressed form, at `ranks` ({name: rank};
        others at their current rank)."""
        ranks = ranks or {}
        return sum(layer.compressed(ranks.get(name)) for name, layer in self.layers.items())


# --- what one dense layer costs and holds ----------------------------------------------


def dense_macs(module: nn.Module, shape: Sequence[int]) -> int:
    """MACs of one call of a dense counted layer on an input of `shape` (for an
    nn.MultiheadAttention one of its query/key/value projections: rows·d_in·E)."""
    if isinstance(module, nn.MultiheadAttention):
        return math.prod(shape[:-1]) * shape[-1] * module.embed_dim
    if isinstance(module, nn.Linear):
        return math.prod(shape[:-1]) * module.in_features * module.out_features
    if is_conv1d_like(module):
        return math.prod(shape[:-1]) * module.weight.shape[0] * module.weight.shape[1]
    d = len(module.kernel_size)
    batch, size = shape[: -(d + 1)], shape[-d:]
    out = conv_out_size(module, size)
    c_in = module.in_channels // module.groups
    return (
        math.prod(batch)
        * math.prod(out)
        * math.prod(module.kernel_size)
        * c_in
        * module.out_channels
    )


def conv_out_size(conv: nn.Module, size: Sequence[int]) -> tuple[int, ...]:
    """Output spatial size of a ConvNd for an input of spatial size `size`."""
    if conv.padding == "same":
        return tuple(size)
    pad = (0,) * len(size) if conv.padding == "valid" else conv.padding
    return tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(
            size, conv.kernel_size, conv.stride, pad, conv.dilation, strict=True
        )
    )


def conv_out_hw(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
    """Output (height, width) of a Conv2d for an input of height h and width w."""
    out = conv_out_size(conv, (h, w))
    return out[0], out[1]


def dense_weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The dense weight's shape (Conv1D: (in, out); MultiheadAttention: its in-projection,
    (3·E, E), or (E, E + kdim + vdim) for separate q/k/v weights)."""
    if isinstance(module, SVDLinear):
        return (module.out_features, module.in_features)
    if isinstance(module, SVDLayer):
        groups = getattr(module, "groups", 1)
        return (module.out_channels, module.in_channels // groups, *module.kernel_size)
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            return tuple(module.in_proj_weight.shape)
        return (module.embed_dim, module.embed_dim + module.kdim + module.vdim)
    return tuple(module.weight.shape)


def dense_params(module: nn.Module) -> int:
    """Number of weight entries of a dense counted layer (biases not included)."""
    return sum(w.numel() for w in layer_weights(module))


def layer_kind(module: nn.Module) -> str:
    """The layer's kind as reports name it ("Linear", "SVDConv2d/spatial", "Conv1D", ...)."""
    if isinstance(module, SVDConv2d):
        return f"SVDConv2d/{module.decomposition}"
    if isinstance(module, nn.MultiheadAttention):
        return "MultiheadAttention.in_proj"
    if is_conv1d_like(module):
        return "Conv1D"
    return type(module).__name__
