"""Singular-value pruning of SVD layers: per-layer energy threshold or a global FLOPs target.

Energy rule (docs/ARCHITECTURE.md §1), per layer: sort s² descending and keep the smallest
k ≥ 1 with Σ_{i≤k} s_i² ≥ (1 − ε)·Σ_i s_i²; U, s, V are sliced to those k triplets (the
largest |s|).

Example::

    report = svdkern.prune(model, energy=1e-3)
    report = svdkern.prune(model, target_flops=0.3, input_shape=(1, 3, 32, 32))
    report = svdkern.prune(lm, target_flops=0.5, example_inputs=(ids,), min_rank=8)
    svdkern.prune(model, ranks={"blocks.*.mlp.*": 32, "head": 16})
    print(report)
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from svdkern.compiled import uncompiled, uncompiled_name
from svdkern.costs import CostModel, dense_weight_shape
from svdkern.examples import Example
from svdkern.nn import SVDLayer, svd_layers
from svdkern.tables import format_table
from svdkern.trace import UncountedError

__all__ = ["LayerPrune", "PruneReport", "prune"]

_BISECTION_STEPS = 64


@dataclass
class LayerPrune:
    """One SVD layer's pruning: ranks, energy kept (fraction of Σ s²) and MACs.

    MACs are of the layer's compressed form (cheaper of low-rank chain and dense, see
    `svdkern.flops`; dense for a layer read through .weight, whatever its rank); None for a
    conv when no input_shape or example_inputs was given.
    """

    name: str
    shape: tuple[int, ...]
    rank_before: int
    rank_after: int
    energy_kept: float
    macs_before: int | None
    macs_after: int | None


@dataclass
class PruneReport:
    """What `svdkern.prune` did: the energy threshold used and a LayerPrune per layer.

    `dense_macs`, `macs_before`, `macs_after` are model totals (all counted layers, see
    `svdkern.flops`) when they could be counted, else None.
    """

    energy: float | None
    target_flops: float | None
    multiple_of: int | None
    dense_macs: int | None
    macs_before: int | None
    macs_after: int | None
    layers: list[LayerPrune] = field(default_factory=list)

    @property
    def flops_ratio(self) -> float | None:
        """macs_after / dense_macs: the fraction of the dense model's MACs that remains."""
        if self.macs_after is None or not self.dense_macs:
            return None
        return self.macs_after / self.dense_macs

    def to_dict(self) -> dict:
        return {**asdict(self), "flops_ratio": self.flops_ratio}

    def __str__(self) -> str:
        def num(v):
            return "-" if v is None else f"{v:,}"

        header = ("layer", "shape", "rank", "energy kept", "MACs before", "MACs after")
        rows = [
            (
                lay.name,
                "×".join(map(str, lay.shape)),
                f"{lay.rank_before} → {lay.rank_after}",
                f"{lay.energy_kept:.6f}",
                num(lay.macs_before),
                num(lay.macs_after),
            )
            for lay in self.layers
        ]
        rows.append(("total", "", "", "", num(self.macs_before), num(self.macs_after)))
        ratio = self.flops_ratio
        lines = [
            "ranks given per layer"
            if self.energy is None
            else f"energy threshold ε = {self.energy:.6g}"
        ]
        if ratio is not None:
            lines.append(f"MACs after / dense = {ratio:.2%}")
        return format_table(header, rows) + "\n" + "; ".join(lines)


def _sorted_energy(s: torch.Tensor) -> torch.Tensor:
    """Cumulative Σ_{i≤k} s_i² of s² sorted descending, in float64."""
    e = s.detach().to(torch.float64).square().sort(descending=True).values
    return e.cumsum(0)


def _rank_for(
    cum: torch.Tensor, energy: float, multiple_of: int | None, cap: int, min_rank: int = 1
) -> int:
    """Smallest k ≥ 1 with cum[k−1] ≥ (1 − energy)·cum[−1], raised to min_rank and rounded
    up to multiple_of (both capped at `cap`, the layer's rank)."""
    threshold = (1.0 - energy) * cum[-1]
    k = int(torch.searchsorted(cum, threshold, side="left")) + 1
    k = min(max(k, min_rank, 1), cum.shape[0])
    if multiple_of:
        k = min(math.ceil(k / multiple_of) * multiple_of, cap)
    return k


def _check_args(energy, target_flops, multiple_of, ranks, min_rank) -> None:
    if (energy is not None) + (target_flops is not None) + (ranks is not None) != 1:
        raise ValueError(
            f"pass exactly one of energy, target_flops and ranks, got energy={energy!r}, "
            f"target_flops={target_flops!r}, ranks={ranks!r}"
        )
    if min_rank is not None and (
        isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1
    ):
        raise ValueError(f"min_rank must be a positive int or None, got {min_rank!r}")
    if min_rank is not None and ranks is not None:
        raise ValueError(
            "min_rank floors the ranks energy or target_flops choose; with ranks= the ranks "
            "are taken as given: drop min_rank or the names whose rank is below it"
        )
    if energy is not None and (
        isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 <= energy < 1
    ):
        raise ValueError(f"energy must be a number in [0, 1), got {energy!r}")
    if target_flops is not None and (
        isinstance(target_flops, bool)
        or not isinstance(target_flops, (int, float))
        or not 0 < target_flops <= 1
    ):
        raise ValueError(f"target_flops must be a number in (0, 1], got {target_flops!r}")
    if multiple_of is not None and (
        isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1
    ):
        raise ValueError(f"multiple_of must be a positive int or None, got {multiple_of!r}")


def _check_ranks(ranks, caps: dict[str, int]) -> dict[str, int]:
    """{layer: rank} for every SVD layer from {name or glob: k}: an exact name must give a
    k in [1, rank]; a glob (fnmatch over qualified names) gives k capped at each matched
    layer's rank; an exact name wins over globs, an earlier glob over a later one; layers
    not matched keep their rank."""
    if not isinstance(ranks, Mapping):
        raise TypeError(
            f"ranks must be a dict {{layer name or glob: rank}}, got {type(ranks).__name__}"
        )
    chosen: dict[str, int] = {}
    for key, k in ranks.items():
        if not isinstance(key, str):
            raise TypeError(f"ranks keys must be layer names or globs (str), got {key!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ranks[{key!r}] must be a positive int, got {k!r}")
        if key in caps and k > caps[key]:
            raise ValueError(
                f"ranks[{key!r}] must be an int in [1, {caps[key]}] (the layer's current "
                f"rank), got {k!r}"
            )
    unknown = [key for key in ranks if key not in caps and not fnmatch.filter(caps, key)]
    if unknown:
        raise ValueError(
            f"ranks names layers that are not SVD layers of the model (no name or glob "
            f"match): {unknown}; known: {sorted(caps)}"
        )
    for key, k in ranks.items():
        if key in caps:
            chosen[key] = k
    for key, k in ranks.items():
        if key not in caps:
            for name in fnmatch.filter(caps, key):
                chosen.setdefault(name, min(k, caps[name]))
    return {name: chosen.get(name, cap) for name, cap in caps.items()}


def prune(
    model: nn.Module,
    energy: float | None = None,
    *,
    target_flops: float | None = None,
    ranks: Mapping[str, int] | None = None,
    input_shape: Sequence[int] | None = None,
    example_inputs=None,
    example_kwargs: Mapping | None = None,
    example: Example | None = None,
    min_rank: int | None = None,
    multiple_of: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    dry_run: bool = False,
) -> PruneReport:
    """Prune the singular values of every SVD layer of `model` in place.

    Give exactly one of:
        energy: ε in [0, 1), the energy removed per layer (keep the smallest k with
            Σ_{i≤k} s_i² ≥ (1 − ε)·Σ s_i², s² sorted descending, k ≥ 1).
        target_flops: fraction in (0, 1] of the dense model's counted MACs to keep. One
            global ε is found by bisection: the smallest ε whose compressed model (every
            SVD layer in the cheaper of chain and dense form, counted as `svdkern.flops`
            does, including the layers that stay dense and those read through .weight,
            which cost their dense MACs at any rank) costs ≤ target_flops · dense MACs.
        ranks: {layer name or glob: k}: keep the k largest |s| of those layers; globs
            match qualified names (`model.named_modules()`) with fnmatch, e.g.
            {"h.*.mlp.*": 32}; a glob's k is capped at each matched layer's rank, an exact
            name's must be in [1, rank]; an exact name wins over globs, an earlier glob
            over a later one; layers not matched keep their rank. Taken as given
            (multiple_of and min_rank do not apply). For a `torch.compile`d model the
            names are those of the model it wraps ("0"; "_orig_mod.0" is accepted too),
            and so are the report's.
    Args:
        input_shape: shape of one input batch (a zero float tensor is used); needed to
            count convs (for target_flops, and for the MAC columns of the report).
            Without it or example inputs, Linear layers count one row.
        example_inputs: instead of input_shape, the forward's positional arguments (a
            tensor or a tuple, any dtype, e.g. token ids); example_kwargs: its keyword
            arguments; example: an `svdkern.Example` instead of the three. They also
            reveal the layers read through .weight (`svdkern.costs`).
        min_rank: floor of every rank energy / target_flops choose (capped at the layer's
            current rank).
        multiple_of: round every kept rank up to a multiple of this (capped at the
            layer's current rank), e.g. 8 for tensor cores, or to bound the number of
            distinct shapes torch.compile sees when ranks are cut during training.
        optimizer: the optimizer training the model, to cut ranks mid-training: each
            pruned layer's optimizer state (Adam/AdamW exp_avg, exp_avg_sq, step, SGD
            momentum, ...) is sliced to the kept triplets and moved to the new
            parameters, which replace the old ones in its param groups (see
            `SVDLinear.prune_`). Rebuild a DistributedDataParallel wrapper afterwards.
        dry_run: only compute the report (ranks the rule would keep); change nothing.
            Under DDP, decide ranks once (e.g. dry_run on process 0, broadcast
            `{l.name: l.rank_after}`) and apply them everywhere with `ranks=`.
    Returns:
        PruneReport (per layer: name, shape, rank before/after, energy kept, MACs
        before/after; `str(report)` is a table, `report.to_dict()` a dict).
        Without `optimizer` the pruned layers hold new Parameters: rebuild optimizers.
    Raises:
        ValueError naming energy / target_flops / ranks / min_rank / multiple_of when out
        of range, target_flops when even rank 1 everywhere cannot reach it, and
        input_shape / example_inputs when the example forward fails on them.

    Example::

        report = svdkern.prune(model, target_flops=0.3, input_shape=(1, 3, 32, 32))
        svdkern.prune(lm, target_flops=0.5, example_inputs=(ids,), min_rank=8)
        svdkern.prune(model, energy=1e-4, optimizer=opt, multiple_of=4)   # mid-training
        svdkern.prune(model, ranks={"layers.0.0.conv1": 8, "layers.2.*": 16}, optimizer=opt)
    """
    _check_args(energy, target_flops, multiple_of, ranks, min_rank)
    example = Example.of(input_shape, example_inputs, example_kwargs, example)
    if uncompiled(model) is not model:
        model = uncompiled(model)
        if isinstance(ranks, Mapping):
            ranks = {uncompiled_name(k) if isinstance(k, str) else k: v for k, v in ranks.items()}
    layers = svd_layers(model)
    cums = {name: _sorted_energy(layer.s) for name, layer in layers}
    caps = {name: layer.rank for name, layer in layers}
    given = None if ranks is None else _check_ranks(ranks, caps)
    # The energy rule ranks every layer by its s; given ranks only read the layers they cut.
    _check_finite([(n, lay) for n, lay in layers if given is None or given[n] < caps[n]])
    floor = min_rank or 1

    def ranks_at(eps: float) -> dict[str, int]:
        if given is not None:
            return given
        return {name: _rank_for(cums[name], eps, multiple_of, caps[name], floor) for name in cums}

    costs = _costs(model, example, target_flops)
    if target_flops is not None:
        energy = _search_energy(costs, ranks_at, target_flops)
    kept_ranks = ranks_at(energy)
    energy = None if energy is None else float(energy)
    report = PruneReport(energy, target_flops, multiple_of, None, None, None)
    if costs is not None:
        report.dense_macs = costs.dense()
        report.macs_before = costs.compressed(caps)
        report.macs_after = costs.compressed(kept_ranks)
    for name, layer in layers:
        cum = cums[name]
        k = kept_ranks[name]
        total = float(cum[-1])
        kept = float(cum[k - 1]) / total if total > 0 and k < layer.rank else 1.0
        before = after = None
        if costs is not None:
            cost = costs.layers[name]
            before, after = cost.compressed(caps[name]), cost.compressed(k)
        report.layers.append(
            LayerPrune(
                name,
                dense_weight_shape(layer),
                layer.rank,
                k,
                kept,
                before,
                after,
            )
        )
        if k < layer.rank and not dry_run:
            layer.prune_(k, optimizer=optimizer)
    return report


def _check_finite(layers: list[tuple[str, SVDLayer]]) -> None:
    """Raise naming the layers whose singular values are NaN or ±inf: no rank can be chosen
    from them (every energy comparison with NaN is false) and the kept triplets would be
    arbitrary."""
    bad = []
    for name, layer in layers:
        s = layer.s.detach()
        nan, inf = int(s.isnan().sum()), int(s.isinf().sum())
        if nan or inf:
            bad.append(f"{name!r} ({nan} NaN, {inf} inf of {s.numel()})")
    if bad:
        raise ValueError(
            f"prune: the singular values s of SVD layer(s) {', '.join(bad)} are not finite, so "
            "no rank can be chosen from them; check the training loss for NaN/inf (lower the "
            "learning rate, clip gradients, check the inputs) or reload a checkpoint saved "
            "before it diverged"
        )


def _costs(model: nn.Module, example: Example | None, target_flops) -> CostModel | None:
    """The cost model of one example forward (or one row per Linear without one); None
    when convs cannot be counted without an example and no target needs them."""
    if example is not None:
        example = example.single("prune")
    costs = CostModel.from_model(model, example)
    if costs.uncounted and target_flops is not None:
        raise UncountedError(costs.uncounted[0])
    return None if costs.uncounted else costs


def _search_energy(costs: CostModel, ranks_at, target_flops: float) -> float:
    """Smallest ε in [0, 1) with total MACs at ε ≤ target_flops · dense MACs (bisection)."""
    dense = costs.dense()
    budget = target_flops * dense
    if costs.compressed(ranks_at(0.0)) <= budget:
        return 0.0
    hi = math.nextafter(1.0, 0.0)
    floor = costs.compressed(ranks_at(hi))
    if floor > budget:
        raise ValueError(
            f"target_flops={target_flops} cannot be reached: at the lowest ranks allowed "
            f"the model keeps {floor / dense:.2%} of the dense MACs (layers left dense, "
            "layers read through .weight, min_rank and multiple_of count too)"
        )
    lo = 0.0
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if costs.compressed(ranks_at(mid)) <= budget:
            hi = mid
        else:
            lo = mid
    return hi
