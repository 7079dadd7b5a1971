"""`grouped_compose`: one grouped compose for all of a model's SVD layers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from svdkern import ops
from svdkern.nn._base import SVDLayer, svd_layers

__all__ = ["grouped_compose"]


@contextlib.contextmanager
def grouped_compose(model: nn.Module) -> Iterator[None]:
    """Compose the weights of all of `model`'s SVD layers in one grouped call for the
    forward passes inside the block: one `ops.compose_grouped` (one launch forward and one
    backward on CUDA) instead of one `ops.compose` per layer.

    Layers whose last forward took the low-rank chain are left out (they need no W). The
    weights are those of the parameters at entry: use one block per training step.

    Example::

        with svdkern.grouped_compose(model):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    """
    groups: dict[tuple, list[SVDLayer]] = {}
    for _, layer in svd_layers(model):
        if not layer._last_chain:
            groups.setdefault((layer.U.device, layer.U.dtype), []).append(layer)
    composed = []
    for layers in groups.values():
        Ws = ops.compose_grouped(
            [m.U for m in layers], [m.s for m in layers], [m.V for m in layers]
        )
        for layer, W in zip(layers, Ws, strict=True):
            layer._grouped_matrix = W
            composed.append(layer)
    try:
        yield
    finally:
        for layer in composed:
            layer._grouped_matrix = None
