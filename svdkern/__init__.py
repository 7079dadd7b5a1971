"""svdkern: fast, correct training of factorized (SVD) layers in PyTorch.

Layers keep their weight as W = U·diag(s)·Vᵀ; the ops in `svdkern.ops`
(C++ CPU kernels, Triton CUDA kernels, C++ autograd) compose it, run the
low-rank chain, and compute the orthogonality and sparsity losses of all
layers in grouped calls.

Above the layers (`svdkern.nn`), the analysis core: example inputs (`examples`), the traced
forward (`trace`), the cost model (`costs`); then the verbs `flops`, `prune`, `tune_forms`
(`tune`), `decompose` / `plan` (`decompose`), `compress` (`compress`; its deployment
runtimes in `runtimes`, batch-norm folding in `fold`), `load_state_dict` (`state`) and
`SVDTraining` (`training`).
"""

from svdkern import ops
from svdkern.compress import CompressReport, compress
from svdkern.decompose import DecomposeReport, DecomposeWarning, LayerPlan, decompose, plan
from svdkern.examples import Example
from svdkern.flops import FlopsReport, flops
from svdkern.nn import SVDConv1d, SVDConv2d, SVDLinear, SVDMultiheadAttention, grouped_compose
from svdkern.ops import backend
from svdkern.prune import PruneReport, prune
from svdkern.regularize import SVDRegularizer
from svdkern.state import load_state_dict
from svdkern.training import Cut, SVDTraining
from svdkern.tune import TuneReport, clear_tune_cache, set_memory_format, tune_forms

__version__ = "0.1.0"

__all__ = [
    "CompressReport",
    "Cut",
    "DecomposeReport",
    "DecomposeWarning",
    "Example",
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
