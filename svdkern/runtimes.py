"""Where a deployed model runs: the runtimes `compress(policy="latency", runtime=...)` times
its candidates in, each wrapped as an nn.Module that `svdkern.tune.time_models` can time.

    eager        the model itself, eval mode, no grad
    compile      torch.compile (inductor, static shapes, `torch._inductor.config.freezing`:
                 weights folded as constants, conv + batch norm fused) under no grad; on
                 CUDA mode "reduce-overhead" (CUDA graphs)
    onnxruntime  exported by `torch.onnx.export` (the torch.export-based exporter), one
                 ONNX Runtime InferenceSession (CPU execution provider, as many intra-op
                 threads as torch uses) per example input signature

`prepare` compiles or exports once per example, and checks that the runtime's outputs equal
the eager model's within `TOLERANCES` (relative to the largest output magnitude): a runtime
that computes something else is an error, not a speed-up. ONNX Runtime needs the optional
dependencies: `pip install svdkern[deploy]`.

Example::

    run = svdkern.runtimes.prepare("onnxruntime", deployed.eval(), [((x,), {})])
    y = run(x)                                    # ONNX Runtime's output, as a torch tensor
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["RUNTIMES", "TOLERANCES", "check_runtime", "prepare"]

RUNTIMES = ("eager", "compile", "onnxruntime")
# Largest allowed |runtime − eager| of an output, as a fraction of max |eager output|:
# fused kernels and other summation orders differ by float rounding, nothing more.
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
_INSTALL = "pip install svdkern[deploy]"


def check_runtime(runtime: str) -> None:
    """ValueError for an unknown runtime; RuntimeError naming the install command when the
    runtime's packages are missing."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == "onnxruntime":
        _onnxruntime()


def _onnxruntime() -> types.ModuleType:
    """The onnxruntime module, once the exporter's packages (onnx, onnxscript) are there."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"runtime='onnxruntime' needs onnxruntime, onnx and onnxscript ({exc}): "
            f"{_INSTALL}, or time in runtime='eager' or 'compile'"
        ) from exc
    return onnxruntime


def prepare(runtime: str, model: nn.Module, examples: Sequence[tuple[tuple, dict]]) -> nn.Module:
    """`model` as it runs in `runtime`, ready (compiled or exported) for every example
    (args, kwargs) and checked against the eager model there (`TOLERANCES`).

    Args:
        runtime: one of `RUNTIMES`.
        model: the model to run (put in eval mode; its weights are shared, not copied).
        examples: the (args, kwargs) it will be called with; compile and onnxruntime run
            only these input signatures (shapes, dtypes).
    Returns:
        an nn.Module whose forward runs `model` in the runtime under no grad (eager: the
        model itself); onnxruntime returns the outputs flattened (a tensor, or a tuple).
    Raises:
        ValueError: unknown runtime, or a model on CUDA for onnxruntime;
        RuntimeError: missing packages, a model that does not compile or export, or
            outputs that differ from eager beyond the tolerance.
    """
    check_runtime(runtime)
    model.eval()
    if runtime == "eager":
        return model
    run = _Compiled(model, examples) if runtime == "compile" else _OnnxRuntime(model, examples)
    with torch.no_grad():
        for args, kwargs in examples:
            _check_outputs(runtime, model(*args, **kwargs), run(*args, **kwargs))
    return run


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _check_outputs(runtime: str, expected: Any, actual: Any) -> None:
    expected, actual = _tensors(expected), _tensors(actual)
    if len(expected) != len(actual):
        raise RuntimeError(
            f"runtime={runtime!r} returned {len(actual)} tensors where the eager model returns "
            f"{len(expected)}"
        )
    for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
        if not e.is_floating_point():
            if not torch.equal(e.cpu(), a.cpu()):
                raise RuntimeError(f"runtime={runtime!r}: output {i} differs from eager")
            continue
        scale = e.abs().max().item() if e.numel() else 0.0
        error = (a.to(e.device, e.dtype) - e).abs().max().item() if e.numel() else 0.0
        tol = TOLERANCES.get(e.dtype, 1e-4) * max(scale, 1e-30)
        if not error <= tol:
            raise RuntimeError(
                f"runtime={runtime!r}: output {i} differs from the eager model's by {error:.3g} "
                f"(largest |output| {scale:.3g}, allowed {tol:.3g}); deploy with "
                "runtime='eager' or report the model to the runtime's maintainers"
            )


def _call(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    return model(*args, **kwargs)


class _Compiled(nn.Module):
    """`torch.compile` of `model` (inductor, static shapes, freezing), compiled at every
    example on construction."""

    def __init__(self, model: nn.Module, examples: Sequence[tuple[tuple, dict]]) -> None:
        super().__init__()
        self.model = model
        cuda = any(p.is_cuda for p in model.parameters())
        # A fresh code object per model: dynamo keeps its compiled graphs on the code of the
        # frame it compiles, so every deployed candidate gets its own cache (no recompile
        # limit shared with other models of the same class, freed with this object).
        fresh = types.FunctionType(_call.__code__.replace(), _call.__globals__, "deployed")
        self._fn = torch.compile(fresh, dynamic=False, mode="reduce-overhead" if cuda else None)
        import torch._inductor.config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True):
            for args, kwargs in examples:
                try:
                    self._fn(model, args, kwargs)
                except Exception as exc:
                    raise RuntimeError(
                        f"runtime='compile': torch.compile failed on {type(model).__name__} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        "run torch.compile(model) on it to see where, or use runtime='eager'"
                    ) from exc

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self._fn(self.model, args, kwargs)


def _signature(tensors: list[torch.Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


class _OnnxRuntime(nn.Module):
    """`model` exported to ONNX at every example and run by ONNX Runtime on the CPU."""

    def __init__(self, model: nn.Module, examples: Sequence[tuple[tuple, dict]]) -> None:
        super().__init__()
        ort = _onnxruntime()
        self.model = model
        if any(t.device.type != "cpu" for t in (*model.parameters(), *model.buffers())):
            raise ValueError(
                "runtime='onnxruntime' runs on ONNX Runtime's CPU execution provider: move "
                "the model and example inputs to the CPU, or use runtime='compile' on the GPU"
            )
        self._sessions: dict[tuple, tuple[Any, list[str]]] = {}
        for args, kwargs in examples:
            key = _signature(_tensors((args, kwargs)))
            if key not in self._sessions:
                self._sessions[key] = self._session(ort, model, args, kwargs)

    @staticmethod
    def _session(ort: types.ModuleType, model: nn.Module, args: tuple, kwargs: dict) -> tuple:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, verbose=False)
            proto = program.model_proto.SerializeToString()
        except Exception as exc:
            raise RuntimeError(
                f"runtime='onnxruntime': torch.onnx.export failed on {type(model).__name__} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "make the model exportable (torch.export.export(model, args) shows where) or "
                "use runtime='compile' or 'eager'"
            ) from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Idle sessions must not spin: timed interleaved, one session's spinning threads
        # would take the cores of the next (two identical sessions measured 0.65-0.84x apart).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        given = len(_tensors((args, kwargs)))
        if len(names) != given:
            raise RuntimeError(
                f"runtime='onnxruntime': the exported {type(model).__name__} takes {len(names)} "
                f"inputs ({names}) for the example's {given} tensors (an input the forward does "
                "not use is dropped by the exporter); pass only the tensors the model uses"
            )
        return session, names

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        tensors = _tensors((args, kwargs))
        key = _signature(tensors)
        if key not in self._sessions:
            raise ValueError(
                f"runtime='onnxruntime': no session for inputs {key}; prepare() exported the "
                f"model for {list(self._sessions)}"
            )
        session, names = self._sessions[key]
        feeds = {n: t.detach().contiguous().numpy() for n, t in zip(names, tensors, strict=True)}
        outputs = [torch.from_numpy(o) for o in session.run(None, feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
