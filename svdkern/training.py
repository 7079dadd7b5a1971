"""SVD training in any training loop: the regularizer, rank cuts and the compressed model.

`SVDTraining` is the recipe of rank-adaptive SVD training as one object, used like a
learning-rate scheduler: add `penalty()` to the loss, call `step()` after every
`optimizer.step()`, and `compress()` at the end. Every `cut_every` steps `step()` cuts each
SVD layer's rank by the energy rule (`svdkern.prune(energy=cut_energy)`), slicing the
optimizer's state and the gradients with the parameters, re-tunes the layers' forms (if
asked) and, under torch.distributed, applies the ranks and forms process 0 chose. A model
sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`) trains and is cut the same way: the
penalty and the energy rule read U, s, V all-gathered from their shards, and a cut reshards
the cut factors with their gradients and sharded optimizer state. Its
`state_dict()` holds the step count, the cuts so far and the forms in force, so a resumed
run goes on exactly where it stopped.

`svdkern train --method svd-adaptive`, the transformers `Trainer` integration
(`svdkern.integrations.transformers`) and a hand-written loop all drive this one object.

Example::

    model = svdkern.decompose(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    st = svdkern.SVDTraining(model, opt, cut_every=100, cut_energy=0.1,
                             example_inputs=(ids[:1],))
    for ids, targets in loader:
        loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten()) + st.penalty()
        opt.zero_grad(); loss.backward(); opt.step()
        if st.step():                       # ranks were cut this step
            print(st.history[-1])
    deployable = st.compress()
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from svdkern import _fsdp
from svdkern.compiled import uncompiled
from svdkern.compress import compress as _compress
from svdkern.examples import Example
from svdkern.flops import macs_at
from svdkern.nn import SVDLayer, svd_layers
from svdkern.prune import prune
from svdkern.regularize import SVDRegularizer
from svdkern.trace import layer_inputs
from svdkern.tune import set_memory_format, tune_forms

__all__ = ["Cut", "SVDTraining"]

_STATE_FORMAT = 1


@dataclass
class Cut:
    """One rank cut: the step after which it ran, each SVD layer's rank before and after,
    and the counted MACs after it (None without example inputs to count convs)."""

    step: int
    ranks_before: dict[str, int]
    ranks: dict[str, int]
    macs: int | None = None
    dense_macs: int | None = None
    forms: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        """Whether any rank fell (a DDP wrapper or compiled graph of the model is stale)."""
        return any(self.ranks[n] < r for n, r in self.ranks_before.items())

    @property
    def flops_ratio(self) -> float | None:
        """MACs after the cut / MACs of the dense model (None when not counted)."""
        if self.macs is None or not self.dense_macs:
            return None
        return self.macs / self.dense_macs

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flops_ratio": self.flops_ratio}

    def __str__(self) -> str:
        kept = sum(self.ranks.values())
        before = sum(self.ranks_before.values())
        text = f"step {self.step}: ranks {before} → {kept}"
        if self.flops_ratio is not None:
            text += f", MACs {self.flops_ratio:.1%} of dense"
        return text


def _unwrap(model: nn.Module) -> nn.Module:
    """The module that holds the parameters: under DDP's `.module` and torch.compile's
    `_orig_mod` (both keep the user's module, so cutting it cuts what they run)."""
    model = uncompiled(model)
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = uncompiled(model.module)
    return model


def _check_optimizer(optimizer, layers: list[tuple[str, SVDLayer]], sharded: dict) -> None:
    """`sharded`: {(layer, key): (group, FSDPParam)} of the factors FSDP2 shards, whose
    sharded parameter the optimizer must hold."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}

    def param(layer, key):
        fsdp = sharded.get((layer, key))
        return getattr(layer, key) if fsdp is None else fsdp[1].sharded_param

    missing = [
        f"{name}.{key}" if name else key
        for name, layer in layers
        for key in ("U", "s", "V")
        if param(layer, key).requires_grad and id(param(layer, key)) not in held
    ]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        after = "svdkern.decompose(model)"
        before = "decompose holds the dense weights"
        if sharded:
            after += " and fully_shard"
            before += ", one built before fully_shard the unsharded factors"
        raise ValueError(
            f"optimizer does not hold the SVD parameters {missing[:3]}{more}: build it from "
            f"model.parameters() after {after} (an optimizer built before {before}, which "
            "the model no longer uses)"
        )


def _positive_int_or_none(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


class SVDTraining:
    """Rank-adaptive SVD training as an object that works in any training loop.

    Args:
        model: a model with SVD layers (`svdkern.decompose(model)`); a DDP or
            torch.compile wrapper of one is accepted (the wrapped module is cut), and so is
            one sharded by FSDP2's `torch.distributed.fsdp.fully_shard` (applied to its
            blocks and its root, on a 1-D or HSDP mesh, CPU with gloo too): `penalty()`
            all-gathers U, s, V to compute the loss (the sharded factors get their part of
            its gradient), and a cut gathers the cut layers' factors, gradients and
            optimizer state, slices them and shards them anew in FSDP's parameter groups,
            so the model needs no re-wrapping (`svdkern._fsdp`). FSDP1
            (`FullyShardedDataParallel`) and SVD factors under tensor parallelism are
            refused; under FSDP, `tune_forms` and `compress()` are not available.
        optimizer: the optimizer training it; it must hold every trainable U, s, V (under
            FSDP: the sharded ones, i.e. built after fully_shard). Rank cuts slice its
            state (Adam moments, momentum; sharded under FSDP) with the parameters.
        orth: λ_o, weight of the orthogonality loss Σ (‖UᵀU − I‖² + ‖VᵀV − I‖²) / r².
        sparsity: "l1", "hoyer", "hoyer_square" or None: the sparsity loss on s.
        strength: λ_s, its weight.
        orth_every: compute the orthogonality loss on every k-th `penalty()` call,
            weighted k·λ_o (amortizes its Gram matrices; 1 = every call).
        cut_every: cut ranks after every this many `step()` calls (None: never; then the
            object is the regularizer with a step count). A step is whatever the loop
            calls `step()` for: an optimizer step, or an epoch.
        cut_energy: ε of the energy rule at each cut, in (0, 1): each layer keeps the
            fewest singular values holding ≥ (1 − ε) of Σ s².
        cut_until: no cut at or after this step (e.g. the run's last step, so the
            last optimizer steps train the final ranks); None: no limit.
        multiple_of, min_rank: round kept ranks up to a multiple of this / floor them
            (as in `svdkern.prune`).
        example_inputs, example_kwargs, example: one example of the forward (its
            arguments, or a `svdkern.Example`; batch 1 is enough); the layers' input
            shapes are recorded from it once, to count each cut's MACs, and `compress()`
            uses it. Without it, Linear-like layers count one row and convs are not
            counted.
        tune_forms: time each SVD layer's forms (compose vs low-rank chain) on
            `tune_inputs` (a training batch) after every cut and in `tune()`, and run the
            faster (`svdkern.tune_forms`).
        process_group: the torch.distributed group whose processes train the model
            (default: the world, when initialized): process 0's ranks and forms are
            applied on all of them.

    Raises:
        ValueError/TypeError naming the argument: a model without SVD layers, an optimizer
        that does not hold its SVD parameters, cut_energy outside (0, 1) (≥ 1 would cut
        every singular value), non-positive cut_every, a model sharded in a way not
        supported (FSDP1, tensor parallelism), tune_forms with an FSDP-sharded model.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        orth: float = 1.0,
        sparsity: str | None = "hoyer",
        strength: float = 0.1,
        orth_every: int = 1,
        cut_every: int | None = None,
        cut_energy: float = 0.1,
        cut_until: int | None = None,
        multiple_of: int | None = None,
        min_rank: int | None = None,
        example_inputs=None,
        example_kwargs: Mapping | None = None,
        example: Example | None = None,
        tune_forms: bool = False,
        tune_inputs=None,
        process_group=None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = _unwrap(model)
        layers = svd_layers(self.model)
        if not layers:
            raise ValueError(
                "model has no SVD layers (SVDLinear, SVDConv1d/2d, ...): convert it first with "
                "svdkern.decompose(model), then build the optimizer from its parameters"
            )
        self._sharded = _fsdp.check_supported(self.model, layers)
        _check_optimizer(
            optimizer, layers, _fsdp.sharded_factors(self.model) if self._sharded else {}
        )
        self.optimizer = optimizer
        self.regularizer = SVDRegularizer(
            self.model, orth=orth, sparsity=sparsity, strength=strength
        )
        self.orth_every = _positive_int_or_none("orth_every", orth_every) or 1
        self.cut_every = _positive_int_or_none("cut_every", cut_every)
        self.cut_until = _positive_int_or_none("cut_until", cut_until)
        if (
            isinstance(cut_energy, bool)
            or not isinstance(cut_energy, (int, float))
            or not 0 < cut_energy < 1
        ):
            raise ValueError(
                f"cut_energy must be a number in (0, 1) (the fraction of Σ s² a cut may "
                f"remove; 1 would cut every singular value), got {cut_energy!r}"
            )
        self.cut_energy = float(cut_energy)
        self.multiple_of = _positive_int_or_none("multiple_of", multiple_of)
        self.min_rank = _positive_int_or_none("min_rank", min_rank)
        self.example = Example.of(
            example_inputs=example_inputs, example_kwargs=example_kwargs, example=example
        )
        self.tune_forms = bool(tune_forms)
        if self.tune_forms and self._sharded:
            raise ValueError(
                "tune_forms=True is not supported on a model sharded by FSDP (the forms are "
                "timed on whole layers); leave tune_forms=False"
            )
        self.tune_example = Example.of(example_inputs=tune_inputs)
        if self.tune_forms and self.tune_example is None:
            raise ValueError(
                "tune_forms=True needs tune_inputs: a batch as training sees it (the forms "
                "are timed at its shapes)"
            )
        self.process_group = process_group
        self.steps = 0
        self.penalties = 0
        self.history: list[Cut] = []
        self.tunes: list[dict[str, Any]] = []
        self.last_terms: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, list[tuple[int, ...]]] | None = None
        self._memory_format: str | None = None

    # -- the loss ---------------------------------------------------------------------

    def penalty(self) -> torch.Tensor:
        """λ_o·orth + λ_s·sparsity over every SVD layer, a scalar to add to the task loss
        (one grouped op call per term). Call it once per training step; with
        orth_every=k the orthogonality term is computed on every k-th call, weighted k.
        The unweighted terms are kept in `last_terms` ({"orth", "sparsity", "total"}).
        Under FSDP it reads U, s, V all-gathered from their shards: every process calls it,
        and the full factors of every layer stay alive until `backward()` (the memory of
        the unsharded factors; orth_every=k gathers U and V on every k-th call only)."""
        k = self.orth_every
        scale = float(k) if self.penalties % k == 0 else 0.0
        self.penalties += 1
        with self._whole(("U", "s", "V") if scale else ("s",)):
            self.last_terms = self.regularizer(self.model, orth_scale=scale)
        return self.last_terms["total"]

    def _whole(self, names: tuple[str, ...]):
        """Under FSDP, a context in which every SVD layer's factors `names` read whole
        (all-gathered from their shards, differentiably); else nothing to do."""
        if not self._sharded:
            return nullcontext()
        return _fsdp.gathered(self.model, [layer for _, layer in svd_layers(self.model)], names)

    # -- the schedule -----------------------------------------------------------------

    def due(self, step: int | None = None) -> bool:
        """Whether a cut runs after `step` (default: the next `step()` call's count)."""
        n = self.steps + 1 if step is None else step
        if self.cut_every is None or n % self.cut_every:
            return False
        return self.cut_until is None or n < self.cut_until

    def step(self) -> Cut | None:
        """Count one step (call it after `optimizer.step()`); when a cut is due, cut the
        ranks and return what it did (else None). Gradients and optimizer state are
        sliced with U, s, V, so the cut may also sit between `backward()` and
        `optimizer.step()`. After a cut that `changed` ranks, rebuild a
        DistributedDataParallel wrapper (its buckets hold the old parameters); an FSDP2
        model needs nothing (its parameter groups hold the cut parameters). Under FSDP
        every process must call it (a cut all-gathers)."""
        self.steps += 1
        return self.cut() if self.due(self.steps) else None

    def cut(self) -> Cut:
        """Cut every SVD layer's rank by the energy rule now (process 0 decides under
        torch.distributed; under FSDP from the full s, all-gathered); returns the Cut, also
        appended to `history`."""
        before = self.ranks
        with self._whole(("s",)):
            plan = prune(
                self.model,
                energy=self.cut_energy,
                multiple_of=self.multiple_of,
                min_rank=self.min_rank,
                dry_run=True,
            )
        ranks = self._from_first({lay.name: lay.rank_after for lay in plan.layers})
        if self._sharded:
            cut = [(n, layer) for n, layer in svd_layers(self.model) if ranks[n] < layer.rank]
            with _fsdp.unsharded(self.model, [layer for _, layer in cut], self.optimizer):
                for name, layer in cut:  # as prune(ranks=) does, on the gathered factors
                    layer.prune_(ranks[name], optimizer=self.optimizer)
        else:
            prune(self.model, ranks=ranks, optimizer=self.optimizer)
        record = Cut(self.steps, before, self.ranks)
        if record.changed and self.tune_forms:
            record.forms = self.tune()
        record.macs, record.dense_macs = self.macs()
        self.history.append(record)
        return record

    @property
    def ranks(self) -> dict[str, int]:
        """{SVD layer: rank} now."""
        return {name: layer.rank for name, layer in svd_layers(self.model)}

    def macs(self) -> tuple[int, int] | tuple[None, None]:
        """(MACs of the model at its current ranks, each layer in its cheaper form; MACs of
        its dense form), counted at the example inputs' layer shapes (recorded on the first
        call); (None, None) when convs cannot be counted without an example."""
        if self._shapes is None:
            try:
                self._shapes = layer_inputs(self.model, self.example)
            except ValueError:  # convs without an example: not counted
                return None, None
        return macs_at(self.model, self._shapes)

    # -- forms ------------------------------------------------------------------------

    def tune(self) -> dict[str, Any]:
        """Time and fix every SVD layer's forms on `tune_inputs` (process 0's choice
        applied everywhere); returns and records what was chosen. Not available under
        FSDP (the forms are timed on whole layers)."""
        if self._sharded:
            raise ValueError(
                "tune() is not supported on a model sharded by FSDP (the forms are timed on "
                "whole layers); build SVDTraining with tune_forms=False"
            )
        report = tune_forms(
            self.model, example=self.tune_example, training=True, repeats=3, memory_format="auto"
        )
        forms = {name: layer.forms for name, layer in svd_layers(self.model)}
        forms, memory_format = self._from_first([forms, report.memory_format])
        self._apply_forms(forms, memory_format)
        record = {
            "step": self.steps,
            "forms": report.forms(),
            "timed": report.timed,
            "seconds": report.seconds,
            "memory_format": memory_format,
            "memory_format_ms": report.memory_format_ms,
        }
        self.tunes.append(record)
        return record

    def _apply_forms(self, forms, memory_format: str | None) -> None:
        if memory_format is not None:
            set_memory_format(self.model, memory_format)
        self._memory_format = memory_format
        for name, layer in svd_layers(self.model):
            for (training, shape), chain in forms.get(name, {}).items():
                layer.set_form(shape, chain, training=training)

    def _from_first(self, obj):
        """`obj` as process 0 of the group has it (itself without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return obj
        if dist.get_world_size(self.process_group) == 1:
            return obj
        box = [obj]
        src = 0 if self.process_group is None else dist.get_global_rank(self.process_group, 0)
        dist.broadcast_object_list(box, src=src, group=self.process_group)
        return box[0]

    # -- the end ----------------------------------------------------------------------

    def compress(self, policy: str = "flops", **kwargs) -> nn.Module:
        """The deployable model (`svdkern.compress(model, policy, ...)`), counted or timed at
        the example inputs unless `kwargs` give another example. Under FSDP, compress an
        unsharded copy loaded from the full state dict instead (see the error)."""
        if self._sharded:
            raise ValueError(
                "compress() needs the whole model, which FSDP shards: gather its full state "
                "dict (torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
                "options=StateDictOptions(full_state_dict=True))), load it into an unsharded "
                "copy with svdkern.load_state_dict(copy, state_dict), which resizes its SVD "
                "layers to the cut ranks, and svdkern.compress(copy)"
            )
        keys = {"input_shape", "example_inputs", "example_kwargs", "example"}
        if self.example is not None and not keys & set(kwargs):
            kwargs["example"] = self.example
        return _compress(self.model, policy, **kwargs)

    # -- checkpoints ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Step counts, the cuts so far, the ranks and the forms in force (plain data)."""
        forms = {
            name: [
                [training, list(shape), chain] for (training, shape), chain in layer.forms.items()
            ]
            for name, layer in svd_layers(self.model)
        }
        return {
            "format": _STATE_FORMAT,
            "steps": self.steps,
            "penalties": self.penalties,
            "history": [asdict(c) for c in self.history],
            "tunes": list(self.tunes),
            "ranks": self.ranks,
            "forms": forms,
            "memory_format": self._memory_format,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from `state_dict()`. The model must already be at the saved ranks (load
        its weights with `svdkern.load_state_dict`, then the optimizer's state): the forms
        in force are applied, so the resumed run computes exactly as the original."""
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise ValueError(
                "state must be a dict from SVDTraining.state_dict() (format "
                f"{_STATE_FORMAT}), got {type(state).__name__}"
            )
        if dict(state["ranks"]) != self.ranks:
            diff = {
                n: (r, self.ranks.get(n))
                for n, r in state["ranks"].items()
                if self.ranks.get(n) != r
            }
            raise ValueError(
                f"state: the model's ranks differ from the saved ones {{layer: (saved, model)}} "
                f"{dict(list(diff.items())[:3])}: load the model's checkpoint with "
                "svdkern.load_state_dict(model, state_dict) first, which resizes its layers"
            )
        self.steps = int(state["steps"])
        self.penalties = int(state["penalties"])
        self.history = [Cut(**c) for c in state["history"]]
        self.tunes = list(state.get("tunes", []))
        forms = {
            name: {(training, tuple(shape)): chain for training, shape, chain in entries}
            for name, entries in state["forms"].items()
        }
        if state.get("memory_format") is not None or any(forms.values()):
            self._apply_forms(forms, state.get("memory_format"))

    def __repr__(self) -> str:
        cuts = (
            "no cuts"
            if self.cut_every is None
            else f"cut_every={self.cut_every}, cut_energy={self.cut_energy}"
        )
        return (
            f"SVDTraining({self.regularizer!r}, {cuts}, steps={self.steps}, "
            f"cuts={len(self.history)})"
        )
