"""`svdkern train` and `svdkern compare`: argument parsing and the run's outer steps."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import svdkern
from svdkern.nn import svd_layers
from svdkern.train import checkpoint, config, report, rundir
from svdkern.train.data import DataError, load_dataset
from svdkern.train.loop import Pipeline, init_env
from svdkern.train.models import LM_MODELS, SIZES, model_sizes
from svdkern.train.recipe import phases_of
from svdkern.train.rundir import CHECKPOINT, METRICS, TrainingError

__all__ = ["build_compare_parser", "build_train_parser", "compare_main", "train_main"]

_TRAIN_EPILOG = """\
pipeline (--method svd): dense training (or --init) → decompose every Linear/Conv2d but the
final classifier → SVD training with λ_o·orth + λ_s·sparsity → prune singular values (--energy
or --target-flops) → fine-tune (λ_o kept, λ_s = 0) → compress → evaluate; with the posthoc
baseline (truncated SVD of the dense model at the same MACs, same fine-tuning) unless
--no-baselines.

The run directory gets checkpoint.pt (after every epoch), dense.pt / svd.pt / pruned.pt /
posthoc.pt (each phase's final model; load pruned ones with svdkern.load_state_dict),
metrics.jsonl (one line per epoch), report.json, report.md and PNG plots (spectra, ranks,
accuracy vs MACs). A run locks its directory (.lock) while it runs: a second run on it is
refused. --resume of a directory whose run stopped before its first checkpoint starts that run
again; --out on such a directory reuses it.

examples:
  svdkern train                                    # digits demo, ~2 min on a laptop CPU
  svdkern train --data cifar10 --data-dir ~/data/cifar-10-batches-py --model resnet20
  svdkern train --config run.toml --out runs/a     # TOML keys = flag names
  svdkern train --resume runs/a                    # continue a stopped run
  torchrun --nproc-per-node 4 -m svdkern train --data cifar10 --data-dir DIR
  svdkern compare runs/a runs/b
"""


class _Parser(argparse.ArgumentParser):
    """argparse whose error stays one line: line breaks in a value (a path with a newline)
    are shown escaped."""

    def error(self, message: str):
        super().error(message.replace("\r", "\\r").replace("\n", "\\n"))


def build_train_parser(prog: str = "svdkern train") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Train a low-rank model with SVD training (orthogonality + singular-value "
        "sparsity), prune it, fine-tune, compress and report.",
        epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config.add_train_arguments(parser)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.config:
        args = parser.parse_args(config.config_file_argv(args.config, parser, argv) + argv)
    return args


def _check_device(parser: argparse.ArgumentParser, device: str) -> None:
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        parser.error(f"argument --device: not a torch device: {device!r} (e.g. cpu, cuda, cuda:1)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: {device} requested but CUDA is not available")


def _note(text: str) -> None:
    """A message the user must see even with --quiet: what was done to the run directory."""
    print(f"svdkern train: {text}", file=sys.stderr)
    sys.stderr.flush()


def _fresh_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    cfg = config.resolve(args)
    if cfg["data"] == "cifar10" and not cfg["data_dir"]:
        parser.error("argument --data-dir: required with --data cifar10 (the CIFAR-10 directory)")
    if cfg["init"] and not Path(cfg["init"]).is_file():
        parser.error(f"argument --init: no such checkpoint file: {cfg['init']}")
    if cfg["init"] and cfg["method"] == "dense":
        parser.error("argument --init: --method dense with --init has nothing to train")
    lm = cfg["model"] in LM_MODELS
    if lm != (cfg["data"] == "text"):
        parser.error(
            f"argument --model: {cfg['model']} does not fit --data {cfg['data']}: the text "
            f"task takes a language model ({', '.join(LM_MODELS)}), the image data sets "
            "take the others"
        )
    sizes = model_sizes(cfg)
    unknown = sorted(set(sizes) - set(SIZES.get(cfg["model"], ())))
    if unknown:
        parser.error(
            f"argument --{unknown[0]}: --model {cfg['model']} takes no --{unknown[0]} (sizes "
            f"it takes: {', '.join('--' + k for k in SIZES.get(cfg['model'], ())) or 'none'})"
        )
    if lm and sizes.get("width", 192) % sizes.get("heads", 4):
        parser.error(
            f"argument --heads: the width {sizes.get('width', 192)} must be a multiple of "
            f"--heads {sizes.get('heads', 4)}"
        )
    return cfg


def _claim_out(
    parser: argparse.ArgumentParser, args: argparse.Namespace, cfg: dict
) -> tuple[rundir.RunLock, bool]:
    """Process 0 of a new run: create and lock the run directory (a fresh name for the default
    runs/<date-time>), refuse one that holds a run, reuse one whose run died before its first
    checkpoint. Returns the lock and whether the directory was created here."""
    out = Path(cfg["out"])
    try:
        if not args.out:
            out = rundir.unique_dir(out)
            cfg["out"] = str(out)
            created = True
        else:
            created = not out.exists()
        lock = rundir.claim(out, create=True)
    except rundir.RunDirError as exc:
        parser.error(f"argument --out: {exc}")
    taken = [n for n in (CHECKPOINT, "report.json") if (out / n).exists()]
    if taken:
        lock.release()
        parser.error(
            f"argument --out: {out} already holds a run ({', '.join(taken)}); continue it with "
            f"--resume {out} or choose another --out"
        )
    _took_over(lock)
    _remove_temp_files(out)
    left = [n for n in (METRICS, "config.json") if (out / n).exists()]
    if left:
        (out / METRICS).unlink(missing_ok=True)
        _note(
            f"reusing {out}: it holds no {CHECKPOINT} (its run stopped before its first epoch "
            f"ended; {', '.join(left)} replaced)"
        )
    return lock, created


def _took_over(lock: rundir.RunLock) -> None:
    if lock.previous:
        _note(f"took over the lock of a stopped run in {lock.directory} ({lock.previous})")


def _remove_temp_files(run: Path) -> None:
    removed = rundir.remove_dead_temp_files(run)
    if removed:
        _note(f"removed temporary files of a stopped run: {', '.join(str(p) for p in removed)}")


def _release(lock: rundir.RunLock | None, created: bool) -> None:
    """Unlock; a directory this process created and left empty (an error before the run
    began) is removed again."""
    if lock is None:
        return
    # Removed while still locked, so that no other run can lock the file about to go.
    if created and [p.name for p in lock.directory.iterdir()] == [rundir.LOCK]:
        with contextlib.suppress(OSError):  # another run just created its own .lock there
            (lock.directory / rundir.LOCK).unlink()
            lock.directory.rmdir()
    lock.release()


_CHECKPOINT_KEYS = ("phase", "epoch", "model", "optimizer", "scheduler", "rng", "config")
_CHECKPOINT_KEYS += ("results", "info")


def _check_saved(parser: argparse.ArgumentParser, cfg: dict, source: Path) -> dict:
    """Re-validate a saved configuration as the command line would, before any loading."""
    try:
        return config.check_saved(cfg, str(source))
    except config.ConfigError as exc:
        parser.error(f"argument --resume: {exc}")


def _resume_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace, main: bool
) -> tuple[dict, dict | None]:
    """The configuration and checkpoint of `--resume RUN`; (config, None) for a run that
    stopped before its first checkpoint, which then starts again from its beginning."""
    run = Path(args.resume)
    path = run / CHECKPOINT
    if not path.exists():
        saved = run / "config.json"
        if not saved.is_file() or (run / "report.json").exists():
            parser.error(
                f"argument --resume: no {CHECKPOINT} in {args.resume} (a run writes it after its "
                "first epoch; start a new run instead)"
            )
        try:
            cfg = json.loads(saved.read_text())
            if not isinstance(cfg, dict):
                raise ValueError("not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            parser.error(
                f"argument --resume: {saved}: unreadable ({exc}); start a new run with --out"
            )
        cfg = _check_saved(parser, cfg, saved)
        state = None
        if main:
            (run / METRICS).unlink(missing_ok=True)
            _note(
                f"{run} holds no {CHECKPOINT} (its run stopped before its first epoch ended): "
                "starting it from the beginning"
            )
    else:
        try:
            state = checkpoint.load(path)
        except checkpoint.CheckpointError as exc:
            parser.error(
                f"argument --resume: {exc}; remove it and run --resume {run} again to start "
                "the run from its beginning"
            )
        missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            parser.error(
                f"argument --resume: {path}: not a checkpoint of svdkern train (no "
                f"{missing[0]!r}); remove it and run --resume {run} again to start the run "
                "from its beginning"
            )
        cfg = _check_saved(parser, dict(state["config"]), path)
        if state["phase"] not in phases_of(cfg):
            parser.error(
                f"argument --resume: {path}: phase {state['phase']!r} is not a phase of method "
                f"{cfg.get('method')!r}; the checkpoint is damaged"
            )
    cfg.update(out=str(args.resume), quiet=args.quiet, resume=str(args.resume))
    return cfg, state


def _check_prune_flags(parser: argparse.ArgumentParser, pipe: Pipeline) -> None:
    """Fail before training when a pruning flag cannot work on this architecture (what it
    allows depends on the layers' ranks only, so a fresh decomposed model tells):
    --multiple-of not below any SVD layer's rank would round every rank back up to the
    layer's full rank and prune nothing; --target-flops below what rank 1 everywhere
    reaches cannot be met."""
    cfg = pipe.cfg
    if cfg["method"] == "dense" or (cfg["multiple_of"] is None and cfg["target_flops"] is None):
        return
    model = pipe.skeleton(svd=True)
    layers = svd_layers(model)
    if cfg["multiple_of"] is not None and layers:
        name, widest = max(layers, key=lambda item: item[1].rank)
        if cfg["multiple_of"] >= widest.rank:
            parser.error(
                f"argument --multiple-of: {cfg['multiple_of']} is not below the rank of any "
                f"SVD layer of --model {cfg['model']} (the largest is {widest.rank}, {name}): "
                "every pruned rank would round up to its layer's full rank and nothing would "
                f"be pruned; use a value below {widest.rank}"
            )
    if cfg["target_flops"] is None:
        return
    try:
        svdkern.prune(
            model,
            target_flops=cfg["target_flops"],
            example_inputs=(pipe.example,),
            multiple_of=cfg["multiple_of"],
        )
    except ValueError as exc:
        parser.error(f"argument --target-flops: {exc}")


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_main(argv: list[str] | None = None) -> int:
    """`svdkern train`: returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_train_parser()
    args = _parse(parser, argv)
    _check_device(parser, args.device)
    # Process 0 (of torchrun, or the only one) owns the run directory: locks it, cleans it up.
    main = int(os.environ.get("RANK", "0")) == 0
    lock, created = None, False
    try:
        if args.resume:
            if main:
                if not Path(args.resume).is_dir():
                    parser.error(
                        f"argument --resume: no {CHECKPOINT} in {args.resume} (a run writes it "
                        "after its first epoch; start a new run instead)"
                    )
                try:
                    lock = rundir.claim(args.resume, create=False, flag="--resume")
                except rundir.RunDirError as exc:
                    parser.error(f"argument --resume: {exc}")
                _took_over(lock)
                _remove_temp_files(Path(args.resume))
            cfg, state = _resume_config(parser, args, main)
        else:
            cfg, state = _fresh_config(parser, args), None
            if main:
                lock, created = _claim_out(parser, args, cfg)
        return _train(parser, args, cfg, state)
    finally:
        _release(lock, created)


def _train(
    parser: argparse.ArgumentParser, args: argparse.Namespace, cfg: dict, state: dict | None
) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg["batch_size"] % world:
        parser.error(
            f"argument --batch-size: the global batch {cfg['batch_size']} must be divisible by "
            f"the number of processes ({world})"
        )
    try:
        ds = load_dataset(
            cfg["data"],
            cfg.get("data_dir"),
            seq_len=cfg["seq_len"],
            epoch_size=cfg.get("epoch_size"),
        )
    except DataError as exc:
        parser.error(f"argument --data-dir: {exc}")
    if len(ds.y_train) < cfg["batch_size"]:
        parser.error(
            f"argument --batch-size: {cfg['batch_size']} is larger than the training set "
            f"({len(ds.y_train)} samples)"
        )
    if ds.epoch_size is not None and ds.epoch_size < cfg["batch_size"]:
        parser.error(
            f"argument --epoch-size: {ds.epoch_size} samples make no batch of --batch-size "
            f"{cfg['batch_size']}; use at least one batch per epoch"
        )
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    env = init_env(cfg["device"])
    try:
        if env.world > 1 and not args.resume and not args.out:
            name = [cfg["out"]]
            dist.broadcast_object_list(name, src=0)
            cfg["out"] = name[0]
        _seed(cfg["seed"])
        pipe = Pipeline(cfg, env, ds, resume=state)
        if state is None:
            _check_prune_flags(parser, pipe)
            if cfg["init"]:
                try:
                    pipe.init_state()
                except ValueError as exc:
                    parser.error(f"argument --init: {exc}")
        try:
            if env.main and state is None:
                path = Path(cfg["out"]) / "config.json"
                try:
                    path.write_text(json.dumps(cfg, indent=2) + "\n")
                except OSError as exc:
                    raise TrainingError(f"cannot write {path}: {exc.strerror}") from None
            pipe.run()
            if env.main:
                try:
                    doc, written = report.finalize(pipe)
                except OSError as exc:
                    raise TrainingError(
                        f"cannot write {exc.filename or 'the report'}: {exc.strerror}; the "
                        f"trained models are in {cfg['out']}"
                    ) from None
                _print_summary(cfg, doc, written)
        except TrainingError as exc:
            if env.main:
                print(f"svdkern train: error: {exc}", file=sys.stderr)
            return 1
        env.barrier()
    finally:
        if env.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _print_summary(cfg: dict, doc: dict, written: dict[str, Path]) -> None:
    print()
    print(f"run {cfg['out']}  ({doc['environment']['wall_time_s']:.0f} s)")
    print(report.format_table(doc["models"]))
    print()
    print(f"report: {written['markdown']}  {written['json']}")
    pictures = [str(p) for k, p in written.items() if k not in ("markdown", "json")]
    print(f"plots:  {'  '.join(pictures)}")
    sys.stdout.flush()


def build_compare_parser(prog: str = "svdkern compare") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="One table and one accuracy-vs-MACs plot of the models of several runs.",
    )
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories of svdkern train"
    )
    parser.add_argument(
        "--plot", default="compare.png", metavar="PNG", help="plot file (default compare.png)"
    )
    return parser


def compare_main(argv: list[str] | None = None) -> int:
    """`svdkern compare RUN_DIR...`: returns the exit status."""
    parser = build_compare_parser()
    args = parser.parse_args(argv)
    try:
        print(report.compare(args.runs, args.plot))
    except FileNotFoundError as exc:
        parser.error(str(exc))
    return 0
