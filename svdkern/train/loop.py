"""The pipeline of `svdkern train`: phases, the training loop, checkpoints, resume.

A run is a list of phases, each trained for some epochs with a fresh optimizer and
LR schedule and ending in a model file in the run directory:

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

A phase starts from the previous phases' files (dense.pt, svd.pt, ...), so an
uninterrupted and a resumed run build the same models. Every epoch ends with an
atomic checkpoint (model, optimizer, scheduler, RNG states, phase, epoch, results
so far), unless its weights or test loss are NaN or inf: that stops the run and names
the last checkpoint, so the last good one. `--resume` rebuilds the phase's model
skeleton, loads the checkpoint (SVD layers resized to the pruned ranks) and goes on.
The data order depends only on (seed, phase, epoch), so on CPU the resumed run ends
with the same weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import svdkern
from svdkern.nn import svd_layers
from svdkern.train import baselines, checkpoint, report
from svdkern.train.baselines import decomposable, weight_matrix
from svdkern.train.data import (
    Dataset,
    bits_per_byte,
    eval_batches,
    load_dataset,
    steps_per_epoch,
    train_batches,
)
from svdkern.train.models import CLASSIFIER, build_model, model_sizes
from svdkern.training import SVDTraining

__all__ = ["Env", "Pipeline", "TrainingError", "init_env", "phases_of"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, unusable checkpoint); the message says why."""


@dataclass(frozen=True)
class Phase:
    """One trained stage: which epochs flag, which result it produces, its loss terms."""

    name: str
    epochs_key: str
    result: str
    svd: bool  # trains SVD layers (regularizer applies)
    sparsity: bool  # λ_s on (else only λ_o)
    trp: bool = False
    cuts: bool = False  # ranks cut every --cut-every epochs


PHASES = {
    "dense": Phase("dense", "dense_epochs", "dense", svd=False, sparsity=False),
    "svd": Phase("svd", "svd_epochs", "svd", svd=True, sparsity=True),
    "finetune": Phase("finetune", "finetune_epochs", "pruned", svd=True, sparsity=False),
    "posthoc": Phase("posthoc", "finetune_epochs", "posthoc", svd=True, sparsity=False),
    "trp": Phase("trp", "svd_epochs", "trp_trained", svd=False, sparsity=False, trp=True),
    "trp_finetune": Phase("trp_finetune", "finetune_epochs", "trp", svd=True, sparsity=False),
    "adaptive": Phase("adaptive", "svd_epochs", "adaptive_svd", svd=True, sparsity=True, cuts=True),
    "adaptive_finetune": Phase(
        "adaptive_finetune", "finetune_epochs", "adaptive", svd=True, sparsity=False
    ),
}

# The result whose compressed form is the run's deliverable, per method.
FINAL = {
    "svd": "pruned",
    "svd-adaptive": "adaptive",
    "dense": "dense",
    "posthoc": "posthoc",
    "trp": "trp",
}

# The phases whose training produced each result (its train_seconds is their sum).
PRODUCED_BY = {
    "dense": ("dense",),
    "svd": ("dense", "svd"),
    "pruned": ("dense", "svd", "finetune"),
    "posthoc": ("dense", "posthoc"),
    "trp_trained": ("dense", "trp"),
    "trp": ("dense", "trp", "trp_finetune"),
    "adaptive_svd": ("adaptive",),
    "adaptive": ("adaptive", "adaptive_finetune"),
}


def phases_of(cfg: dict[str, Any]) -> list[str]:
    """The phase names a configuration runs, in order."""
    method = cfg["method"]
    if method == "dense":
        return ["dense"]
    if method == "posthoc":
        return ["dense", "posthoc"]
    if method == "trp":
        return ["dense", "trp", "trp_finetune"]
    baselines = [] if cfg["no_baselines"] else ["posthoc"]
    if method == "svd-adaptive":
        return ["dense", "adaptive", "adaptive_finetune", *baselines]
    return ["dense", "svd", "finetune", *baselines]


# --- processes and devices --------------------------------------------------------------


@dataclass
class Env:
    """This process: its rank in a torchrun job (world 1 without torchrun) and device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_env(device: str) -> Env:
    """Join the torchrun process group if there is one (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if world == 1:
        return Env(0, 1, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Env(dist.get_rank(), dist.get_world_size(), dev)


# --- helpers ----------------------------------------------------------------------------


def spectra(model: nn.Module, decomposition: str) -> dict[str, list[float]]:
    """Per layer, the singular values (|s| sorted descending) of every decomposed layer."""
    out = {}
    for name, m in svd_layers(model):
        out[name] = torch.sort(m.s.detach().abs().float().cpu(), descending=True).values.tolist()
    for name, m in decomposable(model):
        W = weight_matrix(m.weight.detach().double().cpu(), decomposition)
        out[name] = torch.linalg.svdvals(W).float().tolist()
    return out


def full_ranks(model: nn.Module, decomposition: str) -> dict[str, int]:
    """Per decomposed (or decomposable) layer, min(m, n) of its matrix view."""
    out = {name: m.full_rank for name, m in svd_layers(model)}
    for name, m in decomposable(model):
        out[name] = min(weight_matrix(m.weight, decomposition).shape)
    return out


def ranks(model: nn.Module, decomposition: str) -> dict[str, int]:
    """Per layer, its rank: r of an SVD layer, full rank of a dense one."""
    out = full_ranks(model, decomposition)
    out.update({name: m.rank for name, m in svd_layers(model)})
    return out


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, device: torch.device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy as a fraction) on the test set: per sample for a
    classifier, per predicted byte for a language model."""
    was = model.training
    model.eval()
    loss = correct = 0.0
    for x, y in eval_batches(ds, device):
        out = model(x)
        loss += F.cross_entropy(out.flatten(0, -2), y.flatten(), reduction="sum").item()
        correct += (out.argmax(-1) == y).sum().item()
    model.train(was)
    n = ds.y_test.numel()
    return loss / n, correct / n


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors holding a NaN or ±inf."""
    if not tensors or torch.stack([t.isfinite().all() for t in tensors.values()]).all():
        return []
    return [name for name, t in tensors.items() if not t.isfinite().all()]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `model` by name."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _deployed_forms(svd_model: nn.Module, deployed: nn.Module) -> dict[str, str]:
    """{SVD layer: "lowrank" or "dense"}: what `svdkern.compress` made of each layer (a
    low-rank pair is an nn.Sequential at the layer's name)."""
    forms = {}
    for name, _ in svd_layers(svd_model):
        try:
            plain = deployed.get_submodule(name)
        except AttributeError:  # inside an attention block deployed as nn.MultiheadAttention
            plain = None
        forms[name] = "lowrank" if isinstance(plain, nn.Sequential) else "dense"
    return forms


def _make_optimizer(params, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    # foreach: one multi-tensor update instead of a Python loop over the parameters. torch
    # picks it by default on CUDA only; on CPU it saves ~1 ms a step on the default SVD
    # model, whose U, s, V triple the parameter count of the dense model.
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg["lr"],
            momentum=cfg["momentum"],
            weight_decay=cfg["weight_decay"],
            foreach=True,
        )
    return torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], foreach=True)


def _make_scheduler(opt: torch.optim.Optimizer, cfg: dict[str, Any], epochs: int):
    if cfg["schedule"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    milestones = [] if cfg["schedule"] == "constant" else cfg["milestones"]
    steps = sorted({max(1, round(f * epochs)) for f in milestones})
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=steps, gamma=cfg["gamma"])


def _all_sum(values: list[float], env: Env) -> list[float]:
    if env.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def read_metrics(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The rows of metrics.jsonl as (line, row). A last line cut short (a crash or a full disk
    in the middle of a write) is dropped; a damaged line before it is an error naming it."""
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    out = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        if number == len(lines):  # no newline after it: the write did not finish
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or "phase" not in row or "epoch" not in row:
            raise TrainingError(
                f"{path}, line {number}: not a metrics row; remove that line (or the run "
                "directory) and resume again"
            )
        out.append((line, row))
    return out


# --- the pipeline -----------------------------------------------------------------------


class Pipeline:
    """One run: builds each phase's model, trains it, records results, writes files."""

    def __init__(
        self,
        cfg: dict[str, Any],
        env: Env,
        ds: Dataset | None = None,
        resume: dict[str, Any] | None = None,
    ):
        self.cfg = cfg
        self.env = env
        self.dir = Path(cfg["out"])
        self.ds = (
            ds
            if ds is not None
            else load_dataset(cfg["data"], cfg.get("data_dir"), seq_len=cfg["seq_len"])
        )
        # One input (batch 1) at which MACs are counted: flops, prune, the cuts, compress.
        self.example = self.ds.example().to(env.device)
        self.phases = phases_of(cfg)
        self.resume = resume
        self.results: dict[str, dict[str, Any]] = resume["results"] if resume else {}
        self.info: dict[str, Any] = resume["info"] if resume else {}
        self.epochs_run = 0
        self._t0 = time.perf_counter()
        self._wall_before = float(resume.get("wall_time_s", 0.0)) if resume else 0.0
        # TRP truncates with the pruning energy rule (ε = --energy, or 1e-3 under --target-flops).
        self.trp_energy = cfg["energy"] if cfg["energy"] is not None else 1e-3
        self.show_bars = not cfg["quiet"] and env.main and sys.stderr.isatty()
        # (phase, epoch) of the checkpoint on disk, for the message of a failed write.
        self.saved: tuple[str, int] | None = (resume["phase"], resume["epoch"]) if resume else None

    def wall_time(self) -> float:
        """Seconds spent on this run, over all its (resumed) processes."""
        return self._wall_before + time.perf_counter() - self._t0

    # -- output -----------------------------------------------------------------------

    def log(self, text: str) -> None:
        if self.env.main and not self.cfg["quiet"]:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

    def _write_failed(self, exc: OSError, path: Path) -> TrainingError:
        """The error of a failed write (disk full, read-only file system): names the file and
        the cause, and says which checkpoint is intact to resume from."""
        if self.saved is not None:
            where = (
                f"the previous {self.dir / CHECKPOINT} is intact ({self.saved[0]}, epoch "
                f"{self.saved[1]}): make room and continue with --resume {self.dir}"
            )
        else:
            where = f"no checkpoint yet: make room and start again with --resume {self.dir}"
        cause = exc.strerror or str(exc)
        return TrainingError(f"cannot write {exc.filename or path}: {cause}; {where}")

    def _save(self, obj: Any, name: str) -> None:
        if self.env.main:
            try:
                checkpoint.save_atomic(obj, self.dir / name)
            except OSError as exc:
                raise self._write_failed(exc, self.dir / name) from None

    def _metrics(self, row: dict[str, Any]) -> None:
        if self.env.main:
            try:
                with open(self.dir / METRICS, "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as exc:
                raise self._write_failed(exc, self.dir / METRICS) from None

    def _trim_metrics(self, phase_index: int, epoch: int) -> None:
        """Drop metric rows written after the checkpoint a resumed run starts from."""
        path = self.dir / METRICS
        if not self.env.main or not path.exists():
            return
        keep = []
        for line, row in read_metrics(path):
            pos = (self.phases.index(row["phase"]), row["epoch"])
            if pos <= (phase_index, epoch):
                keep.append(line)
        try:
            checkpoint.write_atomic(path, "".join(line + "\n" for line in keep).encode())
        except OSError as exc:
            raise self._write_failed(exc, path) from None

    # -- models -----------------------------------------------------------------------

    def skeleton(self, svd: bool) -> nn.Module:
        """A fresh model of the run's architecture (seeded), decomposed if `svd`."""
        torch.manual_seed(self.cfg["seed"])
        model = build_model(
            self.cfg["model"], self.ds.input_shape, self.ds.num_classes, **model_sizes(self.cfg)
        )
        if svd:
            svdkern.decompose(model, self.cfg["decomposition"], skip=[CLASSIFIER])
        return model.to(self.env.device)

    def load_result(self, result: str, svd: bool) -> nn.Module:
        """The model saved at the end of a phase (its `<result>.pt`)."""
        state = checkpoint.load(self.dir / f"{result}.pt")["model"]
        model = self.skeleton(svd)
        if svd:
            svdkern.load_state_dict(model, state)
        else:
            model.load_state_dict(state)
        return model.to(self.env.device)

    def _prune(self, model: nn.Module, key: str, target_macs: int | None = None) -> None:
        """Prune by --energy / --target-flops, or to `target_macs` (posthoc at equal MACs)."""
        kwargs: dict[str, Any] = {
            "example_inputs": (self.example,),
            "multiple_of": self.cfg["multiple_of"],
        }
        if target_macs is not None:
            dense_macs = svdkern.flops(model, example_inputs=(self.example,)).dense_macs
            kwargs["target_flops"] = min(1.0, target_macs / dense_macs)
        elif self.cfg["target_flops"] is not None:
            kwargs["target_flops"] = self.cfg["target_flops"]
        else:
            kwargs["energy"] = self.cfg["energy"]
        report = svdkern.prune(model, **kwargs)
        loss, acc = evaluate(model, self.ds, self.env.device)
        self.info[key] = {
            "prune": report.to_dict(),
            "accuracy_before_finetune": acc,
            "loss_before_finetune": loss,
        }
        self.log(f"[{key}] pruned (accuracy before fine-tuning {acc:.2%}):\n{report}")

    def start_model(self, name: str) -> nn.Module:
        """The model a phase starts from, derived from the previous phases' files."""
        cfg = self.cfg
        if name == "dense":
            model = self.skeleton(svd=False)
            if cfg["init"]:
                model.load_state_dict(self.init_state())
            return model
        if name == "svd":
            model = self.load_result("dense", svd=False)
            return svdkern.decompose(model, cfg["decomposition"], skip=[CLASSIFIER])
        if name == "finetune":
            model = self.load_result("svd", svd=True)
            self._prune(model, "pruned")
            return model
        if name == "posthoc":
            model = self.load_result("dense", svd=False)
            svdkern.decompose(model, cfg["decomposition"], skip=[CLASSIFIER])
            final = FINAL[cfg["method"]]
            target = self.results[final]["macs"] if final in self.results else None
            self._prune(model, "posthoc", target_macs=target)
            return model
        if name == "adaptive":
            if cfg["init"]:
                model = self.load_result("dense", svd=False)
                return svdkern.decompose(model, cfg["decomposition"], skip=[CLASSIFIER])
            return self.skeleton(svd=True)
        if name == "adaptive_finetune":
            model = self.load_result("adaptive_svd", svd=True)
            self._prune(model, "adaptive")
            return model
        if name == "trp":
            return self.load_result("dense", svd=False)
        if name == "trp_finetune":
            model = self.load_result("trp_trained", svd=False)
            svdkern.decompose(model, cfg["decomposition"], skip=[CLASSIFIER])
            self._prune(model, "trp")
            return model
        raise ValueError(f"unknown phase {name!r}")

    def init_state(self) -> dict[str, torch.Tensor]:
        """The dense state_dict of --init: a state_dict, a phase file (dense.pt), or a run's
        checkpoint.pt taken in dense training (its model at that epoch). Raises ValueError
        naming the file and the mismatch, before anything is trained."""
        path = self.cfg["init"]
        try:
            state = checkpoint.load(path)
        except checkpoint.CheckpointError as exc:
            raise ValueError(str(exc)) from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            phase = state.get("phase")
            if phase is not None and phase in PHASES and PHASES[phase].svd:
                raise ValueError(
                    f"{path} holds the SVD model of phase {phase!r}; --init takes a dense model "
                    "(a run's dense.pt, or its checkpoint.pt while in dense training)"
                )
            state = state["model"]
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise ValueError(f"{path}: not a state_dict (a dict of tensors) nor a checkpoint")
        expected = self.skeleton(svd=False).state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        shapes = [
            f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        problems = []
        for what, items in (("missing", missing), ("unexpected", unexpected)):
            if items:
                more = f" and {len(items) - 3} more" if len(items) > 3 else ""
                problems.append(f"{what} keys {', '.join(items[:3])}{more}")
        if shapes:
            more = f" and {len(shapes) - 3} more" if len(shapes) > 3 else ""
            problems.append(f"shapes (file vs model) {', '.join(shapes[:3])}{more}")
        if problems:
            raise ValueError(
                f"{path} does not match --model {self.cfg['model']} on --data "
                f"{self.cfg['data']}: {'; '.join(problems)}"
            )
        return state

    def measure(self, model: nn.Module) -> dict[str, Any]:
        """Test accuracy, loss, params, MACs (as deployed after compress) and ranks."""
        loss, acc = evaluate(model, self.ds, self.env.device)
        fl = svdkern.flops(model, example_inputs=(self.example,))
        quality = {"bits_per_byte": bits_per_byte(loss)} if self.ds.task == "lm" else {}
        return {
            "accuracy": acc,
            "loss": loss,
            **quality,
            "params": fl.compressed_params,
            "macs": fl.compressed_macs,
            "ranks": ranks(model, self.cfg["decomposition"]),
            "full_ranks": full_ranks(model, self.cfg["decomposition"]),
        }

    # -- training ---------------------------------------------------------------------

    def train_phase(self, index: int, model: nn.Module, state: dict[str, Any] | None) -> None:
        """Train `model` for the rest of phase `index` (from `state` when resuming)."""
        cfg, env = self.cfg, self.env
        phase = PHASES[self.phases[index]]
        epochs = cfg[phase.epochs_key]
        opt = _make_optimizer(model.parameters(), cfg)
        sched = _make_scheduler(opt, cfg, epochs)
        start = 0
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            checkpoint.set_rng_state(state["rng"])
            start = state["epoch"]
        steps = steps_per_epoch(self.ds, cfg["batch_size"])
        t_setup, c_setup = time.perf_counter(), time.process_time()
        st = self._svd_training(model, opt, phase, epochs * steps, steps) if phase.svd else None
        if st is not None and state is not None and state.get("svd_training"):
            st.load_state_dict(state["svd_training"])  # the forms in force, the cuts so far
        elif st is not None and st.tune_forms:
            st.tune()
        net = self._wrap(model)
        setup_s = time.perf_counter() - t_setup
        setup_cpu = time.process_time() - c_setup
        seconds = self.info.setdefault("phase_seconds", {})
        cpu_seconds = self.info.setdefault("phase_cpu_seconds", {})
        for epoch in range(start, epochs):
            t0, c0 = time.perf_counter(), time.process_time()
            cuts_before = len(st.history) if st is not None else 0
            sums = self._train_epoch(index, epoch, epochs, net, model, opt, st, steps)
            step_s = (time.perf_counter() - t0) / steps
            if st is not None and self._record_cuts(st, cuts_before, phase, epoch):
                if cfg.get("compile"):
                    # The old ranks' graphs are dead: drop them rather than let every cut
                    # add a cache entry until dynamo's recompile limit sends us to eager.
                    torch._dynamo.reset()
                net = self._wrap(model)
            train_s = time.perf_counter() - t0 + setup_s
            train_cpu = time.process_time() - c0 + setup_cpu
            setup_s = setup_cpu = 0.0
            seconds[phase.name] = seconds.get(phase.name, 0.0) + train_s
            cpu_seconds[phase.name] = cpu_seconds.get(phase.name, 0.0) + train_cpu
            lr = opt.param_groups[0]["lr"]
            sched.step()
            test_loss, test_acc = evaluate(model, self.ds, env.device)
            if not math.isfinite(test_loss):
                self._diverged(
                    f"the test loss became {test_loss} after phase {phase.name!r}, epoch "
                    f"{epoch + 1}"
                )
            n = max(sums["count"], 1)
            row = {
                "phase": phase.name,
                "epoch": epoch + 1,
                "lr": lr,
                "loss": sums["loss"] / n,
                "task_loss": sums["task"] / n,
                "orth": sums["orth"] / n,
                "sparsity": sums["sparsity"] / n,
                "nuclear": sums["nuclear"] / n,
                "train_accuracy": sums["correct"] / max(sums["predicted"], 1),
                "test_loss": test_loss,
                "test_accuracy": test_acc,
                "seconds": time.perf_counter() - t0,
                "train_seconds": train_s,
                "train_cpu_seconds": train_cpu,
                "step_ms": 1e3 * step_s,
            }
            if phase.svd:
                layer_ranks = {name: m.rank for name, m in svd_layers(model)}
                full = sum(m.full_rank for _, m in svd_layers(model))
                row["ranks"] = layer_ranks
                row["rank_fraction"] = sum(layer_ranks.values()) / full
            # The row first: a crash before the checkpoint leaves an extra row, which resume
            # trims; the other order would lose the row of a checkpointed epoch.
            self._metrics(row)
            self._save(
                {
                    "format": 1,
                    "phase": phase.name,
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": checkpoint.get_rng_state(),
                    "svd_training": st.state_dict() if st is not None else None,
                    "config": self.cfg,
                    "results": self.results,
                    "info": self.info,
                    "wall_time_s": self.wall_time(),
                },
                CHECKPOINT,
            )
            self.saved = (phase.name, epoch + 1)
            if self.show_bars:
                self.log(
                    f"{phase.name:>12} {epoch + 1:3d}/{epochs}  loss {row['loss']:.4f}  "
                    f"train {row['train_accuracy']:.2%}  test {test_acc:.2%}  lr {lr:.2g}  "
                    f"{row['seconds']:.1f}s"
                )
            self.epochs_run += 1
            if cfg.get("stop_after_epochs") and self.epochs_run >= cfg["stop_after_epochs"]:
                # Simulates a crash right after a checkpoint (for the resume tests).
                env.barrier()
                sys.stdout.flush()
                os._exit(75)

    def _wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls: DDP across processes, torch.compile'd with
        --compile. Built again after a rank cut (DDP's buckets hold the old parameters)."""
        net: nn.Module = model
        if self.env.world > 1:
            net = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.env.device.index] if self.env.device.type == "cuda" else None,
            )
        if self.cfg.get("compile"):
            net = torch.compile(net, backend=self.cfg["compile"])
        return net

    def _svd_training(
        self, model: nn.Module, opt: torch.optim.Optimizer, phase: Phase, total: int, steps: int
    ) -> SVDTraining:
        """The SVD-training recipe of an SVD phase (`svdkern.SVDTraining`): its penalty
        (λ_s only where the phase has sparsity), and in a phase with cuts, a cut by the
        energy rule (ε = --cut-energy, ranks rounded up to --multiple-of) at the end of
        every --cut-every epochs but the last; forms re-tuned with --tune-forms. Under
        torchrun the ranks and forms of process 0 are applied everywhere."""
        cfg = self.cfg
        tune = bool(cfg.get("tune_forms"))
        batch = cfg["batch_size"] // self.env.world
        return SVDTraining(
            model,
            opt,
            orth=cfg["orth"],
            sparsity=cfg["sparsity"],
            strength=cfg["strength"] if phase.sparsity else 0.0,
            orth_every=cfg.get("orth_every", 1),
            cut_every=cfg["cut_every"] * steps if phase.cuts else None,
            cut_energy=cfg["cut_energy"],
            cut_until=total,
            multiple_of=cfg["multiple_of"],
            example_inputs=(self.example,),
            tune_forms=tune,
            tune_inputs=(self.ds.normalize(self.ds.x_train[:batch]).to(self.env.device),)
            if tune
            else None,
        )

    def _record_cuts(self, st: SVDTraining, first: int, phase: Phase, epoch: int) -> bool:
        """Log the cuts `st` made in this epoch (its history from index `first`) into the
        run's info; returns whether any changed a rank (the DDP wrapper and compiled graphs
        are then stale)."""
        if st.tunes:
            self.info.setdefault("tuned_forms", {})[phase.name] = list(st.tunes)
        changed = False
        for cut in st.history[first:]:
            changed |= cut.changed
            self.info.setdefault("cuts", []).append(
                {
                    "phase": phase.name,
                    "epoch": epoch + 1,
                    "ranks": cut.ranks,
                    "macs_after": cut.macs,
                    "flops_ratio": cut.flops_ratio,
                }
            )
            self.log(
                f"[{phase.name}] epoch {epoch + 1}: ranks cut, MACs {cut.flops_ratio:.1%} of dense"
            )
        return changed

    def _check_weights(self, model: nn.Module, phase: Phase, epoch: int) -> None:
        bad = _non_finite(_weights(model))
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            self._diverged(
                f"the weights became NaN or inf in phase {phase.name!r}, epoch {epoch + 1} "
                f"({', '.join(bad[:3])}{more})"
            )

    def _diverged(self, what: str) -> NoReturn:
        """Stop the run: `what` became non-finite. Only an epoch whose weights and test loss
        are finite is checkpointed, so checkpoint.pt is the last good one, unless it holds
        non-finite weights (written by an older svdkern)."""
        where = "no good checkpoint yet"
        path = self.dir / CHECKPOINT
        if path.exists():
            last = checkpoint.load(path)
            saved = f"{path} ({last['phase']}, epoch {last['epoch']})"
            where = f"the last good checkpoint is {saved}"
            if _non_finite(last["model"]):
                where = f"no good checkpoint: {saved} holds NaN or inf weights"
        done = [f"{r}.pt" for r in self.results if (self.dir / f"{r}.pt").exists()]
        raise TrainingError(
            f"{what}; stopping. {where[0].upper()}{where[1:]}"
            + (f"; finished phases: {', '.join(done)}" if done else "")
            + ". Try a lower --lr or --strength (--init RUN_DIR/dense.pt reuses a trained dense "
            "model)."
        )

    def _train_epoch(self, index, epoch, epochs, net, model, opt, st, steps) -> dict[str, float]:
        """One epoch of phase `index`; `st` (an SVD phase's SVDTraining) adds its penalty
        and counts every step, cutting ranks when due. Returns the epoch's sums over all
        processes (loss terms weighted by samples; "correct" of "predicted" targets)."""
        cfg, env = self.cfg, self.env
        phase = PHASES[self.phases[index]]
        model.train()
        sums = dict.fromkeys(
            ("loss", "task", "orth", "sparsity", "nuclear", "correct", "count", "predicted"), 0.0
        )
        penalty = st is not None and (cfg["orth"] > 0 or st.regularizer.strength > 0)
        bar = tqdm(
            total=steps,
            desc=f"{phase.name} {epoch + 1}/{epochs}",
            leave=False,
            disable=not self.show_bars,
            dynamic_ncols=True,
        )
        batches = train_batches(
            self.ds, cfg["batch_size"], cfg["seed"], index, epoch, env.device, env.rank, env.world
        )
        # One compose for every SVD layer per step; a compiled model composes its own.
        grouped = contextlib.nullcontext if self.cfg.get("compile") else svdkern.grouped_compose
        for i, (x, y) in enumerate(batches):
            with grouped(model):
                out = net(x)
            terms = {"task": F.cross_entropy(out.flatten(0, -2), y.flatten())}
            loss = terms["task"]
            if penalty:
                loss = loss + st.penalty()
                terms.update(orth=st.last_terms["orth"], sparsity=st.last_terms["sparsity"])
            if phase.trp and cfg["trp_nuclear"] > 0:
                terms["nuclear"] = baselines.nuclear_norm(model, cfg["decomposition"])
                loss = loss + cfg["trp_nuclear"] * terms["nuclear"]
            value = loss.detach().clone()
            if env.world > 1:
                dist.all_reduce(value)
            if not math.isfinite(value.item()):
                bar.close()
                parts = ", ".join(f"{k} {v.item():.4g}" for k, v in terms.items())
                self._diverged(
                    f"the loss became {value.item()} in phase {phase.name!r}, epoch "
                    f"{epoch + 1}, step {i + 1} ({parts})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i + 1 == steps:
                # The loss is checked before each step only: the last step can leave
                # non-finite weights, which must be neither cut, checkpointed nor called good.
                self._check_weights(model, phase, epoch)
            if st is not None:
                st.step()
            if phase.trp and (epoch * steps + i + 1) % cfg["trp_interval"] == 0:
                baselines.trp_truncate_(model, cfg["decomposition"], self.trp_energy)
            b = len(y)
            sums["loss"] += loss.item() * b
            for k, v in terms.items():
                sums[k] += v.item() * b
            sums["correct"] += (out.argmax(-1) == y).sum().item()
            sums["count"] += b
            sums["predicted"] += y.numel()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        keys = sorted(sums)
        return dict(zip(keys, _all_sum([sums[k] for k in keys], env), strict=True))

    # -- the run ----------------------------------------------------------------------

    def finish_phase(self, name: str, model: nn.Module) -> None:
        phase = PHASES[name]
        result = self.measure(model)
        # Wall-clock, and the process's CPU time (less sensitive to a busy machine's load).
        for key, per_phase in (
            ("train_seconds", "phase_seconds"),
            ("train_cpu_seconds", "phase_cpu_seconds"),
        ):
            seconds = self.info.get(per_phase, {})
            result[key] = sum(seconds.get(p, 0.0) for p in PRODUCED_BY[phase.result])
        extra = self.info.get(phase.result, {})
        if "accuracy_before_finetune" in extra:
            result["accuracy_before_finetune"] = extra["accuracy_before_finetune"]
            if self.ds.task == "lm":
                result["bits_per_byte_before_finetune"] = bits_per_byte(
                    extra["loss_before_finetune"]
                )
        self.results[phase.result] = result
        self._save(
            {
                "model": model.state_dict(),
                "config": self.cfg,
                "phase": name,
                "ranks": result["ranks"],
            },
            f"{phase.result}.pt",
        )
        self.env.barrier()
        self.log(
            f"[{name}] done: test accuracy {result['accuracy']:.2%}, params {result['params']:,}, "
            f"MACs {result['macs']:,}"
        )

    def run(self) -> dict[str, Any]:
        """Run (or finish) every phase; returns the results by model name."""
        if self.env.main:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.env.barrier()
        first, state = 0, None
        if self.resume is not None:
            first = self.phases.index(self.resume["phase"])
            state = self.resume
            self._trim_metrics(first, state["epoch"])
        for index in range(first, len(self.phases)):
            name = self.phases[index]
            phase = PHASES[name]
            if state is not None:
                model = self.skeleton(svd=phase.svd)
                if phase.svd:
                    svdkern.load_state_dict(model, state["model"])
                else:
                    model.load_state_dict(state["model"])
                model.to(self.env.device)
            else:
                model = self.start_model(name)
            self.train_phase(index, model, state)
            state = None
            self.finish_phase(name, model)
        return self.results

    # -- the report -------------------------------------------------------------------

    def finalize(self) -> dict[str, Any]:
        """Compress the run's final model, time it against dense, write report and plots."""
        cfg, env = self.cfg, self.env
        final = FINAL[cfg["method"]]
        latency = None
        batches = [1, min(256, len(self.ds.y_test))]
        inputs = {b: self.ds.normalize(self.ds.x_test[:b].to(env.device)) for b in batches}
        policy = cfg.get("compress_policy", "flops")

        def deploy(model: nn.Module) -> nn.Module:
            if policy != "latency":
                return svdkern.compress(model, policy, example_inputs=(self.example,)).eval()
            if self.ds.task == "lm":
                # Token ids cannot be drawn as random floats: timed at the largest batch.
                example = (inputs[batches[-1]],)
                return svdkern.compress(model, policy, example_inputs=example).eval()
            shapes = [x.shape for x in inputs.values()]
            return svdkern.compress(model, policy, input_shape=shapes).eval()

        # Every trained model, loaded once, in its deployed form (compressed unless it is
        # dense), the final one compressed once and shared with the "compressed" result, all
        # timed interleaved in one measurement, so the report's figures compare like with like.
        trained: dict[str, nn.Module] = {}
        deployed: dict[str, nn.Module] = {}
        for name in self.results:
            if name == "compressed":
                continue
            svd = name not in ("dense", "trp_trained")
            trained[name] = self.load_result(name, svd=svd)
            deployed[name] = deploy(trained[name]) if svd else trained[name].eval()
        ms: dict[str, list[float]] = {name: [] for name in deployed}
        for b in batches:
            for name, value in report.measure_latencies(deployed, inputs[b]).items():
                ms[name].append(value)
        for name in deployed:
            self.results[name]["latency_ms"] = {
                str(b): v for b, v in zip(batches, ms[name], strict=True)
            }
        if final != "dense":
            compressed = deployed[final]
            self.results["compressed"] = self.measure(compressed)
            for key in ("ranks", "full_ranks", "train_seconds", "train_cpu_seconds", "latency_ms"):
                self.results["compressed"][key] = self.results[final][key]
            self.results["compressed"]["from"] = final
            self.results["compressed"]["forms"] = _deployed_forms(trained[final], compressed)
            latency = {
                "device": str(env.device),
                "batches": batches,
                "ms": {"dense": ms["dense"], "compressed": ms[final]},
                "policy": policy,
            }
        spec = {}
        if "svd" in self.results:
            spec = {
                "before": spectra(trained["dense"], cfg["decomposition"]),
                "after": spectra(trained["svd"], cfg["decomposition"]),
            }
        doc = {
            "models": self.results,
            "config": {k: v for k, v in cfg.items() if k != "stop_after_epochs"},
            "latency": latency,
            "prune": self.info,
            "spectra": spec,
            "environment": {
                "device": str(env.device),
                "processes": env.world,
                "torch": torch.__version__,
                "backend": svdkern.backend(),
                "train_size": len(self.ds.y_train),
                "test_size": len(self.ds.y_test),
                "wall_time_s": self.wall_time(),
                "phase_seconds": self.info.get("phase_seconds", {}),
                "phase_cpu_seconds": self.info.get("phase_cpu_seconds", {}),
            },
        }
        rows = []
        if (self.dir / METRICS).exists():
            rows = [row for _, row in read_metrics(self.dir / METRICS)]
        self.written = report.write_report(self.dir, doc, epochs=rows)
        return doc
