"""Helpers shared by the Triton launchers: dtypes, autotuning, device facts, packing, tables.

Autotuning runs only on a GPU with SVDKERN_AUTOTUNE unset or 1. Under
TRITON_INTERPRET=1 (the kernels on CPU tensors) or SVDKERN_AUTOTUNE=0 every
kernel takes the first of its default configs that its pruning keeps for the
launch (no benchmarking), so results do not depend on timing.

Autotune keys are sizes bucketed to the next power of two (`bucket`), passed to
the kernels as key-only arguments: a new batch size or a rank cut inside the
same bucket reuses the tuned config (every config is correct for any size; the
masks handle the exact one). Pruning works on the same buckets, so what a
bucket keeps does not depend on which size came first.

Every pruning bounds the shared memory of a config (`SMEM_BUDGET`: the H100's
227 KiB per block less a margin) with an estimate that counts all pipeline
stages and on-chip intermediates as live at once, and keeps only configs of the
launch's class: tensor-core tiles (bf16, fp16, fp32 with TF32) or FMA tiles
(fp32 "ieee", `fma`), each space listing configs that compile without register
spills for sm_90 (`make kernel-check` checks them).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = not INTERPRET and os.environ.get("SVDKERN_AUTOTUNE", "1").strip() != "0"

# Shared memory per block of an H100 (sm_90: 227 KiB, Triton's max_shared_mem), and the
# budget a config's estimate must stay under: the estimates count tiles, not Triton's
# padding, barriers and scratch, so keep 12 KiB free.
SMEM_LIMIT = 232448
SMEM_BUDGET = SMEM_LIMIT - 12 * 1024

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """Accumulator dtype for inputs of `dtype`: fp64 for fp64, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def cuda_matmul_tf32() -> bool:
    """Whether torch lets fp32 CUDA matmuls use TF32, read through the API this torch has.

    torch ≥ 2.9 has `torch.backends.cuda.matmul.fp32_precision` ("tf32", "ieee", or "none":
    nothing set, which means IEEE); once a script sets it (or `torch.backends.fp32_precision`),
    reading the legacy `allow_tf32` raises, while the new getter also reflects legacy settings.
    Older torch has only `allow_tf32`.
    """
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except AttributeError:
        return bool(matmul.allow_tf32)
    return precision == "tf32"


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: TF32 for fp32 only when torch allows it, else exact ("ieee")."""
    if dtype == torch.float32 and not INTERPRET and cuda_matmul_tf32():
        return "tf32"
    return "ieee"


def check_device_dtype(op: str, t: torch.Tensor) -> None:
    """The kernels run on CUDA tensors (fp32, bf16, fp16), or on CPU tensors under
    TRITON_INTERPRET=1 (fp64 too, so the interpreter can gradcheck them)."""
    if t.device.type == "cpu" and not INTERPRET:
        raise ValueError(
            f"{op}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU), "
            f"got a tensor on {t.device}"
        )
    if t.dtype not in _TL_DTYPES:
        raise TypeError(f"{op}: unsupported dtype {t.dtype}")
    if t.device.type == "cuda" and t.dtype not in CUDA_DTYPES:
        # fp64 has no tensor cores, and its on-chip tiles overflow shared memory.
        raise TypeError(
            f"{op}: dtype {t.dtype} is not supported on CUDA (float32, bfloat16, float16 are); "
            f"float64 runs on CPU: call it with CPU tensors, or cast to float32"
        )


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a small constant under the interpreter)."""
    if device.type != "cuda":
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def bucket(n: int) -> int:
    """The autotune bucket of a size: the next power of two (1 for 0 and 1)."""
    return triton.next_power_of_2(max(1, int(n)))


def fma(args: dict) -> bool:
    """Whether a launch's tl.dot runs on FMA units, not tensor cores: fp32 with "ieee"
    precision (and fp64, interpreter only). Those get their own, smaller tiles: the FMA
    dot holds its operands in registers, and the tensor-core tiles spill there."""
    return args["PRECISION"] == "ieee" and _elem(args) >= 4


def _elem(args: dict) -> int:
    """Bytes per element of the launch's operand dtype (its first tensor argument)."""
    return next(v for v in args.values() if isinstance(v, torch.Tensor)).element_size()


def union(*spaces: Sequence[dict]) -> list[dict]:
    """The configs of all spaces, each once, in order."""
    out: list[dict] = []
    for space in spaces:
        out += [kw for kw in space if kw not in out]
    return out


def member(cfg: dict, space: Sequence[dict]) -> bool:
    """Whether config `cfg` (a keep() dict) is one of `space`."""
    return any(all(cfg.get(k) == v for k, v in kw.items()) for kw in space)


def config(kw: dict) -> triton.Config:
    """A triton.Config from a dict of block sizes plus num_warps and num_stages."""
    kw = dict(kw)
    warps, stages = kw.pop("num_warps", 4), kw.pop("num_stages", 3)
    return triton.Config(kw, num_warps=warps, num_stages=stages)


def _block_volume(cfg: triton.Config) -> int:
    volume = 1
    for key, value in cfg.kwargs.items():
        if key.startswith("BLOCK_"):
            volume *= value
    return volume


def _cfg_dict(cfg: triton.Config) -> dict:
    return {**cfg.kwargs, "num_stages": cfg.num_stages, "num_warps": cfg.num_warps}


def _kept(cfgs, args: dict, keep: Callable[[dict, dict], bool]) -> list[triton.Config]:
    kept = [c for c in cfgs if keep(_cfg_dict(c), args)]
    return kept or [min(cfgs, key=_block_volume)]


def prune(keep: Callable[[dict, dict], bool]) -> dict:
    """prune_configs_by for triton.autotune: keep configs where keep(cfg, args), with cfg the
    config's kwargs plus num_stages and num_warps. If none is kept, the smallest tile (each
    kernel's space holds one that fits every launch its launcher makes)."""

    def early_config_prune(cfgs, named_args, **kwargs):
        return _kept(cfgs, {**named_args, **kwargs}, keep)

    return {"early_config_prune": early_config_prune}


class _Fixed:
    """A kernel launched with the first of `defaults` that `keep` accepts: deterministic,
    never benchmarked (SVDKERN_AUTOTUNE=0 and the interpreter)."""

    def __init__(self, fn, defaults: list[triton.Config], keys: list[str], keep) -> None:
        self.fn = fn
        self.configs = defaults
        self.keys = keys  # what autotuning would key on (the launchers' buckets)
        self.keep = keep
        self.arg_names = fn.arg_names

    def pick(self, *args, **kwargs) -> triton.Config:
        return _kept(self.configs, {**dict(zip(self.arg_names, args)), **kwargs}, self.keep)[0]

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            cfg = self.pick(*args, **kwargs)
            return self.fn[grid](
                *args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages
            )

        return launch


def autotune(
    space: Sequence[dict],
    defaults: Sequence[dict],
    key: list[str],
    keep: Callable[[dict, dict], bool],
    reset_to_zero: list[str] | None = None,
):
    """Decorator: triton.autotune over `space` pruned by `keep` when autotuning, else `_Fixed`
    over `defaults` (an ordered list; the first kept one runs)."""
    if AUTOTUNE:
        return triton.autotune(
            configs=[config(kw) for kw in space],
            key=key,
            prune_configs_by=prune(keep),
            reset_to_zero=reset_to_zero,
        )
    return lambda fn: _Fixed(fn, [config(kw) for kw in defaults], key, keep)


def _consecutive(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The flat buffer under `tensors` if they are contiguous and back to back in one storage."""
    first = tensors[0]
    start = expected = first.storage_offset()
    ptr = first.untyped_storage().data_ptr()
    for t in tensors:
        if (
            not t.is_contiguous()
            or t.untyped_storage().data_ptr() != ptr
            or t.storage_offset() != expected
        ):
            return None
        expected += t.numel()
    return first.as_strided((expected - start,), (1,), start)


def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """All tensors flattened (row-major) into one contiguous buffer.

    Tensors that already lie back to back (the views our grouped ops return) are
    used in place; otherwise one copy kernel (torch.cat) packs them.
    """
    flat = _consecutive(tensors)
    if flat is not None:
        return flat
    return torch.cat([t.reshape(-1) for t in tensors])


def offsets(sizes: Sequence[int]) -> list[int]:
    """Exclusive prefix sums: where each packed tensor starts."""
    out, acc = [], 0
    for n in sizes:
        out.append(acc)
        acc += n
    return out


class _Table:
    """A problem table on the device, the stream its copy ran on and an event after it."""

    __slots__ = ("captured", "ready", "stream", "tensor")

    def __init__(self, tensor: torch.Tensor, stream, ready) -> None:
        self.tensor, self.stream, self.ready, self.captured = tensor, stream, ready, False


_TABLES: collections.OrderedDict[tuple, _Table] = collections.OrderedDict()
# Tables a CUDA graph has not captured; past this many the least recently used are dropped.
MAX_TABLES = 256


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _evict() -> None:
    """Drop least recently used tables beyond MAX_TABLES, never one a captured graph reads
    (the graph keeps its address, not a reference)."""
    free = [key for key, entry in _TABLES.items() if not entry.captured]
    for key in free[: max(0, len(free) - MAX_TABLES)]:
        del _TABLES[key]


def problem_table(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """An int64 (problems × fields) table on `device`, cached by its content.

    A miss builds the table from pinned host memory with an asynchronous copy on the
    current stream; later launches with the same shapes reuse it, so a launch can be
    captured in a CUDA graph once the op has run eagerly with those shapes (a miss
    during capture raises: a copy cannot be captured from pageable memory, and the
    table would have to outlive the capture). A table used during capture is kept for
    the life of the process. A table used on another stream than the one that built it
    waits for its copy and is recorded on that stream.
    """
    key = (device, tuple(tuple(int(v) for v in r) for r in rows))
    entry = _TABLES.get(key)
    capturing = _capturing(device)
    if entry is None:
        if capturing:
            raise RuntimeError(
                "svdkern: a grouped op met new layer shapes while a CUDA graph is being "
                "captured; run the step once eagerly with the same shapes before capturing "
                "(the op builds its problem table on that first call)"
            )
        host = torch.tensor(rows, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
            stream = torch.cuda.current_stream(device)
            table = host.to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
            entry = _Table(table, stream, ready)
        else:
            entry = _Table(host.to(device), None, None)
        _TABLES[key] = entry
        _evict()
    else:
        _TABLES.move_to_end(key)
    if entry.stream is not None:
        stream = torch.cuda.current_stream(device)
        if stream != entry.stream:
            if not capturing:
                stream.wait_event(entry.ready)
            entry.tensor.record_stream(stream)
        entry.captured = entry.captured or capturing
    return entry.tensor
