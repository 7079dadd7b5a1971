"""svdkern: fast, correct training of factorized (SVD) layers in PyTorch.

Layers keep their weight as W = U·diag(s)·Vᵀ; the ops in `svdkern.ops`
(C++ CPU kernels, Triton CUDA kernels, C++ autograd) compose it, run the
low-rank chain, and compute the orthogonality and sparsity losses of all
layers in grouped calls.
"""

from svdkern import ops
from svdkern.ops import backend

__version__ = "0.1.0"

__all__ = ["__version__", "backend", "ops"]
