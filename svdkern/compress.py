"""SVD → plain torch: `compress` replaces every SVD layer by its low-rank pair or one dense
layer, chosen by a policy: the cost model's MAC rule ("flops", `svdkern.costs`), measured
times ("latency", timed by `svdkern.tune`), or always one form.

Example::

    deployable = svdkern.compress(model, input_shape=(1, 3, 32, 32))   # plain nn modules
    fast = svdkern.compress(model, "latency", [(1, 3, 32, 32), (256, 3, 32, 32)])
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from svdkern import tune
from svdkern.costs import CostModel
from svdkern.decompose import move_hooks
from svdkern.examples import Example
from svdkern.nn import SVDLayer, SVDMultiheadAttention, svd_layers

__all__ = ["POLICIES", "compress"]

POLICIES = ("flops", "latency", "lowrank", "dense")


def _plain_like(twin: nn.Module, plain: nn.Module) -> nn.Module:
    """`plain` with `twin`'s hooks and, for an SVD layer, its frozen flags: a frozen U
    freezes every weight of the plain form, a frozen bias its bias."""
    move_hooks(twin, plain)
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
    example: Example | None = None,
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
    found on the example (input_shape or example_inputs; `svdkern.trace.weight_reads`, the
    list `flops` and `prune` count with), or were found by `decompose` given example inputs
    (`SVDLayer.weight_read`).

    Args:
        model: a model with SVD layers (left unchanged).
        policy: "flops" (low-rank pair where it costs fewer MACs than dense, else dense:
            `svdkern.costs.LayerCost.lowrank`),
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
        example: an `svdkern.Example` instead of the three.
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
    example = Example.of(input_shape, example_inputs, example_kwargs, example)
    if policy == "latency" and example is None:
        raise ValueError(
            "policy='latency' needs input_shape (one shape or a list, e.g. [(1, 3, 32, 32), "
            "(256, 3, 32, 32)]) or example_inputs: forms are timed at the inputs the model "
            "will see"
        )
    if policy != "latency" and example is not None:
        example = example.single(f"compress(policy={policy!r})")
    tensors = [*model.parameters(), *model.buffers()]
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    # The plain layers' constructors and the latency policy's inputs draw random numbers.
    with torch.random.fork_rng(devices=cuda):
        deployed = _compress(model, policy, example)
    return _without_svdkern_hooks(deployed)


def _compress(model: nn.Module, policy: str, example: Example | None) -> nn.Module:
    """`compress` (arguments checked), svdkern's hooks still in place: the latency policy
    times the candidates as the SVD model runs (channels-last inputs under
    set_memory_format). The MAC rule and the layers read through .weight come from the
    example's first input shape."""
    costs = CostModel.from_model(model, None if example is None else example.first())
    examples = example.calls(model, fill=torch.randn) if policy == "latency" else []
    measured = tune.lowrank_faster(model, examples) if policy == "latency" else {}

    def lowrank_of(rule: str) -> Callable[[str], bool]:
        def choose(name: str) -> bool:
            if costs.layers[name].weight_read:
                return False
            if rule == "flops":
                return costs.layers[name].lowrank()
            if rule == "latency":
                return measured.get(name, False)
            return rule == "lowrank"

        return choose

    if policy != "latency":
        return _deployed(model, lowrank_of(policy))
    # Layers timed alone do not add up to the model's time (caches, one more op per layer
    # at batch 1): the per-layer choice, the MAC rule's and the all-dense model are timed
    # whole at every example, and the fastest that is nowhere slower than dense (by more
    # than 2%) is kept.
    candidates = {rule: _deployed(model, lowrank_of(rule)) for rule in ("latency", "flops")}
    candidates["dense"] = _deployed(model, lowrank_of("dense"))
    return candidates[tune.fastest_not_slower(candidates, examples)]


def _deployed(model: nn.Module, lowrank_of: Callable[[str], bool]) -> nn.Module:
    """A deep copy of `model` with every SVD layer replaced by its low-rank pair (where
    `lowrank_of(name)`) or its dense layer; see `compress`."""
    new = copy.deepcopy(model)
    plain: dict[int, nn.Module] = {}
    dense_names: set[str] = set()
    for name, twin in svd_layers(new):
        lowrank = lowrank_of(name)
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
