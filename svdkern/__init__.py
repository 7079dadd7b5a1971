"""svdkern: fast, correct training of factorized (SVD) layers in PyTorch.

Layers keep their weight as W = U·diag(s)·Vᵀ; the ops in `svdkern.ops`
(C++ CPU kernels, Triton CUDA kernels, C++ autograd) compose it, run the
low-rank chain, and compute the orthogonality and sparsity losses of all
layers in grouped calls.
"""

from svdkern import ops
from svdkern.convert import (
    DecomposeReport,
    DecomposeWarning,
    LayerPlan,
    compress,
    decompose,
    load_state_dict,
    plan,
)
from svdkern.flops import FlopsReport, flops
from svdkern.nn import SVDConv1d, SVDConv2d, SVDLinear, SVDMultiheadAttention, grouped_compose
from svdkern.ops import backend
from svdkern.prune import PruneReport, prune
from svdkern.regularize import SVDRegularizer
from svdkern.training import Cut, SVDTraining
from svdkern.tune import TuneReport, clear_tune_cache, set_memory_format, tune_forms

__version__ = "0.1.0"

__all__ = [
    "Cut",
    "DecomposeReport",
    "DecomposeWarning",
    "FlopsReport",
    "LayerPlan",
    "PruneReport",
    "SVDConv1d",
    "SVDConv2d",
    "SVDLinear",
    "SVDMultiheadAttention",
    "SVDRegularizer",
    "SVDTraining",
    "TuneReport",
    "__version__",
    "backend",
    "clear_tune_cache",
    "compress",
    "decompose",
    "flops",
    "grouped_compose",
    "load_state_dict",
    "ops",
    "plan",
    "prune",
    "set_memory_format",
    "tune_forms",
]
