"""The phase recipe of `svdkern train`: which phases each method runs, and what each phase is.

A run is a list of phases, each trained for some epochs with a fresh optimizer and LR
schedule and ending in a model file in the run directory (`<result>.pt`):

    method svd:      dense → svd (λ_o, λ_s) → finetune (pruned; λ_o only) [→ posthoc]
    method svd-adaptive:
                     dense (the baseline) → adaptive (a fresh SVD model, or --init
                     decomposed; λ_o, λ_s; ranks cut by the energy rule with --cut-energy
                     every --cut-every epochs, optimizer state sliced, forms re-tuned)
                     → adaptive_finetune (pruned by --energy; λ_o only) [→ posthoc]
    method dense:    dense
    method posthoc:  dense → posthoc (truncated SVD of dense; λ_o only)
    method trp:      dense → trp (dense weights, truncated every k steps, nuclear norm)
                     → trp_finetune (decomposed, pruned; λ_o only)

Everything else is derived from the two tables below: the phases a configuration runs
(`phases_of`), the result each method delivers (`FINAL`), the phases whose training time a
result counts (`PRODUCED_BY`), the pruned results, and the model each phase starts from
(`Pipeline.start_model` reads `Phase.start`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "FINAL",
    "FRESH",
    "METHODS",
    "PHASES",
    "PRODUCED_BY",
    "PRUNED",
    "RESULTS",
    "Method",
    "Phase",
    "Start",
    "phases_of",
]


@dataclass(frozen=True)
class Start:
    """What a phase's model starts from.

    result: the result whose file it loads (`<result>.pt`, written by an earlier phase);
        None for a fresh model of the run's architecture (seeded), with SVD layers where the
        phase trains them. Under --init a fresh model takes --init's weights: the dense one
        directly, an SVD one from the dense result (which holds them), decomposed.
    decompose: decompose the loaded dense model into SVD layers.
    prune: "energy" prunes by --energy or --target-flops; "final_macs" prunes to the MACs of
        the method's final result when that is trained already (a baseline at equal MACs),
        else as "energy". The pruning is recorded in the run's info under the phase's result.
    """

    result: str | None = None
    decompose: bool = False
    prune: Literal["energy", "final_macs"] | None = None


FRESH = Start()


@dataclass(frozen=True)
class Phase:
    """One trained stage: the result it produces, its start, epochs flag and loss terms."""

    name: str
    result: str  # its model file is <result>.pt, its entry in report.json's models
    start: Start
    epochs: str  # the configuration key of its epochs
    svd: bool = False  # trains SVD layers (the orthogonality / sparsity regularizer applies)
    sparsity: bool = False  # λ_s on (else only λ_o)
    cuts: bool = False  # ranks cut every --cut-every epochs
    trp: bool = False  # TRP: nuclear-norm term, weights truncated every --trp-interval steps
    description: str = ""  # of its result, in report.md


@dataclass(frozen=True)
class Method:
    """A --method: its phases in order, the baselines run after them unless --no-baselines,
    and its line of the flag's help."""

    phases: tuple[str, ...]
    baselines: tuple[str, ...] = ()
    help: str = ""


PHASES = {
    p.name: p
    for p in (
        Phase("dense", "dense", FRESH, "dense_epochs", description="dense model"),
        Phase(
            "svd",
            "svd",
            Start("dense", decompose=True),
            "svd_epochs",
            svd=True,
            sparsity=True,
            description="SVD-trained, before pruning",
        ),
        Phase(
            "finetune",
            "pruned",
            Start("svd", prune="energy"),
            "finetune_epochs",
            svd=True,
            description="SVD-trained, pruned + fine-tuned",
        ),
        Phase(
            "adaptive",
            "adaptive_svd",
            FRESH,
            "svd_epochs",
            svd=True,
            sparsity=True,
            cuts=True,
            description="SVD-trained from a fresh SVD model with rank cuts, before the final prune",
        ),
        Phase(
            "adaptive_finetune",
            "adaptive",
            Start("adaptive_svd", prune="energy"),
            "finetune_epochs",
            svd=True,
            description="SVD-trained with rank cuts, pruned + fine-tuned (svd-adaptive)",
        ),
        Phase(
            "posthoc",
            "posthoc",
            Start("dense", decompose=True, prune="final_macs"),
            "finetune_epochs",
            svd=True,
            description="post-hoc truncated SVD of dense at the same MACs + fine-tuned",
        ),
        Phase(
            "trp",
            "trp_trained",
            Start("dense"),
            "svd_epochs",
            trp=True,
            description="TRP-trained dense weights (low rank), before decomposition",
        ),
        Phase(
            "trp_finetune",
            "trp",
            Start("trp_trained", decompose=True, prune="energy"),
            "finetune_epochs",
            svd=True,
            description="TRP, decomposed, pruned + fine-tuned",
        ),
    )
}

METHODS = {
    "svd": Method(
        ("dense", "svd", "finetune"),
        baselines=("posthoc",),
        help="dense → decompose → SVD training → prune → fine-tune (the default; also runs "
        "posthoc unless --no-baselines)",
    ),
    "svd-adaptive": Method(
        ("dense", "adaptive", "adaptive_finetune"),
        baselines=("posthoc",),
        help="SVD training from a fresh SVD model (or --init) with rank cuts every --cut-every "
        "epochs, then prune + fine-tune, in as many epochs as dense training (dense is still "
        "trained as the baseline)",
    ),
    "dense": Method(("dense",), help="dense training only"),
    "posthoc": Method(("dense", "posthoc"), help="truncated SVD of the dense model + fine-tune"),
    "trp": Method(("dense", "trp", "trp_finetune"), help="trained rank pruning + fine-tune"),
}

# The phase that produces each result.
RESULTS = {p.result: p for p in PHASES.values()}


def _produced_by(phase: Phase) -> tuple[str, ...]:
    before = () if phase.start.result is None else _produced_by(RESULTS[phase.start.result])
    return (*before, phase.name)


# The phases whose training produced each result (its train_seconds is their sum).
PRODUCED_BY = {p.result: _produced_by(p) for p in PHASES.values()}

# The result whose compressed form is the run's deliverable, per method.
FINAL = {name: PHASES[m.phases[-1]].result for name, m in METHODS.items()}

# The results of pruned models, in table order.
PRUNED = tuple(p.result for p in PHASES.values() if p.start.prune)


def phases_of(cfg: dict[str, Any]) -> list[str]:
    """The phase names a configuration runs, in order."""
    method = METHODS[cfg["method"]]
    return [*method.phases, *(() if cfg["no_baselines"] else method.baselines)]
