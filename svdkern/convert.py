"""Model conversion, as one import: dense → SVD (`svdkern.decompose`: `decompose`, `plan`),
SVD → plain low-rank torch (`svdkern.compress`: `compress`), and loading checkpoints of
pruned SVD models (`svdkern.state`: `load_state_dict`). Each lives in its own module; this
one keeps `from svdkern.convert import ...` working.

Example::

    print(svdkern.plan(model, skip=["fc"]))     # what decompose would convert, and why not
    model = svdkern.decompose(model, decomposition="channel", skip=["fc"])
    ...                                         # train with SVDRegularizer, prune
    deployable = svdkern.compress(model)        # plain nn.Linear / nn.Conv2d only
    svdkern.load_state_dict(fresh_svd_model, pruned_state_dict)   # ranks from the checkpoint
"""

from svdkern.compress import POLICIES, compress
from svdkern.decompose import (
    MHA_OPTIONS,
    DecomposeReport,
    DecomposeWarning,
    LayerPlan,
    Skip,
    SkipEntry,
    decompose,
    plan,
)
from svdkern.state import load_state_dict

__all__ = [
    "MHA_OPTIONS",
    "POLICIES",
    "DecomposeReport",
    "DecomposeWarning",
    "LayerPlan",
    "Skip",
    "SkipEntry",
    "compress",
    "decompose",
    "load_state_dict",
    "plan",
]
