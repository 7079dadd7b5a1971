"""Model conversion: dense → SVD (`decompose`), SVD → plain low-rank torch (`compress`),
and loading checkpoints of pruned SVD models (`load_state_dict`).

Example::

    model = svdkern.decompose(model, decomposition="channel", skip=["fc"])
    ...                                         # train with SVDRegularizer, prune
    deployable = svdkern.compress(model)        # plain nn.Linear / nn.Conv2d only
    svdkern.load_state_dict(fresh_svd_model, pruned_state_dict)   # ranks from the checkpoint
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from svdkern.layers import layer_inputs, lowrank_is_cheaper
from svdkern.nn import DECOMPOSITIONS, SVDConv2d, SVDLinear, svd_layers

__all__ = ["compress", "decompose", "load_state_dict"]

Skip = Iterable[str] | Callable[[str, nn.Module], bool] | None
POLICIES = ("flops", "latency", "lowrank", "dense")


def _skip_predicate(model: nn.Module, skip: Skip) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, module: False
    if callable(skip):
        return skip
    names = {skip} if isinstance(skip, str) else set(skip)
    known = {name for name, _ in model.named_modules(remove_duplicate=False)}
    unknown = sorted(names - known)
    if unknown:
        raise ValueError(
            f"skip names modules that are not in the model: {unknown}; use qualified names "
            "as in model.named_modules(), e.g. 'layer1.0.conv1'"
        )

    def under(name: str, module: nn.Module) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in names for i in range(1, len(parts) + 1))

    return under


def _to_svd(name: str, module: nn.Module, decomposition: str) -> nn.Module | None:
    """The SVD replacement of `module`, or None to leave it as it is."""
    if type(module) is nn.Linear:
        return SVDLinear.from_dense(module)
    if type(module) is nn.Conv2d:
        if module.groups != 1 or module.padding_mode != "zeros":
            warnings.warn(
                f"decompose: leaving {name!r} dense (groups={module.groups}, "
                f"padding_mode={module.padding_mode!r}); SVDConv2d needs groups=1 and "
                "padding_mode='zeros'",
                UserWarning,
                stacklevel=3,
            )
            return None
        return SVDConv2d.from_dense(module, decomposition=decomposition)
    return None


def decompose(model: nn.Module, decomposition: str = "channel", skip: Skip = None) -> nn.Module:
    """Replace every nn.Linear and nn.Conv2d of `model` by its exact SVD layer, in place.

    Each weight is factorized at full rank by a float64 SVD (cast back to the weight's
    dtype), so the model computes the same function. Only exact nn.Linear / nn.Conv2d
    are replaced (subclasses, e.g. the out_proj of nn.MultiheadAttention, are left
    alone); grouped convs and padding modes other than "zeros" stay dense with a warning.

    Args:
        model: the model; modified in place.
        decomposition: "channel" or "spatial", for the convolutions (DESIGN.md §4).
        skip: qualified module names as in `model.named_modules()` (a name also skips
            everything under it), or a predicate `(name, module) -> bool`.
    Returns:
        `model` (or the new SVD layer when `model` itself is an nn.Linear / nn.Conv2d).

    Example::

        model = svdkern.decompose(resnet, "channel", skip=["fc"])
    """
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {DECOMPOSITIONS}, got {decomposition!r}")
    skipped = _skip_predicate(model, skip)
    if not skipped("", model):
        root = _to_svd("", model, decomposition)
        if root is not None:
            return root
    done: dict[int, nn.Module | None] = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if child is None or skipped(name, child):
                continue
            if id(child) not in done:
                done[id(child)] = _to_svd(name, child, decomposition)
            if done[id(child)] is not None:
                setattr(parent, child_name, done[id(child)])
    return model


def _shapes(input_shape) -> list[tuple[int, ...]]:
    """One input shape or a list of them, as a list of int tuples."""
    if input_shape and all(isinstance(d, int) and not isinstance(d, bool) for d in input_shape):
        return [tuple(input_shape)]
    if input_shape and all(
        isinstance(s, Sequence) and s and all(isinstance(d, int) for d in s) for s in input_shape
    ):
        return [tuple(s) for s in input_shape]
    raise ValueError(
        "input_shape must be one input shape, e.g. (1, 3, 32, 32), or a list of them, e.g. "
        f"[(1, 3, 32, 32), (256, 3, 32, 32)]; got {input_shape!r}"
    )


def _latency_forms(model: nn.Module, input_shape) -> dict[str, bool]:
    """{layer name: deploy the low-rank pair?} from measured forward times (tune_forms with
    training=False) at every given input shape: the pair only where it is faster at all."""
    from svdkern.tune import tune_forms

    if input_shape is None:
        raise ValueError(
            "policy='latency' needs input_shape (one shape or a list, e.g. [(1, 3, 32, 32), "
            "(256, 3, 32, 32)]): forms are timed at the inputs the model will see"
        )
    first = next(iter(model.parameters()), None)
    factory = {"device": first.device, "dtype": first.dtype} if first is not None else {}
    lowrank: dict[str, bool] = {}
    for shape in _shapes(input_shape):
        report = tune_forms(model, torch.randn(shape, **factory), training=False)
        for lay in report.layers:
            lowrank[lay.name] = lowrank.get(lay.name, True) and lay.form == "lowrank"
    return lowrank


def compress(
    model: nn.Module,
    policy: str = "flops",
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
) -> nn.Module:
    """A new model (deep copy) in which every SVD layer is a plain torch module.

    Each SVDLinear becomes nn.Sequential(Linear(in, r, bias=False), Linear(r, out)) and each
    SVDConv2d the pair of nn.Conv2d of its chain (s folded into the first factor), or a single
    dense nn.Linear / nn.Conv2d. The result needs no svdkern import to run and works with
    torch.jit.script / trace and torch.export.

    Args:
        model: a model with SVD layers (left unchanged).
        policy: "flops" (low-rank pair where it costs fewer MACs than dense, else dense),
            "latency" (low-rank pair where its forward was measured faster than the dense
            layer on the model's device at every input_shape, see `svdkern.tune_forms`;
            layers never called stay dense), "lowrank" (always the pair) or "dense"
            (always one dense layer).
        input_shape: input shape for the MAC comparison of policy "flops" (see
            `svdkern.flops`); without it, the comparison is per output element (exact
            for Linear and channel convs; spatial convs assume W_in = stride·W_out).
            Policy "latency" needs it and also takes a list of shapes (e.g. batch 1 and
            batch 256) to be fast at all of them.
    Returns:
        the new model; outputs equal the SVD model's up to float rounding.

    Example::

        deployable = svdkern.compress(model, input_shape=(1, 3, 32, 32))
        torch.jit.script(deployable)
        fast = svdkern.compress(model, "latency", [(1, 3, 32, 32), (256, 3, 32, 32)])
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    shapes = (
        layer_inputs(model, input_shape) if policy == "flops" and input_shape is not None else {}
    )
    measured = _latency_forms(model, input_shape) if policy == "latency" else {}
    new = copy.deepcopy(model)
    plain: dict[int, nn.Module] = {}
    for (name, layer), (_, twin) in zip(svd_layers(model), svd_layers(new), strict=True):
        if policy == "latency":
            lowrank = measured.get(name, False)
        elif policy == "flops":
            lowrank = lowrank_is_cheaper(layer, shapes.get(name))
        else:
            lowrank = policy == "lowrank"
        plain[id(twin)] = twin.to_lowrank() if lowrank else twin.to_dense()
    if id(new) in plain:
        return plain[id(new)]
    for _, parent in list(new.named_modules()):
        for child_name, child in list(parent._modules.items()):
            if id(child) in plain:
                setattr(parent, child_name, plain[id(child)])
    return new


def load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Load a (possibly pruned) checkpoint, resizing SVD layers to the checkpoint's ranks.

    For every SVD layer whose `s` in `state_dict` has another length than the layer's rank,
    U, s and V are replaced by new Parameters of the checkpoint's rank, then
    `model.load_state_dict(state_dict, strict)` loads the values. Rebuild optimizers after.

    Returns:
        the result of `model.load_state_dict` (missing and unexpected keys).
    Raises:
        ValueError naming the layer when the checkpoint's U or V do not fit its in/out size
        (a different architecture), or its U, s, V ranks disagree.

    Example::

        model = svdkern.decompose(make_model())
        svdkern.load_state_dict(model, torch.load("pruned.pt"))
    """
    for name, layer in svd_layers(model):
        prefix = f"{name}." if name else ""
        U, s, V = (state_dict.get(prefix + key) for key in ("U", "s", "V"))
        if s is None or U is None or V is None:
            continue
        expected = {"U": (layer._m, "r"), "V": (layer._n, "r")}
        if (
            s.dim() != 1
            or U.dim() != 2
            or V.dim() != 2
            or not (U.shape[1] == V.shape[1] == s.shape[0])
        ):
            raise ValueError(
                f"checkpoint entries of SVD layer {name!r} disagree: U {list(U.shape)}, "
                f"s {list(s.shape)}, V {list(V.shape)} (expected U (m, r), s (r,), V (n, r))"
            )
        for key, tensor in (("U", U), ("V", V)):
            if tensor.shape[0] != expected[key][0]:
                raise ValueError(
                    f"checkpoint {prefix}{key} has shape {list(tensor.shape)} but SVD layer "
                    f"{name!r} ({layer.extra_repr()}) expects ({expected[key][0]}, r): the "
                    "checkpoint is of a different layer shape or decomposition"
                )
        if s.shape[0] > layer.full_rank:
            raise ValueError(
                f"checkpoint {prefix}s has rank {s.shape[0]} but SVD layer {name!r} has full "
                f"rank {layer.full_rank}"
            )
        if s.shape[0] != layer.rank:
            layer._resize_(s.shape[0])
    return model.load_state_dict(state_dict, strict=strict)
