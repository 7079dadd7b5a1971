"""Measured form selection: time each SVD layer's candidate forms and fix the fastest.

MACs do not predict time for thin layers (docs/ARCHITECTURE.md §6): on a 2-core CPU a 16-channel
3×3 conv at 32×32, batch 32, is no faster as the rank-4 chain than dense although it has
a quarter of the MACs. `tune_forms` therefore runs every SVD layer's candidates on the
model's device, at the layer's current rank and at the input shape it sees:

    training=True   forward + backward of  compose   W = U·diag(s)·Vᵀ, then the dense op
                                           chain     x·V, scale by s, ·Uᵀ (two thin ops)
    training=False  forward of             dense     the dense layer (W precomputed)
                                           lowrank   the two layers of `to_lowrank()`

Timing: each candidate is warmed up, then `repeats` rounds time every candidate in turn
(interleaved, so that drift of a busy machine falls on all of them alike); each round
times enough calls to last ≥ 2 ms; the median round decides. A training choice is
written into the layer (`layer.set_form`), which `mode="auto"` then follows; a layer
never tuned keeps the MAC rule. Inference choices are only reported: they decide what
`compress(policy="latency")` deploys. Results are cached per (layer geometry, rank, input
shape, input dtype, input-requires-grad, input layout, device, parameter dtype, autocast
state, threads, training), so after a rank cut only the layers whose rank changed are timed
again, and equal layers are timed once. A layer called at several input shapes gets a form
for each.

The activations' memory format is a form too: with `memory_format="auto"` the layers are
tuned under NCHW and under channels-last (each on a copy of the model), a whole model step
is timed in each layout, and the model's layout changes (`set_memory_format`) only when
the other one is ≥ 5% faster. A model whose forward fails channels-last (a `.view()` of a
conv output) keeps NCHW, and the report says why. `time_models` times whole models the
same interleaved way. Both leave the torch random number generators as they found them.

Policy "latency" of `svdkern.compress` is decided here too: `inference_forms` (every
layer's dense layer and low-rank pair timed alone at every example, in the deployment
runtime: eager, torch.compile or ONNX Runtime, `svdkern.runtimes`), `lowrank_faster` (the
layers whose pair is faster) and `fastest_not_slower` (the whole candidate model to deploy,
timed against the all-dense one).

The example inputs are taken as every verb takes them (`svdkern.examples`): a batch
(`example_inputs`, `example_kwargs`), an `input_shape` (a random batch of it), or an
`Example`.

Example::

    report = svdkern.tune_forms(model, torch.randn(32, 3, 32, 32), memory_format="auto")
    print(report)                          # per layer: times of every form, the choice
    svdkern.prune(model, energy=1e-3, optimizer=opt)
    svdkern.tune_forms(model, x)           # re-times only the layers that changed
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from svdkern import runtimes
from svdkern.examples import Example
from svdkern.nn import SVDLayer, svd_layers
from svdkern.tables import format_table
from svdkern.trace import modes_kept

__all__ = [
    "LayerForm",
    "ModelChoice",
    "TuneReport",
    "clear_tune_cache",
    "fastest_not_slower",
    "inference_forms",
    "lowrank_faster",
    "memory_format_of",
    "set_memory_format",
    "time_models",
    "tune_forms",
]

TRAINING_FORMS = ("compose", "chain")
INFERENCE_FORMS = ("dense", "lowrank")
_ROUND_S = 2e-3  # each timed round lasts at least this long
_MAX_CALLS = 64
# For inference the low-rank pair replaces the dense layer only when it is at least this
# much faster: a deployed model must not get slower by timing noise.
_DEPLOY_MARGIN = 0.05
# Policy "latency" compares whole models: a candidate within this fraction of the all-dense
# model's time at an input counts as not slower there. Identical models measure up to ~3%
# apart in one interleaved timing (the deploy benchmark's dense-copy rows), so a stricter
# rule rejects, by noise alone, a model that ties at batch 1 and is 17% faster at 256.
_TIE = 0.02
# Each timed round of a whole model lasts at least this long (a few calls at batch 1).
_MODEL_ROUND_S = 0.02

MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

# key → (chosen form, {form: median ms})
_CACHE: dict[tuple, tuple[str, dict[str, float]]] = {}


@dataclass
class LayerForm:
    """One SVD layer at one input shape: median ms of each candidate and the choice."""

    name: str
    input_shape: tuple[int, ...]
    rank: int
    full_rank: int
    training: bool
    times_ms: dict[str, float]
    form: str
    cached: bool

    @property
    def speedup(self) -> float:
        """Time of the slowest candidate / time of the chosen one."""
        return max(self.times_ms.values()) / self.times_ms[self.form]


@dataclass
class TuneReport:
    """What `tune_forms` chose: a LayerForm per (layer, input shape); `timed` counts the
    (layer, shape) pairs actually measured (the others came from the cache)."""

    training: bool
    seconds: float
    layers: list[LayerForm] = field(default_factory=list)
    # Where the inference forms ran (`svdkern.runtimes.RUNTIMES`); training is always eager.
    runtime: str = "eager"
    # memory_format="auto": the format chosen, {format: median ms of a model step} and
    # {format: why it was no candidate} (the model's forward fails in it).
    memory_format: str | None = None
    memory_format_ms: dict[str, float] = field(default_factory=dict)
    memory_format_skipped: dict[str, str] = field(default_factory=dict)

    @property
    def timed(self) -> int:
        return sum(not lay.cached for lay in self.layers)

    def forms(self) -> dict[str, str]:
        """{layer name: form} (the form at the layer's first input shape; `layers` holds
        every shape's)."""
        out: dict[str, str] = {}
        for lay in self.layers:
            out.setdefault(lay.name, lay.form)
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "timed": self.timed}

    def __str__(self) -> str:
        names = TRAINING_FORMS if self.training else INFERENCE_FORMS
        header = ("layer", "input", "rank", *(f"{n} ms" for n in names), "form")
        rows = [
            (
                lay.name,
                "×".join(map(str, lay.input_shape)),
                f"{lay.rank}/{lay.full_rank}",
                *(f"{lay.times_ms[n]:.3f}" for n in names),
                lay.form + (" (cached)" if lay.cached else ""),
            )
            for lay in self.layers
        ]
        what = "forward + backward" if self.training else f"forward ({self.runtime})"
        text = (
            format_table(header, rows)
            + f"\n{what}; {self.timed} timed, {len(self.layers) - self.timed} from the cache, "
            f"{self.seconds:.2f} s"
        )
        if self.memory_format_ms or self.memory_format_skipped:
            times = ", ".join(f"{k} {v:.3f} ms" for k, v in self.memory_format_ms.items())
            text += (
                f"\nmodel step by memory format: {times or 'not timed'}; "
                f"chosen: {self.memory_format}"
            )
            for fmt, why in self.memory_format_skipped.items():
                text += f"\n{fmt} left out: {why}"
        return text


def clear_tune_cache() -> None:
    """Forget every measured form (e.g. after the machine's load changed)."""
    _CACHE.clear()


@contextlib.contextmanager
def _rng_kept(tensors: Iterable) -> Iterator[None]:
    """Restore the CPU random number generator, and that of every CUDA device `tensors` are
    on, on exit: timing draws random inputs and runs forwards (dropout), and must not
    change what the caller draws next."""
    cuda = sorted({t.device.index for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda})
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        yield


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    """(enabled, dtype) of autocast for `device_type`: a layer under bf16 autocast runs
    other kernels than in fp32, so its timings must not be shared."""
    if not torch.is_autocast_enabled(device_type):
        return (False, None)
    return (True, torch.get_autocast_dtype(device_type))


def _forward_failure(exc: ValueError) -> str:
    """The exception a forward raised, from the ValueError `_record_inputs` wrapped it in."""
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {cause}"


def _channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-D tensor is laid out channels-last (NHWC) rather than contiguous."""
    return (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def _record_inputs(
    model: nn.Module, args: tuple, kwargs: dict, training: bool
) -> list[tuple[str, SVDLayer, tuple[int, ...], torch.dtype, bool, bool]]:
    """(name, layer, input shape, input dtype, input requires grad, input channels-last) of
    every distinct call of every SVD layer in one forward of `args`. The forward runs in
    eval mode (no batch-norm statistics are updated) with gradients on when training, so
    requires_grad is as in training; the train/eval flags are restored."""
    layers = svd_layers(model)
    seen: dict[tuple, tuple] = {}

    def hook(name, layer):
        def record(module, inputs):
            x = inputs[0]
            call = (name, layer, tuple(x.shape), x.dtype, x.requires_grad, _channels_last(x))
            seen.setdefault((name, *call[2:]), call)

        return record

    with modes_kept(model):
        handles = [layer.register_forward_pre_hook(hook(name, layer)) for name, layer in layers]
        try:
            model.eval()
            with torch.set_grad_enabled(training):
                try:
                    model(*args, **kwargs)
                except Exception as exc:
                    raise ValueError(
                        "example_inputs: the model's forward failed on them "
                        f"({type(exc).__name__}: {exc}); pass the arguments the model is called "
                        "with, as a tensor or a tuple (plus example_kwargs)"
                    ) from exc
        finally:
            for h in handles:
                h.remove()
    return list(seen.values())


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _time_interleaved(
    fns: dict[str, Callable[[], None]],
    repeats: int,
    device: torch.device,
    round_s: float = _ROUND_S,
    max_calls: int = _MAX_CALLS,
) -> dict[str, float]:
    """Median ms per call of every function, rounds (each ≥ round_s, ≤ max_calls calls)
    interleaved across the functions."""
    sync = _sync(device)
    calls = {}
    for name, fn in fns.items():
        fn()  # warm-up: allocator, oneDNN primitive / kernel selection
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        once = max(time.perf_counter() - start, 1e-7)
        calls[name] = max(1, min(max_calls, math.ceil(round_s / once)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: 1e3 * statistics.median(v) for name, v in samples.items()}


def _example(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, channels_last: bool
) -> torch.Tensor:
    x = torch.randn(shape, device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _training_candidates(
    layer: SVDLayer,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    input_grad: bool,
    channels_last: bool,
) -> dict[str, Callable[[], None]]:
    """fwd + bwd of a copy of `layer` in each form, on a random input of `shape`."""
    fns = {}
    x = _example(shape, dtype, layer.U.device, channels_last).requires_grad_(input_grad)
    for form in TRAINING_FORMS:
        twin = copy.deepcopy(layer).train()
        twin.mode = form
        with torch.no_grad():
            grad_out = torch.randn_like(twin(x))
        params = [p for p in twin.parameters() if p.requires_grad]

        def step(twin=twin, params=params, grad_out=grad_out) -> None:
            for p in params:
                p.grad = None
            x.grad = None
            twin(x).backward(grad_out)

        fns[form] = step
    return fns


def _inference_candidates(
    layer: SVDLayer,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    channels_last: bool,
    runtime: str = "eager",
) -> dict[str, Callable[[], None]]:
    """Forward of the deployed forms of `layer` (`to_dense()`, `to_lowrank()`), each run in
    `runtime` (`svdkern.runtimes.prepare`: compiled or exported at this input)."""
    x = _example(shape, dtype, layer.U.device, channels_last)
    modules = {"dense": layer.to_dense().eval(), "lowrank": layer.to_lowrank().eval()}
    if channels_last:
        modules = {form: m.to(memory_format=torch.channels_last) for form, m in modules.items()}
    modules = {form: runtimes.prepare(runtime, m, [((x,), {})]) for form, m in modules.items()}

    def forward(module: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                module(x)

        return run

    return {form: forward(m) for form, m in modules.items()}


def _measure(
    layer: SVDLayer,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    input_grad: bool,
    channels_last: bool,
    training: bool,
    repeats: int,
    runtime: str = "eager",
) -> dict[str, float]:
    """{form: median ms} of `layer`'s candidate forms at input `shape` (the deployed forms
    run in `runtime`; training is always eager)."""
    if training:
        fns = _training_candidates(layer, shape, dtype, input_grad, channels_last)
    else:
        fns = _inference_candidates(layer, shape, dtype, channels_last, runtime)
    return _time_interleaved(fns, repeats, layer.U.device)


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: 4-D floating-point tensor arguments as channels-last."""
    return tuple(
        a.contiguous(memory_format=torch.channels_last)
        if isinstance(a, torch.Tensor) and a.dim() == 4 and a.is_floating_point()
        else a
        for a in args
    )


def set_memory_format(
    model: nn.Module,
    memory_format: str,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    example_kwargs: Mapping | None = None,
    input_shape: Sequence[int] | None = None,
    example: Example | None = None,
) -> nn.Module:
    """Run `model`'s image activations in `memory_format`: "channels_last" (NHWC) or
    "contiguous" (NCHW, PyTorch's default).

    "channels_last" converts the 4-D parameters and buffers (dense conv weights) and
    registers a forward pre-hook on `model` that converts its 4-D floating-point inputs;
    convolutions, batch norm, activations and pooling then keep that layout from layer
    to layer (SVD conv layers included), so oneDNN on CPU runs without a reorder per
    conv. "contiguous" undoes it. The values computed are unchanged, but a forward that
    needs NCHW strides (`x.view(x.size(0), -1)` of a conv output; `.reshape()` and
    `.flatten()` work in both) fails channels-last: pass `example_inputs` to check.

    Args:
        model: the model; returned.
        memory_format: "contiguous" or "channels_last".
        example_inputs: optional, a batch as in `tune_forms` (`model(*example_inputs,
            **example_kwargs)`): an eval, no-grad forward on a copy of `model` in
            `memory_format` must run, else ValueError and `model` is left unchanged.
            Without an example nothing is checked.
        example_kwargs: keyword arguments of that forward.
        input_shape, example: the example as a zero batch of that shape, or as an
            `svdkern.Example` (instead of example_inputs and example_kwargs).

    Example::

        svdkern.set_memory_format(model, "channels_last", torch.randn(8, 3, 32, 32))
    """
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(
            f"memory_format must be one of {tuple(MEMORY_FORMATS)}, got {memory_format!r}"
        )
    example = Example.of(input_shape, example_inputs, example_kwargs, example)
    for args, kwargs in [] if example is None else example.calls(model):
        twin = set_memory_format(copy.deepcopy(model), memory_format)
        try:
            _record_inputs(twin, args, kwargs, training=False)
        except ValueError as exc:
            _record_inputs(model, args, kwargs, training=False)  # bad inputs: say so
            raise ValueError(
                f"memory_format={memory_format!r}: the model's forward fails in this layout "
                f"on example_inputs ({_forward_failure(exc)}) although it runs in its current "
                f"one ({memory_format_of(model)!r}); the model is left unchanged. Replace a "
                "layout-dependent op (.view() of a conv output: .reshape() or .flatten()) "
                "or keep the current layout"
            ) from exc.__cause__
    model.to(memory_format=MEMORY_FORMATS[memory_format])
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _to_channels_last:
            del model._forward_pre_hooks[key]
    if memory_format == "channels_last":
        model.register_forward_pre_hook(_to_channels_last)
    return model


def memory_format_of(model: nn.Module) -> str:
    """The format `set_memory_format` last gave `model` ("contiguous" if never)."""
    hooks = model._forward_pre_hooks.values()
    return "channels_last" if any(h is _to_channels_last for h in hooks) else "contiguous"


def _model_step(model: nn.Module, args: tuple, kwargs: dict, training: bool) -> Callable[[], None]:
    """One forward (+ backward of the outputs' sum when training) of `model` on `args`."""

    def step() -> None:
        if not training:
            with torch.no_grad():
                model(*args, **kwargs)
            return
        out = model(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        loss = sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor))
        model.zero_grad(set_to_none=True)
        loss.backward()

    model.train(training)
    return step


def _tune_memory_format(
    model: nn.Module, args: tuple, kwargs: dict, training: bool, repeats: int, use_cache: bool
) -> tuple[dict[str, float], dict[str, str]]:
    """({format: median ms of a model step}, {format: why it is no candidate}): each format
    with its own tuned forms, timed on copies of `model` (its weights, statistics and
    gradients stay untouched). A format the forward fails in is left out (contiguous, the
    default, failing means the inputs are wrong: ValueError); with one format left nothing
    is timed."""
    twins, skipped = {}, {}
    for fmt in MEMORY_FORMATS:
        twin = set_memory_format(copy.deepcopy(model), fmt)
        try:
            twins[fmt] = (twin, _record_inputs(twin, args, kwargs, training))
        except ValueError as exc:
            if fmt == "contiguous":
                raise
            skipped[fmt] = f"the model's forward fails in this layout ({_forward_failure(exc)})"
    if len(twins) < 2:
        return {}, skipped
    steps = {}
    for fmt, (twin, calls) in twins.items():
        _tune_layers(twin, calls, training, repeats, use_cache, TuneReport(training, 0.0), "eager")
        steps[fmt] = _model_step(twin, args, kwargs, training)
    device = next(model.parameters()).device
    return _time_interleaved(steps, repeats, device), skipped


def _tune_layers(
    model: nn.Module,
    calls: list[tuple[str, SVDLayer, tuple[int, ...], torch.dtype, bool, bool]],
    training: bool,
    repeats: int,
    use_cache: bool,
    report: TuneReport,
    runtime: str,
) -> None:
    """Time (or take from the cache) every SVD layer's forms at the inputs `calls`
    (`_record_inputs`) recorded, the inference forms in `runtime`; fix the training choice
    in the layer for each input shape; append a LayerForm per call to `report`."""
    for name, layer, shape, dtype, input_grad, channels_last in calls:
        device = layer.U.device
        key = (
            type(layer).__name__,
            layer.geometry,
            layer.rank,
            shape,
            input_grad and training,
            channels_last,
            str(device),
            dtype,
            layer.U.dtype,
            _autocast_state(device.type),
            torch.get_num_threads(),
            bool(training),
            runtime,
        )
        cached = use_cache and key in _CACHE
        if cached:
            form, times = _CACHE[key]
        else:
            times = _measure(
                layer, shape, dtype, input_grad, channels_last, training, repeats, runtime
            )
        if not cached:
            form = min(times, key=times.get)
            if not training and times["lowrank"] > (1 - _DEPLOY_MARGIN) * times["dense"]:
                form = "dense"
            _CACHE[key] = (form, times)
        if training:
            # Inference times compare the deployed dense layer with the low-rank pair, not
            # the SVD layer's own eval forward (which recomposes W per call): they inform
            # `compress(policy="latency")` and leave the layer's forms alone.
            layer.set_form(shape, form == "chain", training=True)
        report.layers.append(
            LayerForm(
                name, shape, layer.rank, layer.full_rank, bool(training), dict(times), form, cached
            )
        )


def time_models(
    models: dict[str, nn.Module],
    examples: Sequence[tuple[tuple, dict]],
    repeats: int = 5,
    round_s: float = _ROUND_S,
    max_calls: int = _MAX_CALLS,
) -> dict[str, list[float]]:
    """{name: [median ms of an eval, no-grad forward per example]} of every model, each
    example's models timed interleaved (the same rounds fall on all of them alike), a
    round being ≥ round_s long or max_calls calls. The torch random number generators are
    left as found."""
    out: dict[str, list[float]] = {name: [] for name in models}
    flags = {name: m.training for name, m in models.items()}
    tensors = [t for m in models.values() for t in (*m.parameters(), *m.buffers())]
    tensors += [t for args, kwargs in examples for t in (*args, *kwargs.values())]
    with _rng_kept(tensors):
        try:
            for args, kwargs in examples:

                def forward(model: nn.Module, args=args, kwargs=kwargs) -> Callable[[], None]:
                    def run() -> None:
                        with torch.no_grad():
                            model(*args, **kwargs)

                    return run

                fns = {name: forward(m.eval()) for name, m in models.items()}
                device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
                times = _time_interleaved(
                    fns, repeats, device or torch.device("cpu"), round_s, max_calls
                )
                for name, ms in times.items():
                    out[name].append(ms)
        finally:
            for name, m in models.items():
                m.train(flags[name])
    return out


def tune_forms(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    training: bool = True,
    repeats: int = 5,
    use_cache: bool = True,
    memory_format: str | None = None,
    example_kwargs: Mapping | None = None,
    input_shape: Sequence[int] | None = None,
    example: Example | None = None,
    runtime: str = "eager",
) -> TuneReport:
    """Time every SVD layer's forms on the model's device and fix the fastest in each layer.

    Args:
        model: a model with SVD layers (`SVDLinear`, `SVDConv2d`); with training=True its
            layers' forms are set (`layer.set_form`); nothing else changes (batch-norm
            statistics included).
        example_inputs: a batch as training or inference will see it (a tensor, or a tuple
            for `model(*example_inputs)`); every layer is timed at the input shape it gets.
        training: True: forward + backward of compose-then-dense vs the low-rank chain;
            the faster becomes the form `forward` takes in train mode. False: forward of
            the deployed dense layer vs the low-rank pair, reported only (the layers are
            left unchanged; `svdkern.compress(policy="latency")` deploys the choice); the
            pair wins only when ≥ 5% faster.
        repeats: interleaved timing rounds per candidate (median of them decides), ≥ 1.
        use_cache: reuse earlier measurements of the same layer geometry, rank, input
            (shape, dtype, layout), device, parameter dtype, autocast state and thread
            count.
        example_kwargs: keyword arguments of that forward (`model(*example_inputs,
            **example_kwargs)`).
        input_shape: instead of example_inputs, the shape of the batch (a random float
            batch in the model's dtype is timed); example: an `svdkern.Example` instead.
        memory_format: None leaves the model's layout alone; "contiguous" or
            "channels_last" sets it (`set_memory_format`, checked on example_inputs:
            ValueError if the forward fails in it); "auto" (image inputs only) tunes the
            layers under both layouts on copies of the model, times a whole model step
            with each, and changes the model's layout (contiguous for a model never set)
            only when the other one is ≥ 5% faster. A layout the forward fails in (a
            `.view()` of a conv output, channels-last) is no candidate; the report's
            `memory_format_skipped` says why.
            The layout is part of the form: on CPU, oneDNN runs thin convolutions far
            faster channels-last (no reorder per conv), which is what makes low-rank
            conv chains pay off there.
        runtime: with training=False, where the deployed forms run (`svdkern.runtimes`):
            "eager", "compile" (each form compiled at the layer's input) or "onnxruntime"
            (each form exported and run in ONNX Runtime); training is timed eagerly.
    Returns:
        TuneReport (per layer and input shape: median ms of each candidate, the choice;
        `str(report)` is a table). The torch random number generators (CPU, and the
        CUDA devices of the model and inputs) are left as found.

    Example::

        report = svdkern.tune_forms(model, next(iter(loader))[0].to(device))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    runtimes.check_runtime(runtime)
    if training and runtime != "eager":
        raise ValueError(
            f"runtime={runtime!r} times deployed forms: pass training=False (training steps "
            "run eagerly)"
        )
    example = Example.of(input_shape, example_inputs, example_kwargs, example)
    if example is None:
        raise ValueError(
            "tune_forms times every layer at the input it gets: pass example_inputs (a batch "
            "as training or inference sees it, plus example_kwargs) or input_shape"
        )
    example = example.single("tune_forms")
    if not svd_layers(model):
        raise ValueError(
            "model has no SVD layers to tune; decompose it first (svdkern.decompose(model))"
        )
    if memory_format not in (None, "auto", *MEMORY_FORMATS):
        raise ValueError(
            f"memory_format must be None, 'auto' or one of {tuple(MEMORY_FORMATS)}, "
            f"got {memory_format!r}"
        )
    start = time.perf_counter()
    report = TuneReport(bool(training), 0.0, runtime=runtime)
    tensors = [*model.parameters(), *model.buffers(), *example.args, *example.kwargs.values()]
    with _rng_kept(tensors):
        ((args, kwargs),) = example.calls(model, fill=torch.randn)
        images = any(isinstance(a, torch.Tensor) and a.dim() == 4 for a in args)
        if memory_format in MEMORY_FORMATS:
            set_memory_format(model, memory_format, args, example_kwargs=kwargs)
        elif memory_format == "auto" and images:
            times, skipped = _tune_memory_format(model, args, kwargs, training, repeats, use_cache)
            report.memory_format_ms, report.memory_format_skipped = times, skipped
            current = memory_format_of(model)
            if times:
                # The other layout must win clearly: a layout change by timing noise would be
                # churn (re-tuning after every rank cut would flip a near tie back and forth).
                other = "contiguous" if current == "channels_last" else "channels_last"
                faster = times[other] < (1 - _DEPLOY_MARGIN) * times[current]
                set_memory_format(model, other if faster else current)
            else:
                set_memory_format(model, next(f for f in MEMORY_FORMATS if f not in skipped))
        report.memory_format = memory_format_of(model)
        calls = _record_inputs(model, args, kwargs, training)
        _tune_layers(model, calls, training, repeats, use_cache, report, runtime)
    report.seconds = time.perf_counter() - start
    return report


def inference_forms(
    model: nn.Module, examples: Sequence[tuple[tuple, dict]], runtime: str = "eager"
) -> list[LayerForm]:
    """The LayerForm of every SVD layer at every example (args, kwargs): its deployed dense
    layer and low-rank pair timed alone in `runtime` (`tune_forms` with training=False)."""
    forms: list[LayerForm] = []
    for args, kwargs in examples:
        report = tune_forms(model, args, training=False, example_kwargs=kwargs, runtime=runtime)
        forms += report.layers
    return forms


def lowrank_faster(forms: Sequence[LayerForm], tolerance: float = 0.0) -> dict[str, bool]:
    """{layer name: deploy the low-rank pair?} from inference LayerForms (`inference_forms`):
    the pair where it is ≥ 5% faster than the dense layer at every input shape, or with a
    tolerance > 0 where it is at most that fraction slower (the smaller form wins a near
    tie)."""
    lowrank: dict[str, bool] = {}
    for lay in forms:
        dense, pair = lay.times_ms["dense"], lay.times_ms["lowrank"]
        limit = (1 + tolerance) if tolerance > 0 else (1 - _DEPLOY_MARGIN)
        lowrank[lay.name] = lowrank.get(lay.name, True) and pair <= limit * dense
    return lowrank


@dataclass
class ModelChoice:
    """What `fastest_not_slower` chose: the candidate's name, {name: ms per example} of the
    first timing of all candidates, and of the second timing (the winner against dense;
    empty when dense won the first)."""

    chosen: str
    times_ms: dict[str, list[float]]
    confirm_ms: dict[str, list[float]]


def fastest_not_slower(
    candidates: dict[str, nn.Module],
    examples: Sequence[tuple[tuple, dict]],
    tolerance: float = 0.0,
    params: Mapping[str, int] | None = None,
) -> ModelChoice:
    """The candidate with the lowest mean time ratio to `candidates["dense"]` among those no
    slower than it at any example (within 2%, the resolution of one timing; the dense one
    itself qualifies), timed interleaved (`time_models`). The winner is timed once more
    against dense and kept only if that confirms it: the fastest of several noisy timings
    is biased fast (its own noise helped it win), and a fresh timing has no such bias.

    With a tolerance > 0 and the candidates' sizes (`params`), a candidate may be up to
    that fraction slower than dense at an example (beyond the 2%), and among those whose
    mean ratio is within (1 + tolerance) of the fastest the smallest wins: a model as fast
    and several times smaller is not traded for a dense one by timing noise."""
    _fastest = _Fastest(tolerance, params)
    best = _fastest(time_models(candidates, examples, round_s=_MODEL_ROUND_S))
    if best != "dense":
        pair = {best: candidates[best], "dense": candidates["dense"]}
        best = _fastest(time_models(pair, examples, round_s=_MODEL_ROUND_S))
    first, *again = _fastest.timings
    return ModelChoice(best, first, again[0] if again else {})


class _Fastest:
    """The rule of `fastest_not_slower`, applied to one timing per call; keeps the timings
    it judged (`timings`)."""

    def __init__(self, tolerance: float, params: Mapping[str, int] | None) -> None:
        self.tolerance, self.params = tolerance, params
        self.timings: list[dict[str, list[float]]] = []

    def __call__(self, times: dict[str, list[float]]) -> str:
        """The name with the lowest mean ratio to times["dense"] below 1, nowhere above
        1 + _TIE ("dense" when none is); with a tolerance and sizes, the smallest of those
        nowhere above 1 + _TIE + tolerance whose mean is within (1 + tolerance) of the
        best."""
        self.timings.append(times)
        dense = times["dense"]
        near: dict[str, float] = {}
        best, best_mean = "dense", 1.0
        for name, ms in times.items():
            ratios = [t / d for t, d in zip(ms, dense, strict=True)]
            mean = sum(ratios) / len(ratios)
            if max(ratios) <= 1.0 + _TIE + self.tolerance:
                near[name] = mean
            if max(ratios) <= 1.0 + _TIE and mean < best_mean:
                best, best_mean = name, mean
        if self.tolerance > 0 and self.params:
            within = [n for n, mean in near.items() if mean <= best_mean * (1 + self.tolerance)]
            best = min(within, key=lambda n: (self.params[n], near[n]))
        return best
