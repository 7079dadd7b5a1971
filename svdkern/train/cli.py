"""`svdkern train` and `svdkern compare`: argument parsing and the run's outer steps."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import svdkern
from svdkern.train import checkpoint, config, report
from svdkern.train.data import DataError, load_dataset
from svdkern.train.loop import CHECKPOINT, METRICS, Pipeline, TrainingError, init_env

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
accuracy vs MACs).

examples:
  svdkern train                                    # digits demo, ~2 min on a laptop CPU
  svdkern train --data cifar10 --data-dir ~/data/cifar-10-batches-py --model resnet20
  svdkern train --config run.toml --out runs/a     # TOML keys = flag names
  svdkern train --resume runs/a                    # continue a stopped run
  torchrun --nproc-per-node 4 -m svdkern train --data cifar10 --data-dir DIR
  svdkern compare runs/a runs/b
"""


def build_train_parser(prog: str = "svdkern train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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


def _fresh_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    cfg = config.resolve(args)
    if cfg["data"] == "cifar10" and not cfg["data_dir"]:
        parser.error("argument --data-dir: required with --data cifar10 (the CIFAR-10 directory)")
    if cfg["init"] and not Path(cfg["init"]).is_file():
        parser.error(f"argument --init: no such checkpoint file: {cfg['init']}")
    if cfg["init"] and cfg["method"] == "dense":
        parser.error("argument --init: --method dense with --init has nothing to train")
    out = Path(cfg["out"])
    taken = [n for n in (CHECKPOINT, METRICS, "report.json") if (out / n).exists()]
    if taken:
        parser.error(
            f"argument --out: {out} already holds a run ({', '.join(taken)}); continue it with "
            f"--resume {out} or choose another --out"
        )
    return cfg


def _resume_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[dict, dict]:
    path = Path(args.resume) / CHECKPOINT
    if not path.is_file():
        parser.error(
            f"argument --resume: no {CHECKPOINT} in {args.resume} (a run writes it after its "
            "first epoch; start a new run instead)"
        )
    state = checkpoint.load(path)
    cfg = dict(state["config"])
    cfg.update(out=str(args.resume), quiet=args.quiet, resume=str(args.resume))
    cfg["stop_after_epochs"] = args.stop_after_epochs
    return cfg, state


def _check_target_flops(parser: argparse.ArgumentParser, pipe: Pipeline) -> None:
    """Fail before training when --target-flops is below what rank 1 everywhere reaches:
    that floor depends on the architecture only, so a fresh decomposed model tells."""
    cfg = pipe.cfg
    if cfg["target_flops"] is None or cfg["method"] == "dense":
        return
    try:
        svdkern.prune(
            pipe.skeleton(svd=True),
            target_flops=cfg["target_flops"],
            input_shape=pipe.input_shape,
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
    state = None
    if args.resume:
        cfg, state = _resume_config(parser, args)
    else:
        cfg = _fresh_config(parser, args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg["batch_size"] % world:
        parser.error(
            f"argument --batch-size: the global batch {cfg['batch_size']} must be divisible by "
            f"the number of processes ({world})"
        )
    try:
        ds = load_dataset(cfg["data"], cfg.get("data_dir"))
    except DataError as exc:
        parser.error(f"argument --data-dir: {exc}")
    if len(ds.y_train) < cfg["batch_size"]:
        parser.error(
            f"argument --batch-size: {cfg['batch_size']} is larger than the training set "
            f"({len(ds.y_train)} samples)"
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
            _check_target_flops(parser, pipe)
        if env.main and state is None:
            Path(cfg["out"]).mkdir(parents=True, exist_ok=True)
            saved = {k: v for k, v in cfg.items() if k != "stop_after_epochs"}
            (Path(cfg["out"]) / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
        try:
            pipe.run()
        except TrainingError as exc:
            if env.main:
                print(f"svdkern train: error: {exc}", file=sys.stderr)
            return 1
        if env.main:
            doc = pipe.finalize()
            _print_summary(cfg, doc, pipe.written)
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
    parser = argparse.ArgumentParser(
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
