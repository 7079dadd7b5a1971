"""Batch norm folded into the convolution before it, for deployment.

In eval mode BatchNorm computes y = (x − μ)·γ/√(σ² + ε) + β per channel with its running
statistics μ, σ²; after a convolution x = W∗z + b that is the convolution with

    W' = W · γ/√(σ² + ε)  (per output channel),   b' = (b − μ) · γ/√(σ² + ε) + β

`fold_batchnorm` rewrites such pairs in place: the convolution gets W', b' (a bias is added
where it had none), the BatchNorm becomes nn.Identity. A deployed low-rank pair (an
nn.Sequential of two convs) takes the fold in its second conv.

Pairs are found per module: each module's own forward is traced by torch.fx with its
children as leaves. A BatchNorm is folded only where that graph feeds it exactly the
output of one conv (or of an nn.Sequential ending in one) and nothing else uses that
output; both modules occur once in the model (not shared), have no hooks and are not read
as attributes (`self.conv.weight`) by the traced forward. A module whose forward does not
trace (data-dependent control flow) folds nothing of its own; its children are still
searched, on the assumption that it calls its children and not their descendants.

Example::

    folded = svdkern.fold.fold_batchnorm(model.eval())    # [("conv1", "bn1"), ...]
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["fold_batchnorm", "foldable_pairs"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_DIMS = {nn.BatchNorm1d: (1,), nn.BatchNorm2d: (2,), nn.BatchNorm3d: (3,)}


class _Shallow(fx.Tracer):
    """Traces one module's own forward: every submodule call stays one call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks) or any(
        h for h in (m._backward_hooks, m._backward_pre_hooks)
    )


def _path(m: nn.Module) -> list[nn.Module] | None:
    """[m, ..., conv]: the modules from `m` down to the conv whose output is `m`'s output
    (m itself, or the last conv of plain nn.Sequential containers); None if there is none."""
    if isinstance(m, _CONVS):
        return [m]
    if type(m) is nn.Sequential and len(m) > 0:
        rest = _path(m[-1])
        return None if rest is None else [m, *rest]
    return None


def _bn_fits(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        type(bn) in _BN_DIMS
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
        and _BN_DIMS[type(bn)] == (conv.weight.dim() - 2,)
    )


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, batch norm name) of every pair `fold_batchnorm` would fold, in
    `named_modules` order; the conv name is that of the conv taking the fold (e.g.
    "layer.conv1.1" for a low-rank pair)."""
    names = {id(m): n for n, m in model.named_modules()}
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    calls: Counter[int] = Counter()
    found: list[tuple[str, str]] = []  # (name of the module feeding the bn, bn name)
    read: set[int] = set()
    for parent in model.modules():
        if not parent._modules or isinstance(parent, (*_CONVS, _BatchNorm)):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = _Shallow().trace(parent)
        except Exception:
            continue
        for node in graph.nodes:
            if node.op == "get_attr":
                owner = node.target.rpartition(".")[0]
                with contextlib.suppress(AttributeError):
                    read.add(id(parent.get_submodule(owner)))
            if node.op != "call_module":
                continue
            module = parent.get_submodule(node.target)
            calls[id(module)] += 1
            if not isinstance(module, _BatchNorm) or len(node.args) != 1 or node.kwargs:
                continue
            source = node.args[0]
            if not isinstance(source, fx.Node) or source.op != "call_module":
                continue
            if len(source.users) != 1:
                continue
            path = _path(parent.get_submodule(source.target))
            if path is None or not _bn_fits(path[-1], module):
                continue
            found.append((names[id(path[0])], names[id(module)]))
    modules = dict(model.named_modules())
    pairs = []
    for first_name, bn_name in found:
        chain = [*_path(modules[first_name]), modules[bn_name]]
        if calls[id(chain[0])] != 1 or calls[id(chain[-1])] != 1:
            continue
        if any(uses[id(m)] != 1 or _hooked(m) or id(m) in read for m in chain):
            continue
        pairs.append((names[id(chain[-2])], bn_name))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every eval-mode BatchNorm that follows a conv (see the module docstring) into
    that conv, in place; the BatchNorm becomes nn.Identity.

    Eval-mode outputs are unchanged up to float rounding (the fold is computed in float64).
    A folded model has no batch statistics left: in train mode it behaves as in eval.

    Args:
        model: the model (changed in place).
    Returns:
        the (conv name, batch norm name) pairs folded.
    Raises:
        ValueError: a BatchNorm of a foldable pair is in training mode (its output depends
            on the batch, not on running statistics): call model.eval() first.
    """
    pairs = foldable_pairs(model)
    modules = dict(model.named_modules())
    training = [bn for _, bn in pairs if modules[bn].training]
    if training:
        raise ValueError(
            f"fold_bn: batch norm layers {training} are in training mode, where they normalize "
            "with the batch's statistics and cannot be folded; call model.eval() before "
            "compressing with fold_bn=True, or pass fold_bn=False"
        )
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        bias = -bn.running_mean.double() * scale
        if bn.bias is not None:
            bias = bias + bn.bias.double()
        if conv.bias is not None:
            bias = bias + conv.bias.double() * scale
        view = (-1,) + (1,) * (conv.weight.dim() - 1)
        conv.weight.copy_(conv.weight.double() * scale.view(view))
        if conv.bias is None:
            conv.bias = nn.Parameter(
                bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad
            )
        else:
            conv.bias.copy_(bias)
        owner, _, attr = bn_name.rpartition(".")
        setattr(model.get_submodule(owner), attr, nn.Identity())
    return pairs
