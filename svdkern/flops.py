"""Parameters and multiply-accumulates (MACs) of a model in dense, SVD and compressed form.

Convention (the same for all three forms, and the one `svdkern.prune(target_flops=...)`
aims at):

- Only nn.Linear, nn.Conv2d and the SVD layers are counted (the layers whose matmuls
  dominate; norms, activations and pooling are left out, as torch's FlopCounterMode
  does). Biases add no MACs.
- Linear: rows·in·out. Conv2d: N·H_out·W_out·kh·kw·(c_in/groups)·c_out.
- An SVD layer of rank r counts as
    dense form:       the dense layer it replaces;
    SVD form:         its low-rank chain, summed per part (Linear: rows·r·(in + out);
                      channel conv: N·H_out·W_out·r·(c_in·kh·kw + c_out); spatial conv:
                      N·H_out·W_in·r·c_in·kh + N·H_out·W_out·r·c_out·kw);
    compressed form:  the cheaper of the two, as `svdkern.compress(policy="flops")` builds it.
  The compose path of `forward` (used in training when it is cheaper) is not counted:
  the numbers describe inference of the deployed model.
- Counts are for the whole `input_shape`, batch included (pass batch 1 for per-sample).
- FLOPs = 2·MACs.

Spatial sizes come from forward hooks during one forward of a zero input of `input_shape`
(in eval mode, without gradients; the training flags are restored afterwards).

Example::

    report = svdkern.flops(model, (1, 3, 32, 32))
    print(report)                       # per-layer table and totals
    report.compressed_macs / report.dense_macs
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from torch import nn

from svdkern.layers import (
    dense_macs,
    dense_weight_shape,
    format_table,
    layer_inputs,
    layer_kind,
    lowrank_is_cheaper,
    svd_costs,
)
from svdkern.nn import SVDLayer

__all__ = ["FlopsReport", "LayerFlops", "flops"]


@dataclass
class LayerFlops:
    """One counted layer: dense weight shape, rank (None if dense) and its three costs."""

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


@dataclass
class FlopsReport:
    """Totals over the model: params (all parameters) and MACs (counted layers only)."""

    input_shape: tuple[int, ...]
    dense_params: int
    svd_params: int
    compressed_params: int
    dense_macs: int
    svd_macs: int
    compressed_macs: int
    layers: list[LayerFlops] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """compressed MACs / dense MACs (1.0 for a model without counted layers)."""
        return self.compressed_macs / self.dense_macs if self.dense_macs else 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}

    def __str__(self) -> str:
        header = ("layer", "kind", "shape", "rank", "dense MACs", "SVD MACs", "compressed")
        rows = [
            (
                lay.name,
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
        return format_table(header, rows) + f"\ninput shape {tuple(self.input_shape)}"


def flops(model: nn.Module, input_shape: Sequence[int]) -> FlopsReport:
    """Params and MACs of `model` as it is (SVD), as dense layers, and compressed.

    Args:
        model: any module; its nn.Linear, nn.Conv2d, SVDLinear and SVDConv2d are counted.
        input_shape: shape of the input tensor given to `model`, batch included.
    Returns:
        FlopsReport with totals (`dense_*`, `svd_*`, `compressed_*`), `ratio`
        (compressed / dense MACs) and `layers` (a LayerFlops per counted layer).
        See the module docstring for the counting convention.

    Example::

        report = svdkern.flops(model, (1, 3, 32, 32))
        print(report.dense_macs, report.compressed_macs, report.ratio)
    """
    shapes = layer_inputs(model, input_shape)
    modules = dict(model.named_modules())
    params = sum(p.numel() for p in model.parameters())
    report = FlopsReport(tuple(input_shape), params, params, params, 0, 0, 0)
    for name, calls in shapes.items():
        module = modules[name]
        if isinstance(module, SVDLayer):
            dense, chain = svd_costs(module, calls)
            lowrank = lowrank_is_cheaper(module, calls)
            factor_params = module.rank * (module._m + module._n)
            dense_params = module._m * module._n
            svd_params = factor_params + module.rank
            compressed = (
                (chain, factor_params, "lowrank")
                if lowrank
                else (
                    dense,
                    dense_params,
                    "dense",
                )
            )
            layer = LayerFlops(
                name,
                layer_kind(module),
                dense_weight_shape(module),
                module.rank,
                module.full_rank,
                len(calls),
                dense,
                chain,
                compressed[0],
                dense_params,
                svd_params,
                compressed[1],
                compressed[2],
            )
            report.dense_params += dense_params - svd_params
            report.compressed_params += compressed[1] - svd_params
        else:
            dense = sum(dense_macs(module, shape) for shape in calls)
            n_weight = module.weight.numel()
            layer = LayerFlops(
                name,
                layer_kind(module),
                dense_weight_shape(module),
                None,
                None,
                len(calls),
                dense,
                dense,
                dense,
                n_weight,
                n_weight,
                n_weight,
                "dense",
            )
        report.dense_macs += layer.dense_macs
        report.svd_macs += layer.svd_macs
        report.compressed_macs += layer.compressed_macs
        report.layers.append(layer)
    return report
