"""The training loop of `svdkern train`: each phase's model, its epochs, checkpoints, resume.

The phases each method runs, and what each one starts from and trains, are declared in
`recipe`. A phase starts from the previous phases' files (dense.pt, svd.pt, ...), so an
uninterrupted and a resumed run build the same models. Every epoch ends with a metrics row
and an atomic checkpoint (model, optimizer, scheduler, RNG states, phase, epoch, results
so far), unless its weights or test loss are NaN or inf: that stops the run and names
the last checkpoint, so the last good one. `--resume` rebuilds the phase's model
skeleton, loads the checkpoint (SVD layers resized to the pruned ranks) and goes on.
The data order depends only on (seed, phase, epoch), so on CPU the resumed run ends
with the same weights.
"""

from __future__ import annotations

import contextlib
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
from svdkern.train import baselines, checkpoint
from svdkern.train.data import Dataset, bits_per_byte, load_dataset, steps_per_epoch, train_batches
from svdkern.train.measure import evaluate, measure
from svdkern.train.models import CLASSIFIER, build_model, model_sizes
from svdkern.train.recipe import FINAL, PHASES, PRODUCED_BY, RESULTS, Phase, phases_of
from svdkern.train.rundir import CHECKPOINT, RunFiles, TrainingError
from svdkern.training import SVDTraining

__all__ = ["Env", "Pipeline", "init_env"]


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


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors holding a NaN or ±inf."""
    if not tensors or torch.stack([t.isfinite().all() for t in tensors.values()]).all():
        return []
    return [name for name, t in tensors.items() if not t.isfinite().all()]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `model` by name."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


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


def _make_scheduler(opt: torch.optim.Optimizer, cfg: dict[str, Any], epochs: int, steps: int):
    """A phase's LR schedule. Cosine and any warm-up act every optimizer step (a LambdaLR,
    stepped by `_train_epoch`); the step and constant schedules without warm-up act every
    epoch (a MultiStepLR, stepped by `train_phase`): on epoch boundaries the two agree."""
    warmup, total = cfg.get("warmup_steps") or 0, max(epochs * steps, 1)
    milestones = [] if cfg["schedule"] == "constant" else cfg["milestones"]
    boundaries = sorted({max(1, round(f * epochs)) for f in milestones})
    if cfg["schedule"] != "cosine" and not warmup:
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=boundaries, gamma=cfg["gamma"])

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if cfg["schedule"] == "cosine":
            t = min(1.0, max(0, step - warmup) / max(total - warmup, 1))
            return ramp * 0.5 * (1.0 + math.cos(math.pi * t))
        return ramp * cfg["gamma"] ** sum(step >= b * steps for b in boundaries)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _per_step(sched: Any) -> bool:
    return isinstance(sched, torch.optim.lr_scheduler.LambdaLR)


def _all_sum(values: list[float], env: Env) -> list[float]:
    if env.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


class _Stopwatch:
    """Wall-clock and process CPU seconds since it was started."""

    def __init__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    def cpu(self) -> float:
        return time.process_time() - self.cpu0


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
            else load_dataset(
                cfg["data"],
                cfg.get("data_dir"),
                seq_len=cfg["seq_len"],
                epoch_size=cfg.get("epoch_size"),
            )
        )
        # One input (batch 1) at which MACs are counted: flops, prune, the cuts, compress.
        self.example = self.ds.example().to(env.device)
        self.phases = phases_of(cfg)
        self.resume = resume
        self.results: dict[str, dict[str, Any]] = resume["results"] if resume else {}
        self.info: dict[str, Any] = resume["info"] if resume else {}
        self._t0 = time.perf_counter()
        self._wall_before = float(resume.get("wall_time_s", 0.0)) if resume else 0.0
        # TRP truncates with the pruning energy rule (ε = --energy, or 1e-3 under --target-flops).
        self.trp_energy = cfg["energy"] if cfg["energy"] is not None else 1e-3
        self.show_bars = not cfg["quiet"] and env.main and sys.stderr.isatty()
        saved = (resume["phase"], resume["epoch"]) if resume else None
        self.files = RunFiles(self.dir, write=env.main, saved=saved)

    def wall_time(self) -> float:
        """Seconds spent on this run, over all its (resumed) processes."""
        return self._wall_before + time.perf_counter() - self._t0

    def log(self, text: str) -> None:
        if self.env.main and not self.cfg["quiet"]:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

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

    def load_result(self, result: str) -> nn.Module:
        """The model saved at the end of a phase (its `<result>.pt`)."""
        state = checkpoint.load(self.dir / f"{result}.pt")["model"]
        svd = RESULTS[result].svd
        model = self.skeleton(svd)
        if svd:
            svdkern.load_state_dict(model, state)
        else:
            model.load_state_dict(state)
        return model.to(self.env.device)

    def start_model(self, name: str) -> nn.Module:
        """The model phase `name` starts from (its `recipe.Start`), built from the previous
        phases' files."""
        phase = PHASES[name]
        start = phase.start
        decompose = start.decompose
        if start.result is not None:
            model = self.load_result(start.result)
        elif self.cfg["init"] and phase.svd:
            model, decompose = self.load_result("dense"), True  # dense.pt holds --init's weights
        else:
            model = self.skeleton(svd=phase.svd)
            if self.cfg["init"]:
                model.load_state_dict(self.init_state())
        if decompose:
            svdkern.decompose(model, self.cfg["decomposition"], skip=[CLASSIFIER])
        if start.prune is not None:
            self._prune(model, phase.result, at_final_macs=start.prune == "final_macs")
        return model

    def _prune(self, model: nn.Module, key: str, at_final_macs: bool) -> None:
        """Prune by --energy / --target-flops, or to the MACs of the method's final result
        (`at_final_macs`, once it is trained); record it in the run's info under `key`."""
        cfg = self.cfg
        final = FINAL[cfg["method"]]
        kwargs: dict[str, Any] = {
            "example_inputs": (self.example,),
            "multiple_of": cfg["multiple_of"],
        }
        if at_final_macs and final in self.results:
            dense_macs = svdkern.flops(model, example_inputs=(self.example,)).dense_macs
            kwargs["target_flops"] = min(1.0, self.results[final]["macs"] / dense_macs)
        elif cfg["target_flops"] is not None:
            kwargs["target_flops"] = cfg["target_flops"]
        else:
            kwargs["energy"] = cfg["energy"]
        report = svdkern.prune(model, **kwargs)
        loss, acc = evaluate(model, self.ds, self.env.device)
        self.info[key] = {
            "prune": report.to_dict(),
            "accuracy_before_finetune": acc,
            "loss_before_finetune": loss,
        }
        self.log(f"[{key}] pruned (accuracy before fine-tuning {acc:.2%}):\n{report}")

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

    # -- training ---------------------------------------------------------------------

    def train_phase(self, index: int, model: nn.Module, state: dict[str, Any] | None) -> None:
        """Train `model` for the rest of phase `index` (from `state` when resuming)."""
        cfg = self.cfg
        phase = PHASES[self.phases[index]]
        epochs, steps = cfg[phase.epochs], steps_per_epoch(self.ds, cfg["batch_size"])
        opt, sched = self._optimizer(model, epochs, steps, state)
        if state is not None:
            checkpoint.set_rng_state(state["rng"])
        setup = _Stopwatch()  # counted as training time of the first epoch
        st = self._start_svd_training(model, opt, phase, state, epochs, steps)
        net = self._wrap(model)
        setup_s, setup_cpu = setup.wall(), setup.cpu()
        for key in ("phase_seconds", "phase_cpu_seconds"):
            self.info.setdefault(key, {})
        start = state["epoch"] if state is not None else 0
        for epoch in range(start, epochs):
            clock = _Stopwatch()
            cuts_before = len(st.history) if st is not None else 0
            lr = opt.param_groups[0]["lr"]  # the epoch's first step's
            sums = self._train_epoch(index, epoch, epochs, net, model, opt, sched, st, steps)
            step_s = clock.wall() / steps
            if st is not None and self._record_cuts(st, cuts_before, phase, epoch):
                if cfg.get("compile"):
                    # The old ranks' graphs are dead: drop them rather than let every cut
                    # add a cache entry until dynamo's recompile limit sends us to eager.
                    torch._dynamo.reset()
                net = self._wrap(model)
            train_s, train_cpu = clock.wall() + setup_s, clock.cpu() + setup_cpu
            setup_s = setup_cpu = 0.0
            self._count_seconds(phase, train_s, train_cpu)
            if not _per_step(sched):
                sched.step()
            test_loss, test_acc = evaluate(model, self.ds, self.env.device)
            if not math.isfinite(test_loss):
                self._diverged(
                    f"the test loss became {test_loss} after phase {phase.name!r}, epoch "
                    f"{epoch + 1}"
                )
            times = {
                "seconds": clock.wall(),
                "train_seconds": train_s,
                "train_cpu_seconds": train_cpu,
                "step_ms": 1e3 * step_s,
            }
            row = self._metrics_row(phase, epoch, model, lr, sums, (test_loss, test_acc), times)
            # The row first: a crash before the checkpoint leaves an extra row, which resume
            # trims; the other order would lose the row of a checkpointed epoch.
            self.files.append_metrics(row)
            self.files.save_checkpoint(self._checkpoint(phase, epoch, model, opt, sched, st))
            if self.show_bars:
                self.log(
                    f"{phase.name:>12} {epoch + 1:3d}/{epochs}  loss {row['loss']:.4f}  "
                    f"train {row['train_accuracy']:.2%}  test {test_acc:.2%}  lr {lr:.2g}  "
                    f"{row['seconds']:.1f}s"
                )

    def _optimizer(
        self, model: nn.Module, epochs: int, steps: int, state: dict[str, Any] | None
    ) -> tuple[torch.optim.Optimizer, Any]:
        """A phase's optimizer and LR schedule over `epochs` of `steps`: fresh, or as in
        `state`."""
        opt = _make_optimizer(model.parameters(), self.cfg)
        if state is not None and "T_max" in state["scheduler"]:
            # A run saved when cosine acted every epoch resumes that way.
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
        else:
            sched = _make_scheduler(opt, self.cfg, epochs, steps)
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        return opt, sched

    def _start_svd_training(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        phase: Phase,
        state: dict[str, Any] | None,
        epochs: int,
        steps: int,
    ) -> SVDTraining | None:
        """An SVD phase's SVDTraining as `state` left it (the forms in force, the cuts so
        far), or new with the forms tuned now under --tune-forms; None in a dense phase."""
        if not phase.svd:
            return None
        st = self._svd_training(model, opt, phase, epochs * steps, steps)
        if state is not None and state.get("svd_training"):
            st.load_state_dict(state["svd_training"])
        elif st.tune_forms:
            st.tune()
        return st

    def _count_seconds(self, phase: Phase, wall: float, cpu: float) -> None:
        """Add an epoch's training time to the phase's (the run's info keeps them)."""
        for key, value in (("phase_seconds", wall), ("phase_cpu_seconds", cpu)):
            per_phase = self.info[key]
            per_phase[phase.name] = per_phase.get(phase.name, 0.0) + value

    def _metrics_row(
        self,
        phase: Phase,
        epoch: int,
        model: nn.Module,
        lr: float,
        sums: dict[str, float],
        test: tuple[float, float],
        times: dict[str, float],
    ) -> dict[str, Any]:
        """An epoch's row of metrics.jsonl: the means of its loss terms over the samples,
        train and test figures, its times, and an SVD phase's ranks."""
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
            "test_loss": test[0],
            "test_accuracy": test[1],
            **times,
        }
        if phase.svd:
            layer_ranks = {name: m.rank for name, m in svd_layers(model)}
            full = sum(m.full_rank for _, m in svd_layers(model))
            row["ranks"] = layer_ranks
            row["rank_fraction"] = sum(layer_ranks.values()) / full
        return row

    def _checkpoint(
        self,
        phase: Phase,
        epoch: int,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        sched: Any,
        st: SVDTraining | None,
    ) -> dict[str, Any]:
        """Everything a resumed run needs to go on after `epoch` of `phase` exactly."""
        return {
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
        }

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

    def _train_epoch(
        self, index, epoch, epochs, net, model, opt, sched, st, steps
    ) -> dict[str, float]:
        """One epoch of phase `index`; `st` (an SVD phase's SVDTraining) adds its penalty
        and counts every step, cutting ranks when due; `sched` steps here when it acts every
        step. Returns the epoch's sums over all processes (loss terms weighted by samples;
        "correct" of "predicted" targets)."""
        cfg, env = self.cfg, self.env
        phase = PHASES[self.phases[index]]
        model.train()
        sums = dict.fromkeys(
            ("loss", "task", "orth", "sparsity", "nuclear", "correct", "count", "predicted"), 0.0
        )
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
        grouped = contextlib.nullcontext if cfg.get("compile") else svdkern.grouped_compose
        per_step = _per_step(sched)
        for i, (x, y) in enumerate(batches):
            with grouped(model):
                out = net(x)
            loss, terms = self._loss(phase, model, st, out, y)
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
            if per_step:
                sched.step()
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

    def _loss(
        self,
        phase: Phase,
        model: nn.Module,
        st: SVDTraining | None,
        out: torch.Tensor,
        y: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A step's loss and its terms: the task's cross-entropy, an SVD phase's penalty
        (λ_o·orth + λ_s·sparsity), TRP's nuclear norm."""
        cfg = self.cfg
        terms = {"task": F.cross_entropy(out.flatten(0, -2), y.flatten())}
        loss = terms["task"]
        if st is not None and (cfg["orth"] > 0 or st.regularizer.strength > 0):
            loss = loss + st.penalty()
            terms.update(orth=st.last_terms["orth"], sparsity=st.last_terms["sparsity"])
        if phase.trp and cfg["trp_nuclear"] > 0:
            terms["nuclear"] = baselines.nuclear_norm(model, cfg["decomposition"])
            loss = loss + cfg["trp_nuclear"] * terms["nuclear"]
        return loss, terms

    # -- the run ----------------------------------------------------------------------

    def finish_phase(self, name: str, model: nn.Module) -> None:
        """Measure a trained phase's model, record it as the phase's result and save it."""
        phase = PHASES[name]
        result = measure(model, self.ds, self.example, self.cfg["decomposition"])
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
        self.files.save(
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
            at = (first, state["epoch"])
            self.files.trim_metrics(lambda row: self._position(row) <= at)
        for index in range(first, len(self.phases)):
            name = self.phases[index]
            if state is not None:
                model = self._resumed_model(name, state)
            else:
                model = self.start_model(name)
            self.train_phase(index, model, state)
            state = None
            self.finish_phase(name, model)
        return self.results

    def _position(self, row: dict[str, Any]) -> tuple[int, int]:
        """(phase index, epoch) of a metrics row, in the order the run trains them."""
        return self.phases.index(row["phase"]), row["epoch"]

    def _resumed_model(self, name: str, state: dict[str, Any]) -> nn.Module:
        """The model of phase `name` as checkpointed in `state` (SVD layers at its ranks)."""
        svd = PHASES[name].svd
        model = self.skeleton(svd=svd)
        if svd:
            svdkern.load_state_dict(model, state["model"])
        else:
            model.load_state_dict(state["model"])
        return model.to(self.env.device)
