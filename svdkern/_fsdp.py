"""SVD layers of a model sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`): reading
their whole factors and cutting their ranks.

FSDP2 manages each parameter of a sharded module as an `FSDPParam` of the module's parameter
group: between forward passes the module holds the sharded parameter (a DTensor whose dim 0
is split over the mesh), whose sharded gradient and optimizer state the optimizer steps.
`SVDTraining` needs two things FSDP does not do for it:

* read U, s, V whole (the regularizer, the energy rule): inside `gathered`, a layer's
  factors read as the full tensors all-gathered from the shards, differentiably (the
  gradient of a shard is its part of the full gradient, added to the gradient FSDP
  reduce-scatters from the forward);
* change their shapes (a rank cut): inside `unsharded`, the factors are full Parameters
  with their full gradients and full optimizer state, so the ordinary cut
  (`SVDLayer.prune_`) slices them; on exit each factor is sharded anew by a new FSDPParam
  in its group's place, and its gradient and optimizer state are split as it is.

Every process of the mesh must enter both together (they all-gather). These reach into
FSDP2's parameter groups (`torch.distributed.fsdp._fully_shard`), which FSDP has no public
way to re-register a changed parameter with.

Example::

    if check_supported(model, svd_layers(model)):
        with gathered(model, layers):
            loss = regularizer(model)["total"]
        with unsharded(model, [layer], optimizer):
            layer.prune_(k, optimizer=optimizer)
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from svdkern.nn import SVDLayer, swap_param

__all__ = ["check_supported", "gathered", "sharded_factors", "unsharded"]

FACTORS = ("U", "s", "V")


def _fsdp_module_class():
    """FSDP2's FSDPModule, or None when torch.distributed.fsdp was never imported (then no
    module can have been sharded by it)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return None if fsdp is None else fsdp.FSDPModule


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    cls = _fsdp_module_class()
    return [] if cls is None else [m for m in model.modules() if isinstance(m, cls)]


def _param_groups(module: nn.Module) -> list:
    """The FSDPParamGroups of an FSDP2 module (none for a module without fully_shard's state)."""
    from torch.distributed.fsdp import fully_shard

    state = fully_shard.state(module)
    if state is None:
        return []
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # one group per module
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


def sharded_factors(model: nn.Module) -> dict[tuple[nn.Module, str], tuple]:
    """{(SVD layer, "U" | "s" | "V"): (FSDPParamGroup, FSDPParam)} of every SVD factor FSDP2
    manages in `model`."""
    found = {}
    for module in _fsdp_modules(model):
        for group in _param_groups(module):
            for fsdp_param in group.fsdp_params:
                info = fsdp_param._module_info
                if isinstance(info.module, SVDLayer) and info.param_name in FACTORS:
                    found[(info.module, info.param_name)] = (group, fsdp_param)
    return found


def check_supported(model: nn.Module, layers: Iterable[tuple[str, SVDLayer]]) -> bool:
    """True when `model` is sharded by FSDP2 as `SVDTraining` supports it (its SVD factors
    sharded over a data-parallel mesh), False when nothing in it is sharded. Raises
    ValueError naming the model for sharding it does not support: FSDP1
    (`FullyShardedDataParallel`), a module of FSDP2's class without fully_shard's state,
    SVD factors that are DTensors FSDP2 does not manage (tensor parallelism) or that FSDP2
    manages as DTensors of another parallelism or without sharding them."""
    for m in model.modules():
        if any(c.__name__ == "FullyShardedDataParallel" for c in type(m).__mro__):
            _refuse(
                "FullyShardedDataParallel (FSDP1), which flattens the parameters it wraps",
                "apply torch.distributed.fsdp.fully_shard (FSDP2) to the blocks and the root "
                "instead",
            )
    modules = _fsdp_modules(model)
    if modules:
        from torch.distributed.fsdp import fully_shard
    for m in modules:
        if fully_shard.state(m) is None:
            _refuse(
                f"{type(m).__name__}, a module of FSDP2's class without the state of "
                "torch.distributed.fsdp.fully_shard",
                "shard it with fully_shard itself",
            )
    factors = sharded_factors(model) if modules else {}
    for name, layer in layers:
        for key in FACTORS:
            where = f"{name}.{key}" if name else key
            held = factors.get((layer, key))
            if held is None:
                if _is_dtensor(getattr(layer, key)):
                    _refuse(
                        f"{where} is a DTensor that FSDP2 does not manage",
                        "shard SVD layers with torch.distributed.fsdp.fully_shard only",
                    )
                continue
            fsdp_param = held[1]
            if fsdp_param.is_dtensor or not _sharding(fsdp_param.mesh_info):
                _refuse(
                    f"fully_shard manages {where} as a DTensor of another parallelism or "
                    "replicates it without sharding",
                    "shard SVD layers with torch.distributed.fsdp.fully_shard over a "
                    "data-parallel mesh only",
                )
    return bool(modules)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def _sharding(mesh_info) -> bool:
    """Whether FSDP2's mesh info shards parameters (FSDP or HSDP), not only replicates them."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo

    return isinstance(mesh_info, FSDPMeshInfo)


def _refuse(what: str, instead: str) -> None:
    raise ValueError(
        f"model is sharded ({what}): SVDTraining supports FSDP2's "
        f"torch.distributed.fsdp.fully_shard on a data-parallel mesh; {instead}, or train the "
        "SVD layers under DistributedDataParallel (a rank-r layer holds only r·(m + n + 1) "
        "values)"
    )


@contextmanager
def gathered(
    model: nn.Module, layers: Iterable[SVDLayer], names: Iterable[str] = FACTORS
) -> Iterator[None]:
    """Inside, `layer.U` / `.s` / `.V` (those in `names`) of each of `layers` that FSDP2
    shards read as the full tensor, all-gathered from the sharded parameter (differentiable
    where grad mode is on: the sharded parameter gets its part of the gradient). The full
    tensor shadows the registered parameter as an instance attribute, which attribute
    lookup finds before nn.Module's parameters; the module's parameters are not touched.
    Every process of the mesh must enter it (an all-gather per factor)."""
    factors = sharded_factors(model)
    shown: list[tuple[SVDLayer, str]] = []
    try:
        for layer in layers:
            for name in names:
                held = factors.get((layer, name))
                if held is None:
                    continue
                layer.__dict__[name] = held[1].sharded_param.full_tensor()
                shown.append((layer, name))
        yield
    finally:
        for layer, name in shown:
            layer.__dict__.pop(name, None)


@contextmanager
def unsharded(
    model: nn.Module, layers: Iterable[SVDLayer], optimizer: torch.optim.Optimizer | None
) -> Iterator[None]:
    """Inside, the FSDP2-sharded factors of `layers` are full Parameters registered on the
    layers, with full gradients, in the sharded ones' places in `optimizer` with their
    optimizer state gathered (per-element tensors whole, scalars such as Adam's step as they
    were), so `SVDLayer.prune_` slices them as without FSDP. On exit (also after an error)
    each factor the layers then hold is sharded anew: a new FSDPParam takes the old one's
    place in its group (same mesh, placement, mixed-precision and offload policies), and
    its gradient and per-element optimizer state are split as the new sharded parameter is.
    Every process of the mesh must enter it, between optimizer steps (FSDP's groups are
    resharded first)."""
    for module in _fsdp_modules(model):
        module.reshard()
    factors = sharded_factors(model)
    taken = []
    try:
        for layer in layers:
            for name in FACTORS:
                held = factors.get((layer, name))
                if held is None:
                    continue
                taken.append((layer, name, *held))
                _unshard_factor(layer, name, held[1].sharded_param, optimizer)
        yield
    finally:
        for layer, name, group, fsdp_param in taken:
            _reshard_factor(layer, name, group, fsdp_param, optimizer)


def _full(tensor):
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def _unshard_factor(layer: SVDLayer, name: str, sharded: nn.Parameter, optimizer) -> None:
    full = nn.Parameter(_full(sharded.detach()), sharded.requires_grad)
    if sharded.grad is not None:
        full.grad = _full(sharded.grad)
    if optimizer is not None:
        state = optimizer.state.get(sharded)
        state = None if not state else {k: _full(v) for k, v in state.items()}
        swap_param(optimizer, sharded, full, state)
    setattr(layer, name, full)


@torch.no_grad()
def _reshard_factor(layer: SVDLayer, name: str, group, old, optimizer) -> None:
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    param = getattr(layer, name)
    placement = old.fsdp_placement
    new = FSDPParam(
        param,
        old._module_info,
        old.mesh_info,
        old.post_forward_mesh_info,
        old.device,
        lambda _: placement,
        group.mp_policy,
        group.offload_policy,
    )
    new._param_fqn = old._param_fqn
    new.init_dtype_attrs(group.mp_policy)
    handle = getattr(old, "_post_load_hook_handle", None)
    if handle is not None:
        handle.remove()
    group.fsdp_params[group.fsdp_params.index(old)] = new
    sharded = new.sharded_param
    if param.grad is not None:
        sharded.grad = _split_like(param.grad, sharded)
    if optimizer is not None:
        state = optimizer.state.get(param)
        if state:
            state = {
                k: _split_like(v, sharded)
                if isinstance(v, torch.Tensor) and v.shape == param.shape
                else v
                for k, v in state.items()
            }
        swap_param(optimizer, param, sharded, state)


def _split_like(full: torch.Tensor, sharded: torch.Tensor) -> torch.Tensor:
    """`full` (the same on every process) as a DTensor laid out as `sharded`: each process
    keeps its own part, no communication."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, sharded.device_mesh, sharded.placements, src_data_rank=None)
