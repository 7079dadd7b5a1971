"""The example forward traced: which layers are counted, the input shapes they see, where
the MACs of the forward go, and the layers whose weight their parent reads.

`trace_macs` runs the example forward (`svdkern.examples.Example`) once under
torch.utils.flop_counter.FlopCounterMode and attributes each op it counts: to the counted
layer whose weight it uses (or, when that layer's own forward is not running, to a weight
read), to attention (a matmul of two activations), or to other ops. Before it, one
hook-free forward (the model as it runs for real: some parents, like
nn.TransformerEncoderLayer, take a fast path that reads their children's weights only when
no module has a hook) watches the layers' weight attributes. The layers read through
.weight that the two forwards find are one list, `MacTrace.reasons` (`weight_reads`),
which `flops`, `prune`, `compress` and `decompose` all use through the cost model
(`svdkern.costs`).

Example::

    example = Example(example_inputs=(ids,), example_kwargs={"mask": m})
    layer_inputs(model, example)           # {name: [input shape per call]}
    weight_reads(model, example)           # {"blocks.0.qkv": "its weight ..."}
    trace_macs(model, example).attention   # MACs of QKᵀ and AV
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry, shape_wrapper

import svdkern.nn
from svdkern.examples import Example, Shape
from svdkern.nn import SVDLayer, SVDLinear, SVDMultiheadAttention, is_conv1d_like, svd_layers

__all__ = [
    "COUNTED",
    "FLOP_FORMULAS",
    "Conv1DLike",
    "MacTrace",
    "UncountedError",
    "layer_inputs",
    "layer_weights",
    "modes_kept",
    "one_row_inputs",
    "trace_macs",
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


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Every module's train/eval flag restored on exit, as the caller had it (a forward
    run in eval mode for a measurement leaves the model's modes alone)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def _example_forward(model: nn.Module) -> Iterator[None]:
    """Eval mode, no gradients, the MultiheadAttention fast path off (so the attention
    runs as the separate ops training runs, which FlopCounterMode can count); the
    training flags and the fast-path setting are restored afterwards."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with modes_kept(model):
        try:
            model.eval()
            torch.backends.mha.set_fastpath_enabled(False)
            with torch.no_grad():
                yield
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)


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


def _attribute_reads(model: nn.Module, example: Example) -> dict[str, str]:
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
    with modes_kept(model):
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
                example.run(model)
        finally:
            for m, cls in swapped:
                m.__class__ = cls
                m.__dict__.pop("_svdkern_active", None)
    return {name: found[id(m)] for name, m, names in watched if names and id(m) in found}


def one_row_inputs(model: nn.Module) -> dict[str, list[Shape] | None]:
    """The input shapes assumed without an example forward: one call on one row for every
    Linear-like counted layer (three, query, key and value, for an nn.MultiheadAttention),
    None for a convolution (its cost depends on the spatial size)."""
    shapes: dict[str, list[Shape] | None] = {}
    for name, m in _counted(model):
        if isinstance(m, _CONVS) or (isinstance(m, SVDLayer) and not isinstance(m, SVDLinear)):
            shapes[name] = None
        elif isinstance(m, nn.MultiheadAttention):
            shapes[name] = [(1, m.embed_dim), (1, m.kdim), (1, m.vdim)]
        else:
            shapes[name] = [(1, m.weight.shape[0] if is_conv1d_like(m) else m.in_features)]
    return shapes


class UncountedError(ValueError):
    """The MACs of a convolution counted without an example input (they depend on its
    spatial size)."""

    def __init__(self, layer: str) -> None:
        super().__init__(
            f"input_shape or example_inputs is needed to count the MACs of convolutions (e.g. "
            f"{layer!r}); pass the shape of one input batch, e.g. input_shape=(1, 3, 32, 32)"
        )
        self.layer = layer


def layer_inputs(model: nn.Module, example: Example | None = None) -> dict[str, list[Shape]]:
    """Input shape of every call of every counted layer (`COUNTED`), by qualified name,
    recorded by forward hooks in one eval, no-grad forward of `example`.

    An nn.MultiheadAttention records three shapes per call (query, key, value) and its
    out_proj one, (*query rows, embed_dim). A layer whose weight its parent reads without
    calling it (see `weight_reads`) records none. Without an example, every Linear-like
    layer counts as one call on one row (`one_row_inputs`) and any conv raises.
    """
    if example is None:
        shapes = one_row_inputs(model)
        convs = [name for name, calls in shapes.items() if calls is None]
        if convs:
            raise UncountedError(convs[0])
        return shapes
    recorder = _Recorder(model)
    try:
        with _example_forward(model):
            example.single("layer_inputs").run(model)
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
            for tensor in layer_weights(module):
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


def layer_weights(module: nn.Module) -> list[torch.Tensor]:
    """The weight tensors of a counted layer: an SVD layer's U, s, V, an
    nn.MultiheadAttention's in-projection weights, else its weight."""
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


def trace_macs(model: nn.Module, example: Example, *, chain: bool = True) -> MacTrace:
    """One eval, no-grad forward of `example` under FlopCounterMode (with `FLOP_FORMULAS`):
    its total MACs and where they go (`MacTrace`). With chain=True every SVD layer runs its
    low-rank chain, the form whose MACs `flops` reports as svd_macs.

    A first, hook-free forward (the model as it runs for real, fast paths included) finds
    the layers whose weight attributes are read outside their forward; `reasons` holds
    them with the layers whose weight the traced forward's ops use outside it: this is
    the one list of layers read through .weight that `flops`, `prune`, `compress` and
    `decompose` all use (`weight_reads`).

    Example::

        trace = trace_macs(model, Example(example_inputs=(ids,)))
        trace.total, trace.layers, trace.weight_reads, trace.attention, trace.other
    """
    if not isinstance(example, Example):
        raise TypeError(f"example must be a svdkern.Example, got {type(example).__name__}")
    example = example.single("trace_macs")
    attributes = _attribute_reads(model, example)
    recorder = _Recorder(model)
    registry = {**flop_registry, **{op: shape_wrapper(f) for op, f in FLOP_FORMULAS.items()}}
    tracer = _Tracer(model, recorder, registry)
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    forms = _chain_forms(model) if chain else contextlib.nullcontext()
    try:
        with _example_forward(model), forms, tracer, counter:
            example.run(model)
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


def weight_reads(model: nn.Module, example: Example) -> dict[str, str]:
    """{qualified name: reason} of the counted layers (dense or SVD) whose weight was used
    during an eval, no-grad forward of `example` while their own forward was
    not running: the pattern `F.linear(x, self.qkv.weight, self.qkv.bias)` (torchvision's
    Swin), found by the ops its weight flows into, or any read of its weight attributes
    (`x.to(self.fc.weight.dtype)`; nn.TransformerEncoderLayer's fast path reading its
    children's weights and its attention's in_proj_weight). Such a layer must keep a
    `.weight` (`compress` keeps it dense, `decompose` lists it), and costs its dense MACs
    whatever its rank (`flops`, `prune`): all four use this list (`trace_macs().reasons`).
    An attention module using its own projections' weights is not such a read.

    Example::

        weight_reads(model, Example(input_shape=(1, 3, 56, 56)))
        # {"layers.0.attn.qkv": "its weight is used by aten.mm in the forward of ..."}
    """
    return trace_macs(model, example).reasons
