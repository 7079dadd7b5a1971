"""The user's model under torch.compile's wrapper: the verbs that take layer names (`prune`,
`decompose`, `plan`) use the names of the model `torch.compile` wraps ("0", not
"_orig_mod.0").

Example::

    model = uncompiled(torch.compile(net))      # net
    uncompiled_name("_orig_mod.blocks.0")       # "blocks.0"
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["uncompiled", "uncompiled_name"]

_COMPILED_PREFIX = "_orig_mod."


def uncompiled(model: nn.Module) -> nn.Module:
    """The module `torch.compile(model)` wraps (unwrapped repeatedly), else `model`."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # no compiled module without it
    while eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        model = model._orig_mod
    return model


def uncompiled_name(name: str) -> str:
    """A layer name or glob of a compiled model ("_orig_mod.0") as the wrapped model's ("0")."""
    while name.startswith(_COMPILED_PREFIX) or name == _COMPILED_PREFIX[:-1]:
        name = name[len(_COMPILED_PREFIX) :]
    return name
