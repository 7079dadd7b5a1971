"""Dense → SVD: `decompose` replaces every dense layer of a model by its exact SVD layer;
`plan` says what it would convert and why it leaves the rest.

Example::

    print(svdkern.plan(model, skip=["fc"]))     # what decompose would convert, and why not
    model = svdkern.decompose(model, decomposition="channel", skip=["fc"])
    gpt = svdkern.decompose(gpt, example_inputs=(ids,))   # + layers read through .weight
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from svdkern.compiled import uncompiled, uncompiled_name
from svdkern.examples import Example
from svdkern.nn import (
    DECOMPOSITIONS,
    SVDConv1d,
    SVDConv2d,
    SVDLayer,
    SVDLinear,
    SVDMultiheadAttention,
    is_conv1d_like,
)
from svdkern.tables import format_table
from svdkern.trace import weight_reads

__all__ = [
    "MHA_OPTIONS",
    "DecomposeReport",
    "DecomposeWarning",
    "LayerPlan",
    "decompose",
    "move_hooks",
    "plan",
]

SkipEntry = str | type | Callable[[str, nn.Module], bool]
Skip = SkipEntry | Iterable[SkipEntry] | None
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
    mha: str = "split",
    **example: Any,
) -> DecomposeReport:
    """What `decompose` with the same arguments would do, without changing the model.

    Lists every layer a user would expect converted (nn.Linear and its subclasses, every
    convolution, transformers' Conv1D, nn.MultiheadAttention), each with its SVD target or
    the reason it is left as it is; see `decompose` for the rules and the arguments
    (`example`: its example keywords, input_shape, example_inputs, example_kwargs or
    example).

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
    given = Example.of(**example)
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
    if not lazy and given is not None:
        reads = weight_reads(model, given.single("plan"))

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


def move_hooks(dense: nn.Module, new: nn.Module) -> None:
    """Move `dense`'s forward, forward-pre and backward hooks to `new`, its replacement: the
    hook tables themselves move, so the handles the user holds still remove them."""
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
    mha: str = "split",
    input_shape: Sequence[int] | None = None,
    example_inputs=None,
    example_kwargs: Mapping | None = None,
    example: Example | None = None,
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

    With an example, eval forwards of it (`svdkern.trace.weight_reads`) find the layers
    whose weight their parent reads directly (`F.linear(x, self.qkv.weight, self.qkv.bias)`,
    nn.TransformerEncoderLayer's fast path): they are converted (an SVD layer exposes
    `.weight`, the composed U·diag(s)·Vᵀ), listed and marked (`SVDLayer.weight_read`), and
    `compress` keeps them dense.

    Args:
        model: the model; modified in place.
        decomposition: "channel" or "spatial", for the 2-D convolutions (docs/ARCHITECTURE.md §4).
        skip: one entry or a list mixing qualified names as in `model.named_modules()`
            (unknown names raise), globs matched with fnmatch on qualified names
            ("*.attn.*", "lm_head"; a glob matching no module raises), module types
            (nn.Conv2d), and predicates `(name, module) -> bool`. A skipped module also
            skips everything under it. For a `torch.compile`d model the names are those of
            the model it wraps ("0"; "_orig_mod.0" is accepted too), as in the report.
        mha: how nn.MultiheadAttention is converted: "split" (q, k, v projections as three
            SVDLinear), "fused" (one SVDLinear for the packed in_proj; needs kdim == vdim ==
            embed_dim) or "skip" (left dense).
        input_shape: the shape of one input batch (a zero float batch), for the
            weight-read check; or
        example_inputs: a tensor or a tuple of the model's positional arguments (any
            dtype, e.g. Long token ids), and example_kwargs, keyword arguments of that
            forward; or example: an `svdkern.Example`.
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
        mha=mha,
        input_shape=input_shape,
        example_inputs=example_inputs,
        example_kwargs=example_kwargs,
        example=example,
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
        move_hooks(dense, new)
        if read:
            for layer in new.modules():
                if isinstance(layer, SVDLayer):
                    layer.weight_read = read
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
