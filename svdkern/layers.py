"""Layer utilities shared by `flops`, `prune`, `compress` and `tune_forms`: which layers
are counted, the input shapes they see in a forward, and their MAC costs.

Costs follow the convention of `svdkern.flops` (module docstring there): Linear
rows·in·out, Conv2d N·H_out·W_out·kh·kw·(c_in/groups)·c_out, an SVD layer its dense
form or its low-rank chain (`SVDLayer._macs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from svdkern.nn import SVDConv2d, SVDLayer, SVDLinear, svd_layers

__all__ = [
    "COUNTED",
    "conv_out_hw",
    "dense_macs",
    "dense_weight_shape",
    "format_table",
    "layer_inputs",
    "layer_kind",
    "lowrank_is_cheaper",
    "svd_costs",
    "svd_layers",
]

# The layers whose matmuls are counted (norms, activations and pooling are not).
COUNTED = (nn.Linear, nn.Conv2d, SVDLinear, SVDConv2d)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
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


def layer_inputs(
    model: nn.Module, input_shape: Sequence[int] | None
) -> dict[str, list[tuple[int, ...]]]:
    """Input shape of every call of every counted layer, by qualified name.

    With input_shape=None, every Linear/SVDLinear counts as one call on one row and any
    conv raises (its cost depends on the spatial size).
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, COUNTED)]
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


def dense_macs(module: nn.Module, shape: Sequence[int]) -> int:
    if isinstance(module, nn.Linear):
        return math.prod(shape[:-1]) * module.in_features * module.out_features
    *batch, _, h, w = shape
    ho, wo = conv_out_hw(module, h, w)
    kh, kw = module.kernel_size
    c_in = module.in_channels // module.groups
    return math.prod(batch) * ho * wo * kh * kw * c_in * module.out_channels


def conv_out_hw(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
    if conv.padding == "same":
        return h, w
    pad = (0, 0) if conv.padding == "valid" else conv.padding
    out = []
    for size, k, s, p, d in zip(
        (h, w), conv.kernel_size, conv.stride, pad, conv.dilation, strict=True
    ):
        out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return out[0], out[1]


def svd_costs(
    module: SVDLayer, shapes: Sequence[Sequence[int]], rank: int | None = None
) -> tuple[int, int]:
    """(dense MACs, chain MACs at `rank`) summed over the recorded calls."""
    dense = chain = 0
    for shape in shapes:
        d, c = module._macs(shape, rank)
        dense += d
        chain += c
    return dense, chain


def lowrank_is_cheaper(module: SVDLayer, shapes: Sequence[Sequence[int]] | None) -> bool:
    """The compression policy "flops": keep the low-rank pair iff it costs fewer MACs.

    Without recorded shapes (layer never called, or no input shape given) the comparison
    is made per output element: exact for Linear and channel convs; spatial convs take
    W_in = stride·W_out.
    """
    if shapes:
        dense, chain = svd_costs(module, shapes)
        return chain < dense
    r, m, n = module.rank, module._m, module._n
    if isinstance(module, SVDConv2d) and module.decomposition == "spatial":
        return r * m * module.stride[1] + r * n < m * n
    return r * (m + n) < m * n


def dense_weight_shape(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, SVDLinear):
        return (module.out_features, module.in_features)
    if isinstance(module, SVDConv2d):
        return (module.out_channels, module.in_channels, *module.kernel_size)
    return tuple(module.weight.shape)


def layer_kind(module: nn.Module) -> str:
    if isinstance(module, SVDConv2d):
        return f"SVDConv2d/{module.decomposition}"
    return type(module).__name__
