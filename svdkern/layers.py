"""Layer utilities shared by `flops`, `prune`, `compress`, `decompose` and `tune_forms`:
which layers are counted, the example forward they are measured on, the input shapes they see, the
layers whose weight is read by their parent, and their MAC costs.

Costs follow the convention of `svdkern.flops` (module docstring there): Linear and
transformers' Conv1D rows·in·out, ConvNd N·∏out·∏k·(c_in/groups)·c_out, the in-projection
of nn.MultiheadAttention Σ_{q,k,v} rows·d_in·E (its out_proj is an nn.Linear of its own),
an SVD layer its dense form or its low-rank chain (`SVDLayer._macs`).

`trace_macs` runs the example forward once under torch.utils.flop_counter.FlopCounterMode
and attributes each op it counts: to the counted layer whose weight it uses (or, when that
layer's own forward is not running, to a weight read), to attention (a matmul of two
activations), or to other ops. Before it, one hook-free forward (the model as it runs for
real: some parents, like nn.TransformerEncoderLayer, take a fast path that reads their
children's weights only when no module has a hook) watches the layers' weight attributes.
The layers read through .weight that the two forwards find are one list,
`weight_reads`, which `flops`, `prune`, `compress` and `decompose` all use.

Example::

    args, kwargs = example_call(model, example_inputs=(ids,), example_kwargs={"mask": m})
    shapes = layer_inputs(model, example_inputs=(ids,))     # {name: [input shape per call]}
    weight_reads(model, args, kwargs)                       # {"blocks.0.qkv": "its weight ..."}
    trace_macs(model, example_inputs=(ids,)).attention      # MACs of QKᵀ and AV
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry, shape_wrapper

import svdkern.nn
from svdkern.nn import (
    SVDConv2d,
    SVDLayer,
    SVDLinear,
    SVDMultiheadAttention,
    is_conv1d_like,
    svd_layers,
)

__all__ = [
    "COUNTED",
    "FLOP_FORMULAS",
    "Conv1DLike",
    "MacTrace",
    "conv_out_hw",
    "conv_out_size",
    "dense_macs",
    "dense_params",
    "dense_weight_shape",
    "example_call",
    "format_table",
    "layer_inputs",
    "layer_kind",
    "lowrank_is_cheaper",
    "svd_costs",
    "svd_layers",
    "trace_macs",
    "uncompiled",
    "uncompiled_name",
    "weight_reads",
]


class _Conv1DLikeMeta(type):
    def __instancecheck__(cls, obj) -> bool:
        return is_conv1d_like(obj)


class Conv1DLike(metaclass=_Conv1DLikeMeta):
    """`isinstance(m, Conv1DLike)` is `svdkern.nn.is_conv1d_like(m)`: transformers' Conv1D
    (y = x·W + b, W of shape (in, out)) recognised without importing transformers."""


# The layers whose matmuls are counted (norms, activations and pooling are not). An
# nn.MultiheadAttention counts its in-projection (in_proj_weight, or q/k/v_proj_weight);
# its out_proj is an nn.Linear counted under its own name although the attention function
# reads its weight instead of calling it.
COUNTED = (nn.Linear, nn.Conv1d, nn.Conv2d, Conv1DLike, nn.MultiheadAttention, SVDLayer)

_CONVS = (nn.Conv1d, nn.Conv2d)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = [
        "  ".join(
            str(c).ljust(w) if i < 4 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    ]
    return "\n".join([fmt[0], line, *fmt[1:]])


_COMPILED_PREFIX = "_orig_mod."


def uncompiled(model: nn.Module) -> nn.Module:
    """The module `torch.compile(model)` wraps (unwrapped repeatedly), else `model`: the
    verbs that take layer names use the names of the user's model ("0", not "_orig_mod.0")."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # no compiled module without it
    while eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        model = model._orig_mod
    return model


def uncompiled_name(name: str) -> str:
    """A layer name or glob of a compiled model ("_orig_mod.0") as the wrapped model's ("0")."""
    while name.startswith(_COMPILED_PREFIX) or name == _COMPILED_PREFIX[:-1]:
        name = name[len(_COMPILED_PREFIX) :]
    return name


# --- the example forward --------------------------------------------------------------


def example_call(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    example_inputs=None,
    example_kwargs: Mapping | None = None,
) -> tuple[tuple, dict]:
    """The (args, kwargs) of the one example forward `model(*args, **kwargs)` that
    `flops`, `prune`, `compress` and `tune_forms` measure.

    Args:
        input_shape: shape of one input batch: the forward gets a zero float tensor of
            that shape, in the dtype and on the device of the model's first parameter.
        example_inputs: the positional arguments instead: one tensor, or a tuple of them
            (any dtype, e.g. int64 token ids; non-tensor values are passed as they are).
        example_kwargs: keyword arguments of the forward (e.g. {"attention_mask": mask,
            "use_cache": False}); may be given alone for a keyword-only call.
    Raises:
        ValueError when both input_shape and example_inputs (or none of the three) are
        given, or input_shape is not a sequence of non-negative ints; TypeError when
        example_kwargs is not a mapping.

    Example::

        args, kwargs = example_call(model, example_inputs=(ids,), example_kwargs={"mask": m})
        model(*args, **kwargs)
    """
    if input_shape is not None and example_inputs is not None:
        raise ValueError(
            "pass one of input_shape (the shape of one float input batch) and example_inputs "
            "(a tensor or a tuple of the model's positional arguments), not both"
        )
    if input_shape is None and example_inputs is None and example_kwargs is None:
        raise ValueError(
            "pass input_shape (the shape of one float input batch) or example_inputs (a "
            "tensor or a tuple of the model's positional arguments, plus example_kwargs)"
        )
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise TypeError(
            f"example_kwargs must be a dict of the forward's keyword arguments, got "
            f"{type(example_kwargs).__name__}"
        )
    kwargs = dict(example_kwargs or {})
    if input_shape is not None:
        shape = _check_shape(input_shape)
        param = next(model.parameters(), None)
        factory = {"device": param.device, "dtype": param.dtype} if param is not None else {}
        return (torch.zeros(shape, **factory),), kwargs
    if example_inputs is None:
        return (), kwargs
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), kwargs
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), kwargs
    raise TypeError(
        "example_inputs must be a tensor or a tuple of the forward's positional arguments "
        f"(keyword arguments go in example_kwargs), got {type(example_inputs).__name__}"
    )


def _check_shape(input_shape) -> tuple[int, ...]:
    if (
        isinstance(input_shape, (str, bytes, torch.Tensor))
        or not isinstance(input_shape, Sequence)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in input_shape)
    ):
        raise ValueError(
            "input_shape must be a sequence of non-negative ints (the shape of one input "
            f"batch, e.g. (1, 3, 32, 32)), got {input_shape!r}"
        )
    return tuple(input_shape)


def _describe(args: tuple, kwargs: dict) -> str:
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"tensor{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
        return type(v).__name__

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


@contextlib.contextmanager
def _example_forward(model: nn.Module) -> Iterator[None]:
    """Eval mode, no gradients, the MultiheadAttention fast path off (so the attention
    runs as the separate ops training runs, which FlopCounterMode can count); the
    training flags and the fast-path setting are restored afterwards."""
    flags = {m: m.training for m in model.modules()}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, flag in flags.items():
            m.training = flag


def _run(model: nn.Module, args: tuple, kwargs: dict, input_shape=None) -> None:
    """model(*args, **kwargs); an error of the forward is re-raised naming the argument
    that produced the input (input_shape, or example_inputs / example_kwargs)."""
    try:
        model(*args, **kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        if input_shape is not None:
            given = f"a zero input of input_shape={tuple(input_shape)}"
            fix = "pass the shape the model expects (batch included) or example_inputs"
        else:
            given = f"example_inputs / example_kwargs ({_describe(args, kwargs)})"
            fix = "pass the arguments the model's forward expects"
        raise ValueError(
            f"the example forward of {type(model).__name__} failed on {given}: {err}; {fix}"
        ) from err


# --- what each counted layer sees -----------------------------------------------------


def _counted(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, COUNTED)]


def _first_tensor(args: tuple, kwargs: dict, names: Sequence[str] = ("input", "x")):
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in names:
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _mha_inputs(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """query, key, value of an nn.MultiheadAttention call (positional or keyword)."""
    values = list(args[:3]) + [kwargs.get(k) for k in ("query", "key", "value")[len(args) :]]
    return [v for v in values if isinstance(v, torch.Tensor)]


class _Recorder:
    """Forward hooks recording the input shape of every call of every counted layer, and
    the stack of modules running (to tell whose forward reads a weight)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = _counted(model)
        self.shapes: dict[str, list[tuple[int, ...]]] = {name: [] for name, _ in self.layers}
        self.stack: list[str] = []
        self.handles = []
        # A projection of an attention module (nn.MultiheadAttention's out_proj, an
        # SVDMultiheadAttention's q/k/v/in/out projections) → that attention, which may
        # use the projection's weight without calling it.
        self.owner: dict[str, str] = {}
        for name, m in model.named_modules():
            if isinstance(m, _ATTENTION):
                prefix = f"{name}." if name else ""
                for sub, _ in m.named_modules():
                    if sub:
                        self.owner.setdefault(prefix + sub, name)
        names = dict(self.layers)
        for name, module in model.named_modules():
            self.handles.append(
                module.register_forward_pre_hook(self._enter(name, names), with_kwargs=True)
            )
            self.handles.append(module.register_forward_hook(self._leave(name), always_call=True))

    def _enter(self, name: str, counted: dict):
        def hook(module, args, kwargs):
            self.stack.append(name)
            if name not in counted:
                return None
            if isinstance(module, nn.MultiheadAttention):
                qkv = _mha_inputs(args, kwargs)
                self.shapes[name].extend(tuple(t.shape) for t in qkv)
                # The attention function reads out_proj.weight without calling out_proj: its
                # input has the query's rows and embed_dim columns.
                out = f"{name}.out_proj" if name else "out_proj"
                if qkv and out in self.shapes:
                    self.shapes[out].append((*qkv[0].shape[:-1], module.embed_dim))
                return None
            x = _first_tensor(args, kwargs)
            if x is not None:
                self.shapes[name].append(tuple(x.shape))
            return None

        return hook

    def _leave(self, name: str):
        def hook(module, args, output):
            if self.stack and self.stack[-1] == name:
                self.stack.pop()

        return hook

    def active(self, name: str) -> bool:
        """The layer's forward, or its owning attention's, is running."""
        return name in self.stack or self.owner.get(name) in self.stack

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# Attributes whose reads mark a layer as read through its weight: an nn.MultiheadAttention
# exposes its in-projection as raw parameters, every other layer as weight and bias.
_MHA_WEIGHTS = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_ATTENTION = (nn.MultiheadAttention, SVDMultiheadAttention)
_SVDKERN_NN = os.path.dirname(svdkern.nn.__file__)


def _caller(depth: int) -> str:
    """Where the read at stack depth `depth` comes from, skipping svdkern's own layers (an
    SVDMultiheadAttention composing its in_proj_weight for the module that asked)."""
    frame = sys._getframe(depth + 1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_SVDKERN_NN):
        frame = frame.f_back
    code = frame.f_code
    owner = frame.f_locals.get("self")
    where = f"{type(owner).__name__}.{code.co_name}" if owner is not None else code.co_name
    return f"{where} ({os.path.basename(code.co_filename)}:{frame.f_lineno})"


def _spy_class(cls: type, names: tuple[str, ...], note) -> type:
    """A subclass of `cls` (same name) that calls `note(self, attr)` on every read of the
    attributes `names` (parameters reached through nn.Module.__getattr__, an SVD layer's
    weight through its property) and counts in `self.__dict__["_svdkern_active"]` how many
    of its forwards are running. It registers no hooks: some parents take another path
    when a child has hooks (nn.TransformerEncoderLayer's fast path reads its children's
    weights only when no module has a hook)."""

    def __getattr__(self, name):
        if name in names:
            note(self, name)
        return cls.__getattr__(self, name)

    def forward(self, *args, **kwargs):
        self.__dict__["_svdkern_active"] = self.__dict__.get("_svdkern_active", 0) + 1
        try:
            return cls.forward(self, *args, **kwargs)
        finally:
            self.__dict__["_svdkern_active"] -= 1

    namespace = {"__getattr__": __getattr__, "forward": forward, "__module__": cls.__module__}
    for name in names:
        prop = getattr(cls, name, None)
        if isinstance(prop, property):

            def read(self, prop=prop, name=name):
                note(self, name)
                return prop.fget(self)

            namespace[name] = property(read)
    return type(cls.__name__, (cls,), namespace)


def _attribute_reads(
    model: nn.Module, args: tuple, kwargs: dict, input_shape=None
) -> dict[str, str]:
    """{name: reason} of the counted layers whose weight attributes (weight, bias; an
    nn.MultiheadAttention's in_proj_weight, q_proj_weight, ...) are read during one eval,
    no-grad forward, hook-free and with the MultiheadAttention fast path as the user has
    it, while neither their own forward nor their attention module's (for its
    projections) is running: `F.linear(x, self.qkv.weight)`, `x.to(self.fc.weight.dtype)`,
    or nn.TransformerEncoderLayer's fast path. The layers' classes are swapped for spies
    (`_spy_class`) for the duration; a class that cannot be swapped is not watched."""
    guards: dict[int, nn.Module] = {}
    watched: list[tuple[str, nn.Module, tuple[str, ...]]] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            watched.append((name, m, _MHA_WEIGHTS))
        elif isinstance(m, SVDMultiheadAttention):
            watched.append((name, m, ()))  # watched for its running forward only
        elif isinstance(m, COUNTED):
            watched.append((name, m, ("weight", "bias")))
        if isinstance(m, _ATTENTION):
            guards.update({id(c): m for c in m.modules() if c is not m})
    found: dict[int, str] = {}

    def note(module: nn.Module, attr: str) -> None:
        guard = guards.get(id(module))
        running = module.__dict__.get("_svdkern_active") or (
            guard is not None and guard.__dict__.get("_svdkern_active")
        )
        if not running and id(module) not in found:
            found[id(module)] = (
                f"its .{attr} is read by {_caller(2)} while its own forward does not run"
            )

    classes: dict[tuple[type, tuple[str, ...]], type] = {}
    swapped: list[tuple[nn.Module, type]] = []
    flags = {m: m.training for m in model.modules()}
    try:
        for _, m, names in watched:
            cls = type(m)
            if (cls, names) not in classes:
                classes[cls, names] = _spy_class(cls, names, note)
            try:
                m.__class__ = classes[cls, names]
            except TypeError:  # a class that cannot be swapped (e.g. with __slots__)
                continue
            swapped.append((m, cls))
        model.eval()
        with torch.no_grad():
            _run(model, args, kwargs, input_shape)
    finally:
        for m, cls in swapped:
            m.__class__ = cls
            m.__dict__.pop("_svdkern_active", None)
        for m, flag in flags.items():
            m.training = flag
    return {name: found[id(m)] for name, m, names in watched if names and id(m) in found}


def _one_row_shapes(layers: list[tuple[str, nn.Module]]) -> dict[str, list[tuple[int, ...]]]:
    convs = [name for name, m in layers if isinstance(m, _CONVS) or _is_svd_conv(m)]
    if convs:
        raise ValueError(
            f"input_shape or example_inputs is needed to count the MACs of convolutions (e.g. "
            f"{convs[0]!r}); pass the shape of one input batch, e.g. input_shape=(1, 3, 32, 32)"
        )
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for name, m in layers:
        if isinstance(m, nn.MultiheadAttention):
            shapes[name] = [(1, m.embed_dim), (1, m.kdim), (1, m.vdim)]
        else:
            shapes[name] = [(1, _in_features(m))]
    return shapes


def _is_svd_conv(module: nn.Module) -> bool:
    return isinstance(module, SVDLayer) and not isinstance(module, SVDLinear)


def _in_features(module: nn.Module) -> int:
    if is_conv1d_like(module):
        return module.weight.shape[0]
    return module.in_features


def layer_inputs(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    example_inputs=None,
    example_kwargs: Mapping | None = None,
) -> dict[str, list[tuple[int, ...]]]:
    """Input shape of every call of every counted layer (`COUNTED`), by qualified name,
    recorded by forward hooks in one eval, no-grad forward (`example_call`).

    An nn.MultiheadAttention records three shapes per call (query, key, value) and its
    out_proj one, (*query rows, embed_dim). A layer whose weight its parent reads without
    calling it (see `weight_reads`) records none. With no input_shape, example_inputs nor
    example_kwargs, every Linear-like layer counts as one call on one row and any conv
    raises (its cost depends on the spatial size).
    """
    if input_shape is None and example_inputs is None and example_kwargs is None:
        return _one_row_shapes(_counted(model))
    args, kwargs = example_call(model, input_shape, example_inputs, example_kwargs)
    recorder = _Recorder(model)
    try:
        with _example_forward(model):
            _run(model, args, kwargs, input_shape)
    finally:
        recorder.remove()
    return recorder.shapes


# --- where the MACs of one forward go -------------------------------------------------


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kw) -> int:
    """FLOPs of the CPU fused attention, QKᵀ and AV over the query heads:
    2·b·h_q·s_q·s_k·(d_q + d_v) for q (b, h_q, s_q, d_q), k (b, h_kv, s_k, d_q),
    v (b, h_kv, s_k, d_v). With grouped-query attention (h_kv < h_q, as in Llama) each
    key/value head serves h_q / h_kv query heads, so the count is over h_q (some torch
    versions' own formula asserts h_kv == h_q)."""
    rows = math.prod(query_shape[:-1])  # b·h_q·s_q
    return 2 * rows * key_shape[-2] * (query_shape[-1] + value_shape[-1])


def _flop_formulas() -> dict:
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and cpu_sdpa not in flop_registry:
        return {cpu_sdpa: _cpu_sdpa_flop}
    return {}


# Formulas for the aten ops this torch's FlopCounterMode has none for (it counts them as 0):
# the CPU kernel of scaled_dot_product_attention. Pass them to get the totals
# `svdkern.flops` reports: FlopCounterMode(custom_mapping=FLOP_FORMULAS). They are not
# registered globally, which would change every FlopCounterMode in the process; svdkern's
# own ops are (`svdkern.ops`), since without their formulas they count as 0.
FLOP_FORMULAS = _flop_formulas()

_ATTENTION_OPS = {
    torch.ops.aten.bmm,
    torch.ops.aten.baddbmm,
    torch.ops.aten.mm,
    torch.ops.aten.addmm,
    torch.ops.aten._scaled_dot_product_efficient_attention,
    torch.ops.aten._scaled_dot_product_flash_attention,
    torch.ops.aten._scaled_dot_product_cudnn_attention,
    torch.ops.aten._flash_attention_forward,
    torch.ops.aten._efficient_attention_forward,
    *[op for op in FLOP_FORMULAS if op._qualified_op_name.startswith("aten::")],
}


@dataclass
class MacTrace:
    """Where the MACs of one forward go, as FlopCounterMode counts them (FLOPs / 2, with
    `FLOP_FORMULAS` added).

    total: FlopCounterMode's total.
    layers: {name: MACs} of the counted layers' own forwards (ops using their weight).
    weight_reads: {name: MACs} of counted layers whose weight another module used while
        the layer's own forward was not running (`F.linear(x, self.qkv.weight)`).
    reasons: {name: why} for those layers and for those whose .weight / .bias attribute
        another module read (e.g. for its dtype) without an op using it: `compress` keeps
        all of them dense.
    attention: MACs of matmuls between activations (no parameter operand): attention
        scores and values (bmm, baddbmm, scaled_dot_product_attention, ...).
    weight_ops: {name: MACs} of ops on a counted layer's weights alone, no input involved:
        svdkern's compose of an SVD layer's W for a parent that reads it through .weight.
    other: {op: MACs} of everything else (convs or matmuls of layers svdkern does not
        count, e.g. ConvTranspose, Conv3d, a raw parameter in a matmul).
    shapes: input shapes of every call of every counted layer (as `layer_inputs`).
    """

    total: int
    layers: dict[str, int] = field(default_factory=dict)
    weight_reads: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    attention: int = 0
    weight_ops: dict[str, int] = field(default_factory=dict)
    other: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)


class _Tracer(TorchDispatchMode):
    """Attributes every op FlopCounterMode counts to a counted layer, a weight read,
    attention or other.

    Each counted layer's weight tensors (W, in_proj_weight, or U, s, V) are tagged with its
    name by storage. Ops without a FLOP formula pass the tag on to their outputs when all
    their tensor inputs are tagged with that layer or are parameters/buffers (so W.t(),
    W.to(dtype) and the composed U·diag(s)·Vᵀ stay tagged, while an embedding lookup of a
    tied weight, which also takes the ids, does not); an op with a formula using a
    tagged tensor is that layer's, and a weight read when the layer's forward (or, for
    out_proj, its MultiheadAttention's) is not running.
    """

    def __init__(self, model: nn.Module, recorder: _Recorder, registry: dict) -> None:
        super().__init__()
        self.recorder = recorder
        self.registry = registry
        self.tags: dict[int, str] = {}
        self.keep: list[torch.Tensor] = []  # tagged intermediates, alive so no address reuse
        self.constants = {
            _ptr(t) for t in [*model.parameters(), *model.buffers()] if _ptr(t) is not None
        }
        for name, module in recorder.layers:
            for tensor in _weights(module):
                if _ptr(tensor) is not None:
                    self.tags[_ptr(tensor)] = name
        self.trace = MacTrace(0)
        self.ops: dict[str, str] = {}  # layer → the first op using its weight outside it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        tags = {self.tags.get(_ptr(t)) for t in tensors} - {None}
        packet = getattr(func, "_overloadpacket", None)
        # An op of one layer's weights alone (a cast, a transpose, svdkern's compose of an
        # SVD layer's W) makes more of that weight: its outputs carry the layer's tag.
        weight_only = len(tags) == 1 and all(
            _ptr(t) in self.constants or self.tags.get(_ptr(t)) in tags for t in tensors
        )
        if weight_only:
            (name,) = tags
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and _ptr(t) is not None:
                    self.tags.setdefault(_ptr(t), name)
                    self.keep.append(t)
        if packet in self.registry:
            macs = self.registry[packet](*args, **kwargs, out_val=out) // 2
            if weight_only:
                (name,) = tags
                ops = self.trace.weight_ops
                ops[name] = ops.get(name, 0) + macs
            else:
                self._attribute(packet, macs, tags, tensors)
        return out

    def _attribute(self, packet, macs: int, tags: set, tensors: list) -> None:
        trace = self.trace
        if tags:
            # An activation tagged by mistake (a weight flowing into it elementwise) loses
            # to the layer whose forward is running.
            name = next((n for n in sorted(tags) if self.recorder.active(n)), sorted(tags)[0])
            if self.recorder.active(name):
                trace.layers[name] = trace.layers.get(name, 0) + macs
            else:
                trace.weight_reads[name] = trace.weight_reads.get(name, 0) + macs
                parent = self.recorder.stack[-1] if self.recorder.stack else ""
                where = f"the forward of {parent!r}" if parent else "the model's forward"
                if name not in trace.reasons:
                    self.ops[name] = str(packet)
                    trace.reasons[name] = (
                        f"its weight is used by {packet} in {where} while its own forward "
                        "does not run"
                    )
        elif packet in _ATTENTION_OPS and not any(_ptr(t) in self.constants for t in tensors):
            trace.attention += macs
        elif macs:
            trace.other[str(packet)] = trace.other.get(str(packet), 0) + macs


def _ptr(t: torch.Tensor) -> int | None:
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return ptr or None


def _weights(module: nn.Module) -> list[torch.Tensor]:
    if isinstance(module, SVDLayer):
        return [module.U, module.s, module.V]
    if isinstance(module, nn.MultiheadAttention):
        names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        return [w for w in (getattr(module, n, None) for n in names) if w is not None]
    weight = getattr(module, "weight", None)
    return [weight] if isinstance(weight, torch.Tensor) else []


@contextlib.contextmanager
def _chain_forms(model: nn.Module) -> Iterator[None]:
    """Every SVD layer runs its low-rank chain (the SVD form `flops` reports)."""
    modes = {layer: layer.mode for _, layer in svd_layers(model)}
    try:
        for layer in modes:
            layer.mode = "chain"
        yield
    finally:
        for layer, mode in modes.items():
            layer.mode = mode


def trace_macs(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    example_inputs=None,
    example_kwargs: Mapping | None = None,
    chain: bool = True,
) -> MacTrace:
    """One eval, no-grad forward under FlopCounterMode (with `FLOP_FORMULAS`): its total
    MACs and where they go (`MacTrace`). With chain=True every SVD layer runs its low-rank
    chain, the form whose MACs `flops` reports as svd_macs.

    A first, hook-free forward (the model as it runs for real, fast paths included) finds
    the layers whose weight attributes are read outside their forward; `reasons` holds
    them with the layers whose weight the traced forward's ops use outside it: this is
    the one list of layers read through .weight that `flops`, `prune`, `compress` and
    `decompose` all use (`weight_reads`).

    Example::

        trace = trace_macs(model, example_inputs=(ids,))
        trace.total, trace.layers, trace.weight_reads, trace.attention, trace.other
    """
    args, kwargs = example_call(model, input_shape, example_inputs, example_kwargs)
    attributes = _attribute_reads(model, args, kwargs, input_shape)
    recorder = _Recorder(model)
    registry = {**flop_registry, **{op: shape_wrapper(f) for op, f in FLOP_FORMULAS.items()}}
    tracer = _Tracer(model, recorder, registry)
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    forms = _chain_forms(model) if chain else contextlib.nullcontext()
    try:
        with _example_forward(model), forms, tracer, counter:
            _run(model, args, kwargs, input_shape)
    finally:
        recorder.remove()
    trace = tracer.trace
    # The attribute read names the code that reads the weight; the op, what uses it.
    for name, reason in attributes.items():
        op = tracer.ops.get(name)
        trace.reasons[name] = f"{reason} (its weight is used by {op})" if op else reason
    trace.total = counter.get_total_flops() // 2
    trace.shapes = recorder.shapes
    return trace


def weight_reads(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, str]:
    """{qualified name: reason} of the counted layers (dense or SVD) whose weight was used
    during an eval, no-grad forward `model(*args, **kwargs)` while their own forward was
    not running: the pattern `F.linear(x, self.qkv.weight, self.qkv.bias)` (torchvision's
    Swin), found by the ops its weight flows into, or any read of its weight attributes
    (`x.to(self.fc.weight.dtype)`; nn.TransformerEncoderLayer's fast path reading its
    children's weights and its attention's in_proj_weight). Such a layer must keep a
    `.weight` (`compress` keeps it dense, `decompose` lists it), and costs its dense MACs
    whatever its rank (`flops`, `prune`): all four use this list (`trace_macs().reasons`).
    An attention module using its own projections' weights is not such a read.

    Example::

        weight_reads(model, *example_call(model, (1, 3, 56, 56)))
        # {"layers.0.attn.qkv": "its weight is used by aten.mm in the forward of ..."}
    """
    return trace_macs(model, example_inputs=tuple(args), example_kwargs=dict(kwargs)).reasons


# --- costs ----------------------------------------------------------------------------


def dense_macs(module: nn.Module, shape: Sequence[int]) -> int:
    """MACs of one call of a dense counted layer on an input of `shape` (for an
    nn.MultiheadAttention one of its query/key/value projections: rows·d_in·E)."""
    if isinstance(module, nn.MultiheadAttention):
        return math.prod(shape[:-1]) * shape[-1] * module.embed_dim
    if isinstance(module, nn.Linear):
        return math.prod(shape[:-1]) * module.in_features * module.out_features
    if is_conv1d_like(module):
        return math.prod(shape[:-1]) * module.weight.shape[0] * module.weight.shape[1]
    d = len(module.kernel_size)
    batch, size = shape[: -(d + 1)], shape[-d:]
    out = conv_out_size(module, size)
    c_in = module.in_channels // module.groups
    return (
        math.prod(batch)
        * math.prod(out)
        * math.prod(module.kernel_size)
        * c_in
        * module.out_channels
    )


def conv_out_size(conv: nn.Module, size: Sequence[int]) -> tuple[int, ...]:
    """Output spatial size of a ConvNd for an input of spatial size `size`."""
    if conv.padding == "same":
        return tuple(size)
    pad = (0,) * len(size) if conv.padding == "valid" else conv.padding
    return tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(
            size, conv.kernel_size, conv.stride, pad, conv.dilation, strict=True
        )
    )


def conv_out_hw(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
    out = conv_out_size(conv, (h, w))
    return out[0], out[1]


def svd_costs(
    module: SVDLayer, shapes: Sequence[Sequence[int]], rank: int | None = None
) -> tuple[int, int]:
    """(dense MACs, chain MACs at `rank`) summed over the recorded calls."""
    dense = chain = 0
    for shape in shapes:
        d, c = module._macs(shape, rank)
        dense += d
        chain += c
    return dense, chain


def lowrank_is_cheaper(module: SVDLayer, shapes: Sequence[Sequence[int]] | None) -> bool:
    """The compression policy "flops": keep the low-rank pair iff it costs fewer MACs.

    Without recorded shapes (layer never called, or no input shape given) the comparison
    is made per output element: exact for Linear and channel convs; spatial convs take
    W_in = stride·W_out.
    """
    if shapes:
        dense, chain = svd_costs(module, shapes)
        return chain < dense
    r, m, n = module.rank, module._m, module._n
    if isinstance(module, SVDConv2d) and module.decomposition == "spatial":
        return r * m * module.stride[1] + r * n < m * n
    return r * (m + n) < m * n


def dense_weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The dense weight's shape (Conv1D: (in, out); MultiheadAttention: its in-projection,
    (3·E, E), or (E, E + kdim + vdim) for separate q/k/v weights)."""
    if isinstance(module, SVDLinear):
        return (module.out_features, module.in_features)
    if isinstance(module, SVDLayer):
        groups = getattr(module, "groups", 1)
        return (module.out_channels, module.in_channels // groups, *module.kernel_size)
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            return tuple(module.in_proj_weight.shape)
        return (module.embed_dim, module.embed_dim + module.kdim + module.vdim)
    return tuple(module.weight.shape)


def dense_params(module: nn.Module) -> int:
    """Number of weight entries of a dense counted layer (biases not included)."""
    return sum(w.numel() for w in _weights(module))


def layer_kind(module: nn.Module) -> str:
    if isinstance(module, SVDConv2d):
        return f"SVDConv2d/{module.decomposition}"
    if isinstance(module, nn.MultiheadAttention):
        return "MultiheadAttention.in_proj"
    if is_conv1d_like(module):
        return "Conv1D"
    return type(module).__name__
