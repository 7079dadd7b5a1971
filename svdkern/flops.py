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

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from svdkern.nn import SVDConv2d, SVDLinear, _SVDBase

__all__ = ["FlopsReport", "LayerFlops", "flops"]

_COUNTED = (nn.Linear, nn.Conv2d, SVDLinear, SVDConv2d)


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
        return _table(header, rows) + f"\ninput shape {tuple(self.input_shape)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = [
        "  ".join(
            str(c).ljust(w) if i < 4 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    ]
    return "\n".join([fmt[0], line, *fmt[1:]])


def _layer_inputs(
    model: nn.Module, input_shape: Sequence[int] | None
) -> dict[str, list[tuple[int, ...]]]:
    """Input shape of every call of every counted layer, by qualified name.

    With input_shape=None, every Linear/SVDLinear counts as one call on one row and any
    conv raises (its cost depends on the spatial size).
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _COUNTED)]
    if input_shape is None:
        convs = [name for name, m in layers if isinstance(m, (nn.Conv2d, SVDConv2d))]
        if convs:
            raise ValueError(
                f"input_shape is needed to count the MACs of convolutions (e.g. {convs[0]!r}); "
                "pass the shape of one input batch, e.g. input_shape=(1, 3, 32, 32)"
            )
        return {name: [(1, m.in_features)] for name, m in layers}
    shapes: dict[str, list[tuple[int, ...]]] = {name: [] for name, _ in layers}

    def hook(name):
        def record(module, args):
            shapes[name].append(tuple(args[0].shape))

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers]
    flags = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    factory = {"device": param.device, "dtype": param.dtype} if param is not None else {}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(tuple(input_shape), **factory))
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    return shapes


def _dense_macs(module: nn.Module, shape: Sequence[int]) -> int:
    if isinstance(module, nn.Linear):
        return math.prod(shape[:-1]) * module.in_features * module.out_features
    *batch, _, h, w = shape
    ho, wo = _conv_out_hw(module, h, w)
    kh, kw = module.kernel_size
    c_in = module.in_channels // module.groups
    return math.prod(batch) * ho * wo * kh * kw * c_in * module.out_channels


def _conv_out_hw(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
    if conv.padding == "same":
        return h, w
    pad = (0, 0) if conv.padding == "valid" else conv.padding
    out = []
    for size, k, s, p, d in zip(
        (h, w), conv.kernel_size, conv.stride, pad, conv.dilation, strict=True
    ):
        out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return out[0], out[1]


def _svd_costs(
    module: _SVDBase, shapes: Sequence[Sequence[int]], rank: int | None = None
) -> tuple[int, int]:
    """(dense MACs, chain MACs at `rank`) summed over the recorded calls."""
    dense = chain = 0
    for shape in shapes:
        d, c = module._macs(shape, rank)
        dense += d
        chain += c
    return dense, chain


def _lowrank_is_cheaper(module: _SVDBase, shapes: Sequence[Sequence[int]] | None) -> bool:
    """The compression policy "flops": keep the low-rank pair iff it costs fewer MACs.

    Without recorded shapes (layer never called, or no input shape given) the comparison
    is made per output element: exact for Linear and channel convs; spatial convs take
    W_in = stride·W_out.
    """
    if shapes:
        dense, chain = _svd_costs(module, shapes)
        return chain < dense
    r, m, n = module.rank, module._m, module._n
    if isinstance(module, SVDConv2d) and module.decomposition == "spatial":
        return r * m * module.stride[1] + r * n < m * n
    return r * (m + n) < m * n


def _dense_weight_shape(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, SVDLinear):
        return (module.out_features, module.in_features)
    if isinstance(module, SVDConv2d):
        return (module.out_channels, module.in_channels, *module.kernel_size)
    return tuple(module.weight.shape)


def _kind(module: nn.Module) -> str:
    if isinstance(module, SVDConv2d):
        return f"SVDConv2d/{module.decomposition}"
    return type(module).__name__


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
    shapes = _layer_inputs(model, input_shape)
    modules = dict(model.named_modules())
    params = sum(p.numel() for p in model.parameters())
    report = FlopsReport(tuple(input_shape), params, params, params, 0, 0, 0)
    for name, calls in shapes.items():
        module = modules[name]
        if isinstance(module, _SVDBase):
            dense, chain = _svd_costs(module, calls)
            lowrank = _lowrank_is_cheaper(module, calls)
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
                _kind(module),
                _dense_weight_shape(module),
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
            dense = sum(_dense_macs(module, shape) for shape in calls)
            n_weight = module.weight.numel()
            layer = LayerFlops(
                name,
                _kind(module),
                _dense_weight_shape(module),
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
