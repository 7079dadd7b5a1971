"""Drop-in SVD layers: one file per layer family.

    _base.py     SVDLayer, the shared machinery (forms, rank cuts, state dicts)
    linear.py    SVDLinear
    conv.py      SVDConv2d (channel and spatial decompositions)
    grouped.py   grouped_compose (one grouped compose per model and step)

Example::

    layer = SVDLinear.from_dense(nn.Linear(64, 32))   # exact: layer(x) == linear(x)
    layer.prune_(8)                                   # keep the 8 largest |s|
    pair = layer.to_lowrank()                         # Linear(64, 8) → Linear(8, 32)
"""

from svdkern.nn._base import MODES, SVDLayer, svd_layers
from svdkern.nn.conv import DECOMPOSITIONS, SVDConv2d
from svdkern.nn.grouped import grouped_compose
from svdkern.nn.linear import SVDLinear

__all__ = [
    "DECOMPOSITIONS",
    "MODES",
    "SVDConv2d",
    "SVDLayer",
    "SVDLinear",
    "grouped_compose",
    "svd_layers",
]
