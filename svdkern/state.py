"""Loading checkpoints of pruned SVD models: `load_state_dict` resizes every SVD layer to
the checkpoint's rank, then loads it as torch does, all or nothing.

Example::

    model = svdkern.decompose(make_model())
    svdkern.load_state_dict(model, torch.load("pruned.pt"))   # ranks from the checkpoint
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from svdkern.nn import SVDLayer, svd_layers

__all__ = ["load_state_dict"]


def _rank_problems(model: nn.Module, state_dict: Mapping) -> tuple[list[str], dict]:
    """(what does not fit, {SVD layer: checkpoint rank}) for the SVD layers whose U, s, V
    are all in `state_dict`; nothing is changed."""
    problems: list[str] = []
    resize: dict[SVDLayer, int] = {}
    for name, layer in svd_layers(model):
        prefix = f"{name}." if name else ""
        U, s, V = (state_dict.get(prefix + key) for key in ("U", "s", "V"))
        factors = {key: t for key, t in zip("UsV", (U, s, V), strict=True) if t is not None}
        if 0 < len(factors) < 3:
            absent = [prefix + key for key in "UsV" if key not in factors]
            problems.append(
                f"SVD layer {name!r}: the checkpoint has {[prefix + k for k in factors]} but "
                f"not {absent} (U, s and V go together)"
            )
            continue
        if not factors:
            continue  # reported with the other missing keys
        if not all(isinstance(t, torch.Tensor) for t in factors.values()):
            problems.append(f"SVD layer {name!r}: the checkpoint's U, s, V must be tensors")
            continue
        if s.dim() != 1 or U.dim() != 2 or V.dim() != 2 or not U.shape[1] == V.shape[1] == len(s):
            problems.append(
                f"checkpoint entries of SVD layer {name!r} disagree: U {list(U.shape)}, "
                f"s {list(s.shape)}, V {list(V.shape)} (expected U (m, r), s (r,), V (n, r))"
            )
            continue
        bad = [
            f"checkpoint {prefix}{key} has shape {list(t.shape)} but SVD layer {name!r} "
            f"({layer.extra_repr()}) expects ({size}, r): the checkpoint is of a different "
            "layer shape or decomposition"
            for key, t, size in zip("UV", (U, V), layer.matrix_shape, strict=True)
            if t.shape[0] != size
        ]
        if not 1 <= len(s) <= layer.full_rank:
            bad.append(
                f"checkpoint {prefix}s has rank {len(s)} but SVD layer {name!r} takes a rank "
                f"in [1, {layer.full_rank}] (its full rank)"
            )
        problems.extend(bad)
        if not bad and len(s) != layer.rank:
            resize[layer] = len(s)
    return problems, resize


def _own_copy(state_dict: Mapping) -> OrderedDict:
    """A shallow copy of `state_dict` with its own `_metadata`, without assign flags.

    nn.Module.load_state_dict writes `assign=True` into the metadata of the dict it loads,
    and every later load of that dict then assigns (the model would share the checkpoint's
    tensors); loading a copy leaves the caller's dict as it was, and a load copies into
    the model's own tensors."""
    own = OrderedDict(state_dict)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        own._metadata = {
            prefix: {k: v for k, v in local.items() if k != "assign_to_params_buffers"}
            for prefix, local in metadata.items()
        }
    return own


def _trial_load(model: nn.Module, state_dict: Mapping, resize: dict) -> tuple[list, list, list]:
    """(missing keys, unexpected keys, other errors) of loading `state_dict` after resizing
    the layers in `resize`, found by a load that assigns the checkpoint's tensors (copying
    nothing) and is then undone: every module's parameters, buffers and fixed forms are put
    back as they were."""
    state_dict = _own_copy(state_dict)
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    forms = {layer: layer.forms for layer in resize}
    try:
        for layer, rank in resize.items():
            layer.resize_(rank)
        try:
            result = model.load_state_dict(state_dict, strict=False, assign=True)
        except RuntimeError as err:
            # torch lists its errors one per tab-indented line after a header line.
            lines = [line.strip().rstrip(".") for line in str(err).splitlines()[1:]]
            lines = [line for line in lines if line]
            return [], [], lines or [str(err)]
        return list(result.missing_keys), list(result.unexpected_keys), []
    finally:
        for m, params, buffers in saved:
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
        for layer, fixed in forms.items():
            layer.clear_forms()
            for (training, shape), chain in fixed.items():
                layer.set_form(shape, chain, training=training)


def load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Load a (possibly pruned) checkpoint, resizing SVD layers to the checkpoint's ranks.

    For every SVD layer whose `s` in `state_dict` has another length than the layer's rank
    (lower, or higher up to its full rank), U, s and V are replaced by new Parameters of
    the checkpoint's rank, in the model's dtype and on its device; then
    `model.load_state_dict(state_dict, strict)` copies the values, as torch does: the model
    shares no storage with `state_dict`, keeps its dtypes, devices and tied parameters, and
    `state_dict` (its `_metadata` included) is left unchanged. Rebuild optimizers after
    (an optimizer state saved at the checkpoint's ranks then loads).

    All or nothing: the whole checkpoint is checked first (factor shapes and ranks, every
    key's shape, and with strict=True missing and unexpected keys), and when anything does
    not fit, the model is left exactly as it was (no layer resized, no tensor loaded).

    Returns:
        the result of `model.load_state_dict` (missing and unexpected keys).
    Raises:
        ValueError naming every key or SVD layer that does not fit: U or V of another
        in/out size (a different architecture or decomposition), U, s, V ranks that
        disagree or exceed the layer's full rank, shape mismatches, and with strict=True
        missing or unexpected keys.

    Example::

        model = svdkern.decompose(make_model())
        svdkern.load_state_dict(model, torch.load("pruned.pt"))
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping of key to tensor, got {type(state_dict).__name__}"
        )
    problems, resize = _rank_problems(model, state_dict)
    if not problems:
        missing, unexpected, errors = _trial_load(model, state_dict, resize)
        problems = errors
        if strict and missing:
            problems.append(f"missing keys {missing}")
        if strict and unexpected:
            problems.append(f"unexpected keys {unexpected}")
    if problems:
        fix = " (or strict=False to skip missing and unexpected keys)" if strict else ""
        raise ValueError(
            f"svdkern.load_state_dict: the checkpoint does not fit {type(model).__name__}, "
            f"nothing was loaded: {'; '.join(problems)}; load a checkpoint of this "
            f"architecture and decomposition{fix}"
        )
    for layer, rank in resize.items():
        layer.resize_(rank)
    return model.load_state_dict(_own_copy(state_dict), strict=strict)
