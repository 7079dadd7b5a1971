"""Model conversion: dense → SVD (`decompose`, planned by `plan`), SVD → plain low-rank torch
(`compress`), and loading checkpoints of pruned SVD models (`load_state_dict`).

Example::

    print(svdkern.plan(model, skip=["fc"]))     # what decompose would convert, and why not
    model = svdkern.decompose(model, decomposition="channel", skip=["fc"])
    ...                                         # train with SVDRegularizer, prune
    deployable = svdkern.compress(model)        # plain nn.Linear / nn.Conv2d only
    svdkern.load_state_dict(fresh_svd_model, pruned_state_dict)   # ranks from the checkpoint
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from svdkern.layers import (
    example_call,
    format_table,
    lowrank_is_cheaper,
    trace_macs,
    uncompiled,
    uncompiled_name,
    weight_reads,
)
from svdkern.nn import (
    DECOMPOSITIONS,
    SVDConv1d,
    SVDConv2d,
    SVDLayer,
    SVDLinear,
    SVDMultiheadAttention,
    is_conv1d_like,
    svd_layers,
)

__all__ = [
    "DecomposeReport",
    "DecomposeWarning",
    "LayerPlan",
    "compress",
    "decompose",
    "load_state_dict",
    "plan",
]

SkipEntry = str | type | Callable[[str, nn.Module], bool]
Skip = SkipEntry | Iterable[SkipEntry] | None
POLICIES = ("flops", "latency", "lowrank", "dense")
MHA_OPTIONS = ("split", "fused", "skip")

# Hook tables moved from a replaced module to its SVD layer. The tables themselves move
# (not copies), so the RemovableHandles the user holds still remove their hooks.
_CALL_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)
# State-dict hooks refer to the dense layer's keys (weight, bias), which an SVD layer
# does not have: they are dropped, and named in the report.
_STATE_HOOKS = (
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_MAX_LISTED = 20
# Set by decompose (given example inputs) on an SVD layer whose weight its parent reads:
# compress keeps such a layer dense even without an example of its own.
_READ_MARK = "_svdkern_weight_read"
# Policy "latency" compares whole models: a candidate within this fraction of the all-dense
# model's time at an input counts as not slower there. Identical models measure up to ~3%
# apart in one interleaved timing (the deploy benchmark's dense-copy rows), so a stricter
# rule rejects, by noise alone, a model that ties at batch 1 and is 17% faster at 256.
_TIE = 0.02
# Each timed round of a whole model lasts at least this long (a few calls at batch 1).
_MODEL_ROUND_S = 0.02


# --- the plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPlan:
    """What `decompose` does with one layer a user would expect it to convert.

    name: qualified name (as in `model.named_modules()`; "" for the model itself).
    kind: the module's class name (e.g. "Linear", "Conv1D", "MultiheadAttention").
    target: the SVD layer it becomes (e.g. "SVDLinear", "SVDConv2d/channel"), or None
        when it is left as it is.
    reason: why it is left as it is; for a converted layer, what to know about it
        (read through .weight by its parent, hooks dropped), else "".
    skipped: True when the `skip` argument left it.
    """

    name: str
    kind: str
    target: str | None
    reason: str = ""
    skipped: bool = False


@dataclass
class DecomposeReport:
    """Every layer `decompose` converts or leaves, with the reason (`svdkern.plan` returns it).

    `converted` and `left` split `layers`; `notes` are the converted layers that carry a
    remark; `str(report)` is a table. The warning `decompose` emits carries the same
    report as its `.report` attribute.
    """

    decomposition: str
    mha: str
    layers: list[LayerPlan]
    # Per distinct module to convert: (name, module, [(parent or None, attribute)], target,
    # why its weight is read by its parent or None).
    _todo: list = field(default_factory=list, repr=False, compare=False)
    _lazy: list = field(default_factory=list, repr=False, compare=False)

    @property
    def converted(self) -> list[LayerPlan]:
        return [p for p in self.layers if p.target is not None]

    @property
    def left(self) -> list[LayerPlan]:
        return [p for p in self.layers if p.target is None]

    @property
    def notes(self) -> list[LayerPlan]:
        return [p for p in self.layers if p.target is not None and p.reason]

    def __str__(self) -> str:
        head = (
            f"decompose plan (decomposition={self.decomposition!r}, mha={self.mha!r}): "
            f"{len(self.converted)} converted, {len(self.left)} left"
        )
        rows = [
            (p.name or "(model)", p.kind, p.target or "left as it is", p.reason or "-")
            for p in self.layers
        ]
        if not rows:
            return head
        table = format_table(("layer", "kind", "becomes", "reason / note"), rows)
        return "\n".join([head, *(line.rstrip() for line in table.splitlines())])


class DecomposeWarning(UserWarning):
    """The one summary warning of a `decompose` call; `.report` is its `DecomposeReport`."""

    def __init__(self, message: str, report: DecomposeReport | None = None) -> None:
        super().__init__(message)
        self.report = report


def _glob(entry: str) -> bool:
    return any(c in entry for c in "*?[")


def _skip_entries(model: nn.Module, skip: Skip, compiled: bool = False) -> list[SkipEntry]:
    """`skip` as a list of entries; plain names not in `model` and globs matching none of
    its modules raise. `compiled`: `model` is what torch.compile wrapped, and names may
    carry its "_orig_mod." prefix."""
    if skip is None:
        return []
    if isinstance(skip, (str, type)) or (callable(skip) and not isinstance(skip, Iterable)):
        entries = [skip]
    else:
        entries = list(skip)
    for entry in entries:
        if not isinstance(entry, (str, type)) and not callable(entry):
            raise TypeError(
                "skip entries must be qualified names, globs ('*.attn.*'), module types "
                f"(nn.Conv1d) or predicates (name, module) -> bool; got {entry!r}"
            )
    if compiled:
        entries = [uncompiled_name(e) if isinstance(e, str) else e for e in entries]
    names = {e for e in entries if isinstance(e, str) and not _glob(e)}
    known = [name for name, _ in model.named_modules(remove_duplicate=False)]
    unknown = sorted(names - set(known))
    unmatched = [
        e for e in entries if isinstance(e, str) and _glob(e) and not fnmatch.filter(known, e)
    ]
    if unknown or unmatched:
        layers = [name for name, m in model.named_modules() if name and _is_candidate(m)]
        listed = layers[:_MAX_LISTED] + (["..."] if len(layers) > _MAX_LISTED else [])
        what = []
        if unknown:
            what.append(f"names modules that are not in the model: {unknown}")
        if unmatched:
            what.append(f"has globs that match no module of the model: {unmatched}")
        raise ValueError(
            f"skip {' and '.join(what)}; use qualified names as in model.named_modules() "
            f"or globs over them (the model's layers: {listed})"
        )
    return entries


def _skip_match(entries: list[SkipEntry], name: str, module: nn.Module) -> str | None:
    """The first entry that skips `module` (named `name`), described; None if none does."""
    for entry in entries:
        if isinstance(entry, str):
            hit = fnmatch.fnmatchcase(name, entry) if _glob(entry) else name == entry
            if hit:
                return repr(entry)
        elif isinstance(entry, type):
            if isinstance(module, entry):
                return entry.__name__
        elif entry(name, module):
            return getattr(entry, "__name__", "predicate")
    return None


def _is_candidate(module: nn.Module) -> bool:
    """A layer a user would expect `decompose` to convert (or to say why not)."""
    return isinstance(
        module, (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)
    ) or is_conv1d_like(module)


def _uninitialized_lazy(module: nn.Module) -> bool:
    lazy = isinstance(module, torch.nn.modules.lazy.LazyModuleMixin)
    return lazy and module.has_uninitialized_params()


def _target(module: nn.Module, decomposition: str, mha: str) -> tuple[str | None, str]:
    """(SVD layer `module` becomes, "") or (None, why it is left as it is)."""
    kind = type(module).__name__
    if _uninitialized_lazy(module):
        return None, (
            "Lazy module with uninitialized parameters: run one forward pass first "
            "(model(example)) so that its shape is known"
        )
    norm_hooks = [
        type(h).__name__
        for h in module._forward_pre_hooks.values()
        if type(h).__name__ in ("WeightNorm", "SpectralNorm")
    ]
    if norm_hooks:
        return None, (
            f"{norm_hooks[0]} recomputes its weight before each forward; remove it "
            "(torch.nn.utils.remove_weight_norm / remove_spectral_norm) to decompose"
        )
    if torch.nn.utils.parametrize.is_parametrized(module):
        return None, (
            "parametrized (torch.nn.utils.parametrize); remove the parametrization "
            "(parametrize.remove_parametrizations(module, 'weight')) to decompose"
        )
    if type(module) is nn.Linear:
        return "SVDLinear", ""
    if is_conv1d_like(module):
        return "SVDLinear", ""
    if type(module) in (nn.Conv1d, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            return None, (
                f"groups={module.groups}, padding_mode={module.padding_mode!r}: the SVD "
                "convolutions need groups=1 and padding_mode='zeros'"
            )
        if type(module) is nn.Conv2d:
            return f"SVDConv2d/{decomposition}", ""
        return "SVDConv1d", ""
    if type(module) is nn.MultiheadAttention:
        if mha == "skip":
            return None, "mha='skip'"
        if mha == "fused" and not module._qkv_same_embed_dim:
            return None, (
                f"mha='fused' needs kdim == vdim == embed_dim (got kdim={module.kdim}, "
                f"vdim={module.vdim}, embed_dim={module.embed_dim}); use mha='split'"
            )
        return f"SVDMultiheadAttention/{mha}", ""
    if isinstance(module, nn.MultiheadAttention):
        return None, f"{kind} is a subclass of nn.MultiheadAttention (its forward may differ)"
    if isinstance(module, nn.Linear):
        return None, f"{kind} is a subclass of nn.Linear (its forward may differ from F.linear)"
    for base in (nn.Conv1d, nn.Conv2d):
        if isinstance(module, base):
            return None, f"{kind} is a subclass of nn.{base.__name__} (its forward may differ)"
    return None, f"no SVD layer for {kind}"


def _tie(module: nn.Module, owners: dict[int, list[tuple[str, nn.Module, str]]]) -> str:
    """ "" or why `module` must stay dense: one of its parameters is the same Parameter
    object as a parameter of a module outside it."""
    inside = {id(m) for m in module.modules()}
    for pname, p in module.named_parameters(remove_duplicate=False):
        for oname, owner, opname in owners.get(id(p), ()):
            if id(owner) not in inside:
                where = f"{oname}.{opname}" if oname else opname
                return (
                    f"its {pname} is tied to {where!r} ({type(owner).__name__}): left dense "
                    "so the tie holds"
                )
    return ""


def plan(
    model: nn.Module,
    decomposition: str = "channel",
    skip: Skip = None,
    *,
    example_inputs=None,
    example_kwargs: Mapping | None = None,
    mha: str = "split",
) -> DecomposeReport:
    """What `decompose` with the same arguments would do, without changing the model.

    Lists every layer a user would expect converted (nn.Linear and its subclasses, every
    convolution, transformers' Conv1D, nn.MultiheadAttention), each with its SVD target or
    the reason it is left as it is; see `decompose` for the rules.

    Returns:
        a `DecomposeReport`; `print(report)` shows the table.

    Example::

        report = svdkern.plan(model, skip=["*.lm_head"], example_inputs=(ids,))
        [(p.name, p.reason) for p in report.left]
    """
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {DECOMPOSITIONS}, got {decomposition!r}")
    if mha not in MHA_OPTIONS:
        raise ValueError(f"mha must be one of {MHA_OPTIONS}, got {mha!r}")
    compiled = uncompiled(model) is not model
    model = uncompiled(model)
    entries = _skip_entries(model, skip, compiled)
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mname, module, pname))

    # Every place each candidate occurs: (parent or None, attribute, qualified name, skip).
    places: dict[int, list[tuple[nn.Module | None, str, str, str | None]]] = {}
    found: dict[int, nn.Module] = {}

    def walk(parent: nn.Module | None, attr: str, name: str, module: nn.Module, by) -> None:
        by = by or _skip_match(entries, name, module)
        if isinstance(module, SVDLayer):
            return
        if _is_candidate(module):
            found.setdefault(id(module), module)
            places.setdefault(id(module), []).append((parent, attr, name, by))
            return
        for child_name, child in module._modules.items():
            if child is not None:
                child_full = f"{name}.{child_name}" if name else child_name
                walk(module, child_name, child_full, child, by)

    walk(None, "", "", model, None)

    reads = {}
    lazy = any(
        _uninitialized_lazy(m) for key, m in found.items() if all(w[3] is None for w in places[key])
    )
    # With uninitialized Lazy modules decompose raises; the example forward would
    # initialize them behind the user's back, so it is not run.
    if not lazy and (example_inputs is not None or example_kwargs is not None):
        args, kwargs = example_call(model, None, example_inputs, example_kwargs)
        reads = weight_reads(model, args, kwargs)

    report = DecomposeReport(decomposition, mha, [])
    for key, module in found.items():
        where = places[key]
        name = where[0][2]
        kind = type(module).__name__
        by = next((w for w in where if w[3] is not None), None)
        if by is not None:
            under = "" if by[2] == name else f" (shared with {by[2]!r})"
            reason = f"skipped by skip entry {by[3]}{under}"
            report.layers.append(LayerPlan(name, kind, None, reason, skipped=True))
            continue
        target, reason = _target(module, decomposition, mha)
        if target is None:
            if _uninitialized_lazy(module):
                report._lazy.append((name, kind))
            report.layers.append(LayerPlan(name, kind, None, reason))
            continue
        tie = _tie(module, owners)
        if tie:
            report.layers.append(LayerPlan(name, kind, None, tie))
            continue
        notes = []
        read = reads.get(name) or (
            reads.get(f"{name}.out_proj") if isinstance(module, nn.MultiheadAttention) else None
        )
        if read:
            notes.append(
                f"{read}: the SVD layer serves the composed weight (no low-rank "
                "saving there); compress keeps it dense"
            )
        state_hooks = [h for a in _STATE_HOOKS for h in getattr(module, a, {}).values()]
        if state_hooks:
            names = [getattr(h, "__name__", type(h).__name__) for h in state_hooks]
            notes.append(f"state-dict hooks {names} are dropped (they refer to weight/bias)")
        report.layers.append(LayerPlan(name, kind, target, "; ".join(notes)))
        report._todo.append((name, module, [(w[0], w[1]) for w in where], target, read))
    return report


# --- decompose ---------------------------------------------------------------------------


def _build(module: nn.Module, target: str, decomposition: str, mha: str) -> nn.Module:
    if target == "SVDLinear":
        return SVDLinear.from_dense(module)
    if target.startswith("SVDConv2d"):
        return SVDConv2d.from_dense(module, decomposition=decomposition)
    if target == "SVDConv1d":
        return SVDConv1d.from_dense(module)
    return SVDMultiheadAttention.from_dense(module, in_proj=mha)


def _freeze_like(layer: SVDLayer, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    if weight is not None:
        for p in (layer.U, layer.s, layer.V):
            p.requires_grad_(weight.requires_grad)
    if bias is not None and layer.bias is not None:
        layer.bias.requires_grad_(bias.requires_grad)


def _carry_requires_grad(dense: nn.Module, new: nn.Module) -> None:
    """A frozen dense parameter freezes the SVD parameters made from it (U, s, V, bias)."""
    if isinstance(new, SVDLayer):
        _freeze_like(new, dense.weight, getattr(dense, "bias", None))
        return
    same = getattr(dense, "_qkv_same_embed_dim", True)
    for child_name, child in new.named_children():
        if not isinstance(child, SVDLayer):
            continue
        if child_name == "out_proj":
            _freeze_like(child, dense.out_proj.weight, dense.out_proj.bias)
        elif child_name == "in_proj" or same:
            _freeze_like(child, dense.in_proj_weight, dense.in_proj_bias)
        else:
            _freeze_like(child, getattr(dense, f"{child_name[0]}_proj_weight"), dense.in_proj_bias)
    for pname, p in new.named_parameters(recurse=False):
        source = getattr(dense, pname, None)
        if isinstance(source, torch.Tensor):
            p.requires_grad_(source.requires_grad)


def _move_hooks(dense: nn.Module, new: nn.Module) -> None:
    for attr in _CALL_HOOKS:
        table = getattr(dense, attr, None)
        if table is not None:
            setattr(new, attr, table)
            setattr(dense, attr, type(table)())
    new._is_full_backward_hook = dense._is_full_backward_hook


def _non_finite(todo: list) -> list[str]:
    """The weights (parameters of 2 or more dims) of the layers to convert that hold NaN or
    inf, described ("'fc.weight' (3 NaN, 0 inf of 16)")."""
    bad = []
    for name, module, *_ in todo:
        for pname, p in module.named_parameters():
            if p.dim() < 2 or p.device.type == "meta" or bool(torch.isfinite(p.detach()).all()):
                continue
            nan, inf = int(p.detach().isnan().sum()), int(p.detach().isinf().sum())
            where = f"{name}.{pname}" if name else pname
            bad.append(f"{where!r} ({nan} NaN, {inf} inf of {p.numel()})")
    return bad


def _listed(plans: list[LayerPlan]) -> str:
    text = "; ".join(f"{p.name or '(model)'} ({p.kind}): {p.reason}" for p in plans[:_MAX_LISTED])
    extra = len(plans) - _MAX_LISTED
    return text + (f"; and {extra} more" if extra > 0 else "")


def _summary(report: DecomposeReport) -> str | None:
    """The text of the one warning of a decompose call; None when there is nothing to say
    (everything converted, or left by the user's own skip)."""
    surprising = [p for p in report.left if not p.skipped]
    notes = report.notes
    if not surprising and not notes:
        return None
    parts = []
    if surprising:
        parts.append(f"{len(surprising)} layer(s) left as they are: {_listed(surprising)}")
    if notes:
        parts.append(f"{len(notes)} converted layer(s) to know about: {_listed(notes)}")
    skipped = sum(p.skipped for p in report.left)
    tail = f" ({skipped} more left by skip.)" if skipped else ""
    return (
        f"decompose converted {len(report.converted)} layer(s); "
        + ". ".join(parts)
        + f".{tail} The full list: svdkern.plan(model, ...) or this warning's .report."
    )


def decompose(
    model: nn.Module,
    decomposition: str = "channel",
    skip: Skip = None,
    *,
    example_inputs=None,
    example_kwargs: Mapping | None = None,
    mha: str = "split",
) -> nn.Module:
    """Replace every dense layer of `model` by its exact SVD layer, in place.

    Each weight is factorized at full rank by a float64 SVD (cast back to the weight's
    dtype), so the model computes the same function. Converted:

        nn.Linear                        → SVDLinear
        transformers' Conv1D (x·W + b)   → SVDLinear (W of shape (in, out) transposed)
        nn.Conv2d                        → SVDConv2d (`decomposition`)
        nn.Conv1d                        → SVDConv1d (channel decomposition)
        nn.MultiheadAttention            → SVDMultiheadAttention (`mha`)

    Every other layer a user might expect converted is left as it is with a reason:
    skipped by `skip`; subclasses of these classes (their forward may differ); grouped
    convolutions or padding modes other than "zeros"; ConvTranspose / Conv3d; weight-norm,
    spectral-norm or parametrized layers; layers tied to another module (below). One
    `DecomposeWarning` per call lists them (layers left by `skip` are only counted) and
    carries the `DecomposeReport` as `.report`; `svdkern.plan(...)` returns the same
    report without changing the model.

    Tied parameters (one Parameter object in two modules: two Linears sharing a weight,
    an LM head whose weight is the input embedding's): every module holding it is left
    dense, so the tie holds exactly and transformers' `tie_weights()` (which does
    `output_embeddings.weight = input_embeddings.weight`) keeps working. Decomposing
    once and sharing U, s, V cannot express a tie to a non-matrix module (an embedding's
    rows are read by index, not through U·diag(s)·Vᵀ), and a shared factorization would
    come apart at the first rank cut (`prune_` and `load_state_dict` give each layer new
    factors). A module object used at several places (the same nn.Linear twice) is
    converted once and stays shared.

    Frozen parameters stay frozen: U, s, V take the weight's requires_grad, the bias its
    own. Forward hooks, forward pre-hooks and backward hooks move to the SVD layer
    (handles the user holds still remove them); state-dict hooks are dropped and named.
    Lazy modules with uninitialized parameters raise a ValueError (run one forward first).

    With `example_inputs`, eval forwards of the example (`svdkern.layers.weight_reads`)
    find the layers whose weight their parent reads directly (`F.linear(x, self.qkv.weight,
    self.qkv.bias)`, nn.TransformerEncoderLayer's fast path): they are converted (an SVD
    layer exposes `.weight`, the composed U·diag(s)·Vᵀ) and listed, and `compress` keeps
    them dense.

    Args:
        model: the model; modified in place.
        decomposition: "channel" or "spatial", for the 2-D convolutions (DESIGN.md §4).
        skip: one entry or a list mixing qualified names as in `model.named_modules()`
            (unknown names raise), globs matched with fnmatch on qualified names
            ("*.attn.*", "lm_head"; a glob matching no module raises), module types
            (nn.Conv2d), and predicates `(name, module) -> bool`. A skipped module also
            skips everything under it. For a `torch.compile`d model the names are those of
            the model it wraps ("0"; "_orig_mod.0" is accepted too), as in the report.
        example_inputs: a tensor or a tuple of the model's positional arguments (any
            dtype, e.g. Long token ids), for the weight-read check.
        example_kwargs: keyword arguments of that forward.
        mha: how nn.MultiheadAttention is converted: "split" (q, k, v projections as three
            SVDLinear), "fused" (one SVDLinear for the packed in_proj; needs kdim == vdim ==
            embed_dim) or "skip" (left dense).
    Returns:
        `model` (or the new SVD layer when `model` itself is a converted layer).
    Raises:
        ValueError for an unknown `decomposition`, `mha` or skip name, a skip glob that
        matches no module, a Lazy module that has not run a forward yet, or a layer to
        convert whose weight holds NaN or inf (named; checked before any SVD).

    Example::

        model = svdkern.decompose(resnet, "channel", skip=["fc"])
        gpt = svdkern.decompose(gpt, skip=["*.attn.*", nn.Conv1d], example_inputs=(ids,))
    """
    report = plan(
        model,
        decomposition,
        skip,
        example_inputs=example_inputs,
        example_kwargs=example_kwargs,
        mha=mha,
    )
    if report._lazy:
        listed = ", ".join(f"{name or '(model)'} ({kind})" for name, kind in report._lazy)
        raise ValueError(
            f"decompose: {listed} has uninitialized parameters; run one forward pass "
            "(model(example_input)) before decompose so that their shapes are known, or "
            "skip them"
        )
    bad = _non_finite(report._todo)
    if bad:
        raise ValueError(
            f"decompose: the weights {', '.join(bad)} are not finite, so they have no SVD; "
            "fix or reinitialize them (e.g. reload a checkpoint saved before training "
            "diverged) or leave those layers dense with skip=[...]"
        )
    root = model
    failed: dict[str, str] = {}
    for name, dense, where, target, read in report._todo:
        try:
            new = _build(dense, target, decomposition, mha)
        except (TypeError, ValueError) as err:
            failed[name] = str(err)
            continue
        _carry_requires_grad(dense, new)
        _move_hooks(dense, new)
        if read:
            for layer in new.modules():
                if isinstance(layer, SVDLayer):
                    layer.__dict__[_READ_MARK] = read
        for parent, attr in where:
            if parent is None:
                root = new
            else:
                setattr(parent, attr, new)
    report._todo.clear()  # the report outlives the call: hold no dense modules
    if failed:
        report.layers = [
            LayerPlan(p.name, p.kind, None, failed[p.name]) if p.name in failed else p
            for p in report.layers
        ]
    message = _summary(report)
    if message is not None:
        warnings.warn(DecomposeWarning(message, report), stacklevel=2)
    return root


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


def _latency_examples(
    model: nn.Module, input_shape, example_inputs, example_kwargs
) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) of every forward policy "latency" times: one per input shape (a
    random float input of the model's dtype) or the one example."""
    if input_shape is None and example_inputs is None:
        raise ValueError(
            "policy='latency' needs input_shape (one shape or a list, e.g. [(1, 3, 32, 32), "
            "(256, 3, 32, 32)]) or example_inputs: forms are timed at the inputs the model "
            "will see"
        )
    if example_inputs is not None:
        if input_shape is not None:
            raise ValueError("pass input_shape or example_inputs, not both")
        return [example_call(model, example_inputs=example_inputs, example_kwargs=example_kwargs)]
    first = next(iter(model.parameters()), None)
    factory = {"device": first.device, "dtype": first.dtype} if first is not None else {}
    return [((torch.randn(shape, **factory),), {}) for shape in _shapes(input_shape)]


def _latency_forms(model: nn.Module, examples: list[tuple[tuple, dict]]) -> dict[str, bool]:
    """{layer name: deploy the low-rank pair?} from measured forward times (tune_forms with
    training=False) at every example: the pair only where it is faster at all."""
    from svdkern.tune import tune_forms

    lowrank: dict[str, bool] = {}
    for args, kwargs in examples:
        report = tune_forms(model, args, training=False, example_kwargs=kwargs)
        for lay in report.layers:
            lowrank[lay.name] = lowrank.get(lay.name, True) and lay.form == "lowrank"
    return lowrank


def _plain_like(twin: nn.Module, plain: nn.Module) -> nn.Module:
    """`plain` with `twin`'s hooks and, for an SVD layer, its frozen flags: a frozen U
    freezes every weight of the plain form, a frozen bias its bias."""
    _move_hooks(twin, plain)
    if isinstance(twin, SVDLayer):
        for pname, p in plain.named_parameters():
            source = twin.bias if pname.endswith("bias") else twin.U
            p.requires_grad_(source.requires_grad)
    return plain


def compress(
    model: nn.Module,
    policy: str = "flops",
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
    *,
    example_inputs=None,
    example_kwargs: Mapping | None = None,
) -> nn.Module:
    """A new model (deep copy) in which every SVD layer is a plain torch module.

    Each SVDLinear becomes nn.Sequential(Linear(in, r, bias=False), Linear(r, out)), each
    SVDConv2d / SVDConv1d the pair of convolutions of its chain (s folded into the first
    factor), or a single dense nn.Linear / nn.Conv2d / nn.Conv1d. An SVDMultiheadAttention
    whose projections all go dense becomes an nn.MultiheadAttention again; otherwise it
    stays, holding plain projections. Without SVDMultiheadAttention the result needs no
    svdkern import to run and works with torch.jit.script / trace and torch.export. Hooks
    of an SVD layer move to its plain form, and a frozen layer's plain form is frozen.
    Hooks svdkern itself registered are not kept, such as the input hook of
    `svdkern.set_memory_format(model, "channels_last")`: weights keep their memory format,
    and the layout of the inputs is the caller's (`x.contiguous(memory_format=
    torch.channels_last)`). The global random state (CPU, and the model's CUDA devices)
    is left as compress found it.

    A layer whose weight its parent reads directly (`F.linear(x, self.qkv.weight, ...)`)
    becomes one dense layer under every policy, so that `.weight` still exists (a pair
    would make the parent fail, and composing the weight saves nothing). Such reads are
    found on the example (input_shape or example_inputs; `svdkern.layers.weight_reads`, the
    list `flops` and `prune` count with), or were found by `decompose` given example inputs.

    Args:
        model: a model with SVD layers (left unchanged).
        policy: "flops" (low-rank pair where it costs fewer MACs than dense, else dense),
            "latency" (measured on the model's device at every input_shape: three whole
            models are timed, the one with the low-rank pair where that layer's forward
            alone was ≥ 5% faster than dense (`svdkern.tune_forms`), the one the "flops"
            rule builds, and the all-dense one; the fastest on average among those not
            slower than the all-dense one at any input_shape (by more than 2%, the
            resolution of one timing) is returned if a second timing against the
            all-dense one confirms that),
            "lowrank" (always the pair) or "dense" (always one dense layer).
        input_shape: input shape for the MAC comparison of policy "flops" (see
            `svdkern.flops`; a zero float input of the model's dtype); without it, the
            comparison is per output element (exact for Linear and channel convs;
            spatial convs assume W_in = stride·W_out). Policy "latency" needs it (or
            example_inputs) and also takes a list of shapes (e.g. batch 1 and batch 256)
            to be fast at all of them.
        example_inputs: instead of input_shape, a tensor or a tuple of the model's
            positional arguments (any dtype, e.g. Long token ids).
        example_kwargs: keyword arguments of that forward.
    Returns:
        the new model; outputs equal the SVD model's up to float rounding.

    Example::

        deployable = svdkern.compress(model, input_shape=(1, 3, 32, 32))
        torch.jit.script(deployable)
        fast = svdkern.compress(model, "latency", [(1, 3, 32, 32), (256, 3, 32, 32)])
        lm = svdkern.compress(gpt, example_inputs=(ids,), example_kwargs={"use_cache": False})
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    tensors = [*model.parameters(), *model.buffers()]
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    # The plain layers' constructors and the latency policy's inputs draw random numbers.
    with torch.random.fork_rng(devices=cuda):
        deployed = _compress(model, policy, input_shape, example_inputs, example_kwargs)
    return _without_svdkern_hooks(deployed)


def _compress(
    model: nn.Module,
    policy: str,
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None,
    example_inputs,
    example_kwargs: Mapping | None,
) -> nn.Module:
    """`compress` (arguments checked), svdkern's hooks still in place: the latency policy
    times the candidates as the SVD model runs (channels-last inputs under
    set_memory_format)."""
    has_example = not (input_shape is None and example_inputs is None and example_kwargs is None)
    reads: dict[str, str] = {}
    shapes: dict[str, list[tuple[int, ...]]] = {}
    if has_example:
        first = input_shape
        if policy == "latency" and input_shape is not None:
            first = _shapes(input_shape)[0]
        trace = trace_macs(
            model, first, example_inputs=example_inputs, example_kwargs=example_kwargs
        )
        reads = trace.reasons
        shapes = trace.shapes
    examples = (
        _latency_examples(model, input_shape, example_inputs, example_kwargs)
        if policy == "latency"
        else []
    )
    measured = _latency_forms(model, examples) if policy == "latency" else {}

    def lowrank_of(rule: str) -> Callable[[str, SVDLayer], bool]:
        def choose(name: str, layer: SVDLayer) -> bool:
            if name in reads or layer.__dict__.get(_READ_MARK):
                return False
            if rule == "latency":
                return measured.get(name, False)
            if rule == "flops":
                return lowrank_is_cheaper(layer, shapes.get(name))
            return rule == "lowrank"

        return choose

    if policy != "latency":
        return _deployed(model, lowrank_of(policy))
    # Layers timed alone do not add up to the model's time (caches, one more op per layer
    # at batch 1): the per-layer choice, the MAC rule's and the all-dense model are timed
    # whole at every example, and the fastest that is nowhere slower than dense (by more
    # than _TIE) is kept.
    candidates = {rule: _deployed(model, lowrank_of(rule)) for rule in ("latency", "flops")}
    candidates["dense"] = _deployed(model, lowrank_of("dense"))
    return _fastest_not_slower(candidates, examples)


def _fastest_not_slower(
    candidates: dict[str, nn.Module], examples: list[tuple[tuple, dict]]
) -> nn.Module:
    """The candidate with the lowest mean time ratio to `candidates["dense"]` among those
    no slower than it at any example (within _TIE; the dense one itself qualifies); timed
    interleaved. The winner is timed once more against dense and kept only if that
    confirms it: the fastest of several noisy timings is biased fast (its own noise helped
    it win), and a fresh timing has no such bias."""
    from svdkern.tune import time_models

    best = _fastest(time_models(candidates, examples, round_s=_MODEL_ROUND_S))
    if best != "dense":
        pair = {best: candidates[best], "dense": candidates["dense"]}
        best = _fastest(time_models(pair, examples, round_s=_MODEL_ROUND_S))
    return candidates[best]


def _fastest(times: dict[str, list[float]]) -> str:
    """The name with the lowest mean ratio to times["dense"] below 1, nowhere above
    1 + _TIE ("dense" when none is)."""
    dense = times["dense"]
    best, best_mean = "dense", 1.0
    for name, ms in times.items():
        ratios = [t / d for t, d in zip(ms, dense, strict=True)]
        mean = sum(ratios) / len(ratios)
        if max(ratios) <= 1.0 + _TIE and mean < best_mean:
            best, best_mean = name, mean
    return best


def _deployed(model: nn.Module, lowrank_of: Callable[[str, SVDLayer], bool]) -> nn.Module:
    """A deep copy of `model` with every SVD layer replaced by its low-rank pair (where
    `lowrank_of(name, layer)`) or its dense layer; see `compress`."""
    new = copy.deepcopy(model)
    plain: dict[int, nn.Module] = {}
    dense_names: set[str] = set()
    for (name, layer), (_, twin) in zip(svd_layers(model), svd_layers(new), strict=True):
        lowrank = lowrank_of(name, layer)
        if not lowrank:
            dense_names.add(name)
        plain[id(twin)] = _plain_like(twin, twin.to_lowrank() if lowrank else twin.to_dense())
    for name, twin in new.named_modules():
        if not isinstance(twin, SVDMultiheadAttention):
            continue
        prefix = f"{name}." if name else ""
        children = [(prefix + n, c) for n, c in twin.named_modules() if c is not twin]
        svd = [(n, c) for n, c in children if isinstance(c, SVDLayer)]
        if all(n in dense_names for n, _ in svd):
            for _, child in svd:
                plain.pop(id(child), None)
            plain[id(twin)] = _plain_like(twin, twin.to_dense())
    if id(new) in plain:
        return plain[id(new)]
    for _, parent in list(new.named_modules()):
        for child_name, child in list(parent._modules.items()):
            if id(child) in plain:
                setattr(parent, child_name, plain[id(child)])
    return new


def _without_svdkern_hooks(model: nn.Module) -> nn.Module:
    """`model` with the hooks whose function svdkern defines (set_memory_format's input
    hook) removed from every module: they would make the deployed model need svdkern
    (pickle) and fail torch.jit.script."""
    tables = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    flags = (
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
    )
    for module in model.modules():
        for attr in tables:
            table = getattr(module, attr)
            for key, hook in list(table.items()):
                if (getattr(hook, "__module__", None) or "").split(".")[0] == "svdkern":
                    del table[key]
                    for flag in flags:
                        getattr(module, flag).pop(key, None)
    return model


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
            for key, t, size in (("U", U, layer._m), ("V", V, layer._n))
            if t.shape[0] != size
        ]
        if len(s) > layer.full_rank:
            bad.append(
                f"checkpoint {prefix}s has rank {len(s)} but SVD layer {name!r} has full "
                f"rank {layer.full_rank}"
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
    nothing) and is then undone: every module's parameters, buffers and form cache are put
    back as they were."""
    state_dict = _own_copy(state_dict)
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    forms = {layer: dict(layer._forms) for layer in resize}
    try:
        for layer, rank in resize.items():
            layer._resize_(rank)
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
        for layer, cache in forms.items():
            layer._forms.clear()
            layer._forms.update(cache)


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
        layer._resize_(rank)
    return model.load_state_dict(_own_copy(state_dict), strict=strict)
