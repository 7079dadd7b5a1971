"""Drop-in SVD layers: one file per layer family.

    _base.py     SVDLayer, the shared machinery (forms, rank cuts, state dicts)
    linear.py    SVDLinear (from nn.Linear or a transformers Conv1D), is_conv1d_like
    conv.py      SVDConv1d, SVDConv2d (one N-d implementation; channel and spatial)
    attention.py SVDMultiheadAttention (projections as SVDLinear children)
    grouped.py   grouped_compose (one grouped compose per model and step)

Example::

    layer = SVDLinear.from_dense(nn.Linear(64, 32))   # exact: layer(x) == linear(x)
    layer.prune_(8)                                   # keep the 8 largest |s|
    pair = layer.to_lowrank()                         # Linear(64, 8) → Linear(8, 32)
"""

from svdkern.nn._base import MODES, SVDLayer, svd_layers, swap_param
from svdkern.nn.attention import IN_PROJ, SVDMultiheadAttention
from svdkern.nn.conv import DECOMPOSITIONS, SVDConv1d, SVDConv2d
from svdkern.nn.grouped import grouped_compose
from svdkern.nn.linear import SVDLinear, is_conv1d_like

__all__ = [
    "DECOMPOSITIONS",
    "IN_PROJ",
    "MODES",
    "SVDConv1d",
    "SVDConv2d",
    "SVDLayer",
    "SVDLinear",
    "SVDMultiheadAttention",
    "grouped_compose",
    "is_conv1d_like",
    "svd_layers",
    "swap_param",
]
