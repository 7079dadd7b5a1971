"""Parameters and multiply-accumulates (MACs) of a model in dense, SVD and compressed form,
and where the rest of its MACs go.

Convention (the same for all three forms, and the one `svdkern.prune(target_flops=...)`
aims at):

- Only the layers in `svdkern.trace.COUNTED` are counted: nn.Linear, nn.Conv1d,
  nn.Conv2d, transformers' Conv1D, the in-projection of nn.MultiheadAttention (its
  out_proj is an nn.Linear) and the SVD layers (the layers whose matmuls dominate and that
  a rank cut changes). Biases add no MACs.
- Linear, Conv1D: rows·in·out. ConvNd: N·∏out·∏k·(c_in/groups)·c_out.
  MultiheadAttention in-projection: Σ over query, key, value of rows·d_in·embed_dim.
- An SVD layer of rank r counts as
    dense form:       the dense layer it replaces;
    SVD form:         its low-rank chain, summed per part (Linear: rows·r·(in + out);
                      channel conv: N·∏out·r·(c_in·∏k + c_out); spatial conv:
                      N·H_out·W_in·r·c_in·kh + N·H_out·W_out·r·c_out·kw);
    compressed form:  the cheaper of the two, as `svdkern.compress(policy="flops")` builds it
                      (one rule, `svdkern.costs.LayerCost.lowrank`).
  The compose path of `forward` (used in training when it is cheaper) is not counted:
  the numbers describe inference of the deployed model.
- A layer whose weight its parent reads instead of calling it (`F.linear(x,
  self.qkv.weight)`, or nn.TransformerEncoderLayer's fast path reading its children's
  weights; see `svdkern.trace.weight_reads`, the one list `decompose`, `compress` and
  `prune` use too) costs its dense MACs in all three forms: those of the ops its weight
  flows into, measured, plus those of its own calls in the counted forward. Its parent
  multiplies by the full weight whatever the rank, and `compress` keeps it dense.
- Counts are for the whole example input, batch included (pass batch 1 for per-sample).
- FLOPs = 2·MACs.

With an example input (input_shape, or example_inputs and example_kwargs, or an `Example`:
`svdkern.examples`) the report also
gives the model's total as torch.utils.flop_counter.FlopCounterMode counts it for that same
forward (FLOPs / 2; run in eval mode, without gradients, SVD layers as their chains, the
MultiheadAttention fast path off, with the FLOP formulas svdkern registers for its own
ops and `svdkern.trace.FLOP_FORMULAS` for the CPU attention kernel) and
splits it: counted layers (= `svd_macs`), of which layers read through .weight,
attention matmuls (activation × activation: QKᵀ, AV, sdpa), and other ops (layers svdkern
does not count, by op). Embeddings, norms, activations and pooling have no MACs in
FlopCounterMode either.

Input shapes come from forward hooks during that forward (the training flags are
restored afterwards).

Example::

    report = svdkern.flops(model, (1, 3, 32, 32))
    print(report)                       # per-layer table, totals and the breakdown
    report.compressed_macs / report.dense_macs
    report = svdkern.flops(lm, example_inputs=(ids,), example_kwargs={"use_cache": False})
    report.total_macs, report.attention_macs, report.other_macs
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from torch import nn

from svdkern.costs import CostModel, LayerCost, dense_params, dense_weight_shape, layer_kind
from svdkern.examples import Example
from svdkern.nn import SVDLayer
from svdkern.tables import format_table

__all__ = ["FlopsReport", "LayerFlops", "flops", "macs_at"]


@dataclass
class LayerFlops:
    """One counted layer: dense weight shape, rank (None if dense) and its three costs.

    `weight_read` is True for a layer whose weight its parent reads (its MACs are the
    measured ones of the ops its weight flows into, the same in all three forms), or that
    `decompose` found read (`SVDLayer.weight_read`): compressed, it stays dense.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    rank: int | None
    full_rank: int | None
    calls: int
    dense_macs: int
    svd_macs: int
    compressed_macs: int
    dense_params: int
    svd_params: int
    compressed_params: int
    compressed_form: str
    weight_read: bool = False


@dataclass
class FlopsReport:
    """Totals over the model: params (all parameters) and MACs (counted layers only), and,
    when an example forward ran, that forward's FlopCounterMode total and its breakdown.

    total_macs: FlopCounterMode's MACs of the example forward (None without one).
    weight_read_macs: MACs of the layers read through .weight (part of the counted MACs;
        an SVD layer's include composing its W for the read).
    attention_macs: matmuls between activations (attention scores and values).
    other_macs: {op: MACs} of ops outside the counted layers (uncounted layer types).
    weight_reads: {layer: why} of the layers read through .weight.
    With the example forward, total_macs = svd_macs + attention_macs + Σ other_macs.
    """

    input_shape: tuple[int, ...] | None
    dense_params: int
    svd_params: int
    compressed_params: int
    dense_macs: int
    svd_macs: int
    compressed_macs: int
    layers: list[LayerFlops] = field(default_factory=list)
    total_macs: int | None = None
    weight_read_macs: int = 0
    attention_macs: int = 0
    other_macs: dict[str, int] = field(default_factory=dict)
    weight_reads: dict[str, str] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """compressed MACs / dense MACs (1.0 for a model without counted layers)."""
        return self.compressed_macs / self.dense_macs if self.dense_macs else 1.0

    @property
    def uncounted_macs(self) -> int | None:
        """MACs of the example forward outside the counted layers (attention + other)."""
        if self.total_macs is None:
            return None
        return self.attention_macs + sum(self.other_macs.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "uncounted_macs": self.uncounted_macs}

    def __str__(self) -> str:
        header = ("layer", "kind", "shape", "rank", "dense MACs", "SVD MACs", "compressed")
        rows = [
            (
                lay.name + (" (read through .weight)" if lay.weight_read else ""),
                lay.kind,
                "×".join(map(str, lay.shape)),
                "-" if lay.rank is None else f"{lay.rank}/{lay.full_rank}",
                f"{lay.dense_macs:,}",
                f"{lay.svd_macs:,}",
                f"{lay.compressed_macs:,} ({lay.compressed_form})",
            )
            for lay in self.layers
        ]
        rows.append(
            (
                "total",
                "",
                "",
                "",
                f"{self.dense_macs:,}",
                f"{self.svd_macs:,}",
                f"{self.compressed_macs:,} ({self.ratio:.1%})",
            )
        )
        rows.append(
            (
                "params",
                "",
                "",
                "",
                f"{self.dense_params:,}",
                f"{self.svd_params:,}",
                f"{self.compressed_params:,}",
            )
        )
        text = format_table(header, rows)
        if self.input_shape is not None:
            text += f"\ninput shape {tuple(self.input_shape)}"
        if self.total_macs is None:
            return text + "\n(one row per Linear: no example forward, no FlopCounterMode total)"
        total = self.total_macs

        def share(v: int) -> str:
            return f"{v / total:.1%}" if total else "-"

        other = ", ".join(f"{op} {v:,}" for op, v in self.other_macs.items())
        parts = [
            ("counted layers (SVD layers as chains)", self.svd_macs, ""),
            (
                "  of which read through .weight",
                self.weight_read_macs,
                ", ".join(self.weight_reads),
            ),
            ("attention matmuls (activation × activation)", self.attention_macs, ""),
            ("other ops (layers not counted)", sum(self.other_macs.values()), other),
            ("total", total, ""),
        ]
        width = max(len(p[0]) for p in parts)
        digits = max(len(f"{p[1]:,}") for p in parts)
        lines = ["MACs of this forward as FlopCounterMode counts them:"]
        for what, v, note in parts:
            line = f"  {what.ljust(width)}  {f'{v:,}'.rjust(digits)}  {share(v).rjust(6)}"
            lines.append(f"{line}  {note}".rstrip())
        breakdown = "\n".join(lines)
        return text + "\n\n" + breakdown


def flops(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    example_inputs=None,
    example_kwargs: Mapping | None = None,
    example: Example | None = None,
) -> FlopsReport:
    """Params and MACs of `model` as it is (SVD), as dense layers, and compressed, and its
    total MACs as FlopCounterMode counts them for the example forward, split by category.

    Args:
        model: any module; the layers of `svdkern.trace.COUNTED` are counted.
        input_shape: shape of the input tensor given to `model`, batch included (a zero
            float tensor in the model's dtype is used).
        example_inputs: instead of input_shape, the forward's positional arguments: a
            tensor or a tuple (any dtype, e.g. int64 token ids).
        example_kwargs: the forward's keyword arguments (e.g. {"attention_mask": m}).
        example: instead of the three, an `svdkern.Example` of them.
        With none of them, each Linear-like layer counts one row (convs raise) and no
        forward runs.
    Returns:
        FlopsReport with totals (`dense_*`, `svd_*`, `compressed_*`), `ratio`
        (compressed / dense MACs), `layers` (a LayerFlops per counted layer) and the
        forward's `total_macs`, `weight_read_macs`, `attention_macs`, `other_macs`.
        See the module docstring for the counting convention.
    Raises:
        ValueError naming input_shape or example_inputs when the forward fails on them.

    Example::

        report = svdkern.flops(model, (1, 3, 32, 32))
        print(report.dense_macs, report.compressed_macs, report.ratio)
        report = svdkern.flops(gpt, example_inputs=(ids,))
        print(report)            # ... and the FlopCounterMode total, attention, other
    """
    example = Example.of(input_shape, example_inputs, example_kwargs, example)
    if example is not None:
        example = example.single("flops")
    costs = CostModel.from_model(model, example)
    params = sum(p.numel() for p in model.parameters())
    shape = None if example is None else example.input_shape
    report = FlopsReport(shape, params, params, params, 0, 0, 0)
    for cost in costs.layers.values():
        layer = _layer_flops(cost)
        report.dense_params += layer.dense_params - layer.svd_params
        report.compressed_params += layer.compressed_params - layer.svd_params
        report.dense_macs += layer.dense_macs
        report.svd_macs += layer.svd_macs
        report.compressed_macs += layer.compressed_macs
        report.layers.append(layer)
    trace = costs.trace
    if trace is not None:
        # Layers read through .weight or .bias: dense in every form (MACs measured; 0 for a
        # read of an attribute such as .weight.dtype that no op follows), and the products
        # of their weights alone (an SVD layer's compose of W for the read).
        reads = [cost for cost in costs.layers.values() if cost.read is not None]
        report.total_macs = trace.total
        report.weight_read_macs = sum(cost.read + cost.weight_ops for cost in reads)
        report.attention_macs = trace.attention
        report.other_macs = dict(sorted(trace.other.items(), key=lambda kv: -kv[1]))
        report.weight_reads = dict(trace.reasons)
    return report


def macs_at(model: nn.Module, shapes: Mapping[str, list[tuple[int, ...]]]) -> tuple[int, int]:
    """(compressed MACs, dense MACs) of the counted layers of `model` called at `shapes`
    ({qualified name: input shapes of its calls}, as `svdkern.trace.layer_inputs` records
    them), at the layers' current ranks (`svdkern.costs.CostModel`). Runs no forward: the
    shapes of a rank-cut model do not change, so a training loop records them once and
    counts every cut with them."""
    costs = CostModel(model, shapes)
    return costs.compressed(), costs.dense()


def _layer_flops(cost: LayerCost) -> LayerFlops:
    """The row of one counted layer: its three costs and weight counts."""
    module = cost.module
    row = (cost.name, layer_kind(module), dense_weight_shape(module))
    macs = (cost.dense(), cost.svd(), cost.compressed())
    if not isinstance(module, SVDLayer):
        n_weight = dense_params(module)
        rest = (n_weight, n_weight, n_weight, "dense", cost.weight_read)
        return LayerFlops(*row, None, None, len(cost.calls), *macs, *rest)
    m, n = module.matrix_shape
    factor_params = module.rank * (m + n)
    lowrank = cost.lowrank()
    return LayerFlops(
        *row,
        module.rank,
        module.full_rank,
        len(cost.calls),
        *macs,
        m * n,
        factor_params + module.rank,
        factor_params if lowrank else m * n,
        "lowrank" if lowrank else "dense",
        cost.weight_read,
    )
