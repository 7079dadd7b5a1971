"""Helpers shared by the Triton launchers: dtypes, autotune switch, device facts, packing.

Autotuning runs only on a GPU with SVDKERN_AUTOTUNE unset or 1. Under
TRITON_INTERPRET=1 (the kernels on CPU tensors) or SVDKERN_AUTOTUNE=0 every
kernel uses one deterministic default config, so results do not depend on timing.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = not INTERPRET and os.environ.get("SVDKERN_AUTOTUNE", "1").strip() != "0"

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """Accumulator dtype for inputs of `dtype`: fp64 for fp64, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: TF32 for fp32 only when torch allows it, else exact ("ieee")."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRET:
        return "tf32"
    return "ieee"


def check_device_dtype(op: str, t: torch.Tensor) -> None:
    """The kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if t.device.type == "cpu" and not INTERPRET:
        raise ValueError(
            f"{op}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU), "
            f"got a tensor on {t.device}"
        )
    if t.dtype not in _TL_DTYPES:
        raise TypeError(f"{op}: unsupported dtype {t.dtype}")


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


def configs(space: Sequence[dict], default: dict) -> list[triton.Config]:
    """Autotune configs from dicts of block sizes (+ num_warps, num_stages), or only `default`."""

    def make(kw: dict) -> triton.Config:
        kw = dict(kw)
        warps, stages = kw.pop("num_warps", 4), kw.pop("num_stages", 3)
        return triton.Config(kw, num_warps=warps, num_stages=stages)

    return [make(kw) for kw in space] if AUTOTUNE else [make(default)]


def _block_volume(cfg: triton.Config) -> int:
    volume = 1
    for key, value in cfg.kwargs.items():
        if key.startswith("BLOCK_"):
            volume *= value
    return volume


def prune(keep: Callable[[dict, dict], bool]) -> dict:
    """prune_configs_by for triton.autotune: keep configs where keep(cfg, args), with cfg the
    config's kwargs plus num_stages. If none is kept, the smallest tile (it fits any shared
    memory; a single config is launched without benchmarking, so it must not fail)."""

    def early_config_prune(cfgs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        kept = [c for c in cfgs if keep({**c.kwargs, "num_stages": c.num_stages}, args)]
        return kept or [min(cfgs, key=_block_volume)]

    return {"early_config_prune": early_config_prune}


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


_TABLES: dict[tuple, torch.Tensor] = {}


def problem_table(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """An int64 (problems × fields) table on `device`, cached by its content.

    The cache makes a grouped launch free of host-to-device copies after the first
    call with the same shapes, so it can be captured in a CUDA graph.
    """
    key = (device, tuple(tuple(r) for r in rows))
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) > 256:
            _TABLES.clear()
        table = torch.tensor(rows, dtype=torch.int64).to(device)
        _TABLES[key] = table
    return table


def unpack(buf: torch.Tensor, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """Views of consecutive row-major tensors of `shapes` in the packed buffer."""
    out, start = [], 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        out.append(buf[start : start + n].view(shape))
        start += n
    return out
