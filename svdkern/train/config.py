"""Configuration of `svdkern train`: the flags, their defaults per data set, TOML files.

Every flag is also a key of `--config FILE` (TOML; `-` or `_` in keys). A config
file is turned into flags placed before the command line's own, so the command
line wins and both go through the same validation; a value of the wrong kind (a
string for a switch, a bool for a number) is refused naming the file and the key.
A saved configuration (a checkpoint's, config.json) is re-checked the same way by
`check_saved` before a run resumes from it.
Defaults left as None are filled from the data set (`resolve`): the authors'
CIFAR recipe (Adam 1e-3, 164 epochs, LR ×0.1 at 50% and 75%, batch 100, λ_o = 1)
and a scaled-down recipe for the bundled digits that runs in about two minutes.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import struct
import tomllib
from pathlib import Path
from typing import Any

from svdkern.nn import DECOMPOSITIONS
from svdkern.reference import SPARSITY_KINDS as SPARSITY
from svdkern.train import recipe
from svdkern.train.models import MODELS

DATASETS = ("digits", "cifar10", "synthetic", "text")
METHODS = tuple(recipe.METHODS)
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("step", "cosine", "constant")

# Per data set: the defaults of every flag left unset (None) on the command line.
_DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {
        "model": "cnn",
        "dense_epochs": 30,
        "svd_epochs": 30,
        "finetune_epochs": 10,
        "batch_size": 64,
        "strength": {"l1": 0.4, "hoyer": 0.1, "hoyer_square": 0.03},
        "energy": 0.01,
        "tune_forms": False,
    },
    "cifar10": {
        "model": "resnet20",
        "dense_epochs": 164,
        "svd_epochs": 164,
        "finetune_epochs": 40,
        "batch_size": 100,
        "strength": {"l1": 0.3, "hoyer": 0.07, "hoyer_square": 0.02},
        "energy": 1e-3,
        "tune_forms": True,
    },
    "synthetic": {
        "model": "mlp",
        "dense_epochs": 2,
        "svd_epochs": 2,
        "finetune_epochs": 1,
        "batch_size": 32,
        "strength": {"l1": 0.4, "hoyer": 0.1, "hoyer_square": 0.03},
        "energy": 0.01,
        "tune_forms": False,
    },
    # Byte-level language modelling of the standard library's Python sources (~29k windows
    # of 64 bytes): an epoch is 1600 fresh windows (100 steps of batch 16), so the schedule,
    # the evaluation and svd-adaptive's cuts act every 100 steps; 600 steps in all.
    "text": {
        "model": "gpt2-tiny",
        "dense_epochs": 6,
        "svd_epochs": 4,
        "finetune_epochs": 2,
        "batch_size": 16,
        "epoch_size": 1600,
        "lr": 2e-3,
        "schedule": "cosine",
        "warmup_steps": 50,
        "strength": {"l1": 0.1, "hoyer": 0.03, "hoyer_square": 0.01},
        "energy": 0.01,
        "tune_forms": False,
    },
}

# Flags that describe how a process runs, not what it computes: not part of a run's identity.
RUNTIME_KEYS = ("resume", "config", "quiet", "out")
# Keys that older versions saved in a run's configuration and that mean nothing now: dropped
# when such a run resumes.
_RETIRED_KEYS = ("stop_after_epochs",)
# Keys added since runs were first saved, with the value that an older run ran with: filled
# in when such a run resumes.
_ADDED_KEYS = {
    "seq_len": 64,
    "width": None,
    "layers": None,
    "heads": None,
    "epoch_size": None,
    "warmup_steps": 0,
    "deploy_runtime": "eager",
}


class ConfigError(ValueError):
    """A configuration value (from a TOML file or a saved run) that the command line would
    refuse; the message names the file and the key."""


def _kind(description: str):
    """Tag a flag's type function with the kind of value it reads, for config files."""

    def tag(parse):
        parse.kind = description
        return parse

    return tag


# The largest finite float32. Training runs in float32: a factor beyond it (--lr 1e39)
# cannot be applied to a tensor, and a tiny one (1e-50) is 0 there.
_FLOAT32_MAX = 3.4028234663852886e38


def _as_float32(value: float) -> float:
    """`value` rounded to float32; ±inf beyond the largest float32 (as torch's checked
    conversion of a scalar sees it: 3.4028235e38 rounds to it but overflows)."""
    if abs(value) > _FLOAT32_MAX:
        return math.copysign(math.inf, value)
    return struct.unpack("f", struct.pack("f", value))[0]


def _float_in(name: str, lo: float, hi: float, lo_open: bool = True, hi_open: bool = True):
    """The type of every float flag: a finite number within the bounds, also once rounded to
    float32 (so --lr 1e39 and --lr 1e-50 are refused here, not by the first training step)."""

    @_kind("a number")
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if hi == math.inf:
            bound = f"must be {'>' if lo_open else '>='} {lo:g}"
        else:
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            bound = f"{name} must be in {left}{lo:g}, {hi:g}{right}"

        def outside(v: float) -> bool:
            below = v <= lo if lo_open else v < lo
            above = v >= hi if hi_open else v > hi
            return below or above

        if outside(value):
            raise argparse.ArgumentTypeError(f"{bound}, got {text}")
        single = _as_float32(value)
        if math.isinf(single):
            raise argparse.ArgumentTypeError(
                f"must be at most {_FLOAT32_MAX:.7g} (the largest float32; training runs in "
                f"float32), got {text}"
            )
        if outside(single):
            raise argparse.ArgumentTypeError(
                f"{bound}, got {text}, which is {single:g} in float32 (training runs in float32)"
            )
        return value

    return parse


_nonneg_float = _float_in("value", 0.0, math.inf, lo_open=False)
_pos_float = _float_in("value", 0.0, math.inf)


@_kind("an integer")
def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


@_kind("an integer")
def _seed(text: str) -> int:
    value = _nonneg_int(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be < 2**32 (a numpy seed), got {value}")
    return value


@_kind("an integer")
def _pos_int(text: str) -> int:
    value = _nonneg_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be >= 1, got 0")
    return value


@_kind("a list of numbers")
def _milestones(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated fractions like 0.5,0.75, got {text!r}"
        ) from None
    increasing = all(a < b for a, b in itertools.pairwise(values))
    if not values or any(not 0.0 < v < 1.0 for v in values) or not increasing:
        raise argparse.ArgumentTypeError(
            f"expected increasing fractions of the phase's epochs in (0, 1), got {text!r}"
        )
    return values


def _compile_backend(text: str) -> str:
    """A torch.compile backend torch knows (checked here, not at the first training step)."""
    import torch._dynamo

    if text not in torch._dynamo.list_backends(exclude_tags=()):
        common = ", ".join(torch._dynamo.list_backends())  # without debug/experimental ones
        raise argparse.ArgumentTypeError(
            f"unknown torch.compile backend {text!r}; use one of {common}"
        )
    return text


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Declare every flag of `svdkern train` on `p`."""
    g = p.add_argument_group("run")
    g.add_argument("--config", metavar="FILE", help="TOML file with any of these flags as keys")
    g.add_argument(
        "--out",
        metavar="RUN_DIR",
        help="run directory for checkpoints, metrics and report (default runs/<date-time>)",
    )
    g.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a stopped run from RUN_DIR/checkpoint.pt with its saved configuration "
        "(other flags except --quiet are ignored)",
    )
    g.add_argument(
        "--seed", type=_seed, default=0, help="seed of init, data order, in [0, 2³²) (default 0)"
    )
    g.add_argument(
        "--device",
        default="auto",
        help="torch device: cpu, cuda, cuda:1, ... (default: cuda if available, else cpu; "
        "under torchrun each process takes cuda:LOCAL_RANK)",
    )
    g.add_argument(
        "--threads",
        type=_pos_int,
        help="CPU threads of this process (torch.set_num_threads); default 1 for digits and "
        "synthetic (tiny models run fastest on one thread, and a busy machine's other cores "
        "stay free), torch's default otherwise",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars")

    g = p.add_argument_group("data and model")
    g.add_argument(
        "--data",
        choices=DATASETS,
        default="digits",
        help="digits: scikit-learn's bundled 8×8 digits (no download); cifar10: the "
        "CIFAR-10 files in --data-dir; synthetic: tiny random data for tests; text: "
        "byte-level language modelling of the text files in --data-dir, or without it of "
        "the Python standard library's own sources, split by file (default digits)",
    )
    g.add_argument(
        "--data-dir",
        metavar="DIR",
        help="cifar10: the directory with CIFAR-10 (binary: data_batch_1.bin.."
        "data_batch_5.bin, test_batch.bin; or python: data_batch_1..data_batch_5, "
        "test_batch), or its parent holding cifar-10-batches-bin/ or cifar-10-batches-py/; "
        "text: a directory of text files (every UTF-8 file under it)",
    )
    g.add_argument(
        "--model",
        choices=MODELS,
        help="mlp, cnn (small 4-conv CNN), resnet20/32/56/110 (CIFAR ResNets, option-A "
        "shortcuts), resnet18 (CIFAR variant), gpt2-tiny (a GPT-2 byte-level language "
        "model from a transformers config, random init; --width, --layers, --heads). "
        "Default: cnn for digits, resnet20 for cifar10, mlp for synthetic, gpt2-tiny for text",
    )
    g.add_argument(
        "--epoch-size",
        type=_pos_int,
        help="training samples per epoch: each epoch a fresh random subset of this many "
        "(default: the whole training set; text: 1600 windows, 100 steps of batch 16, so "
        "that the schedule and the cuts act every 100 steps)",
    )
    g.add_argument(
        "--seq-len",
        type=_pos_int,
        default=64,
        help="text: bytes per training window (and the model's context) (default 64)",
    )
    g.add_argument(
        "--width", type=_pos_int, help="cnn, gpt2-tiny: channels / embedding width (16, 192)"
    )
    g.add_argument("--layers", type=_pos_int, help="gpt2-tiny: transformer blocks (default 4)")
    g.add_argument("--heads", type=_pos_int, help="gpt2-tiny: attention heads (default 4)")

    g = p.add_argument_group("method")
    g.add_argument(
        "--method",
        choices=METHODS,
        default="svd",
        help="; ".join(f"{name}: {m.help}" for name, m in recipe.METHODS.items()),
    )
    g.add_argument(
        "--no-baselines",
        action="store_true",
        help="with --method svd or svd-adaptive: skip the posthoc baseline",
    )
    g.add_argument(
        "--cut-every",
        type=_pos_int,
        default=1,
        help="svd-adaptive: cut ranks by the energy rule with --cut-energy every this many "
        "epochs of SVD training (default 1: the rank falls early, where the time goes; on "
        "digits, seeds 0-2, every epoch at ε 0.1 ends at dense accuracy with 5.6-5.9x fewer "
        "MACs, every 2 epochs at ε 0.05 with 2.4x)",
    )
    g.add_argument(
        "--cut-energy",
        type=_float_in("--cut-energy", 0.0, 1.0),
        default=0.1,
        help="svd-adaptive: ε of the cuts during SVD training, in (0, 1) (default 0.1: on "
        "digits with a cut every epoch, 0.05 leaves 3.3x fewer MACs, 0.1 5.6-5.9x at dense "
        "accuracy, 0.12 6.8x at -0.6 pt, 0.15 and 0.2 lose 3-4 pt; the final cut before "
        "fine-tuning uses --energy / --target-flops)",
    )
    g.add_argument(
        "--tune-forms",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time each SVD layer's forms (compose vs low-rank chain) at the start of every "
        "SVD phase and after every rank cut, and run the faster (default: on for "
        "svd-adaptive on cifar10; off otherwise, where the MAC rule picks: on the tiny "
        "digits models a tuning costs more than the forms it finds save)",
    )
    g.add_argument(
        "--orth-every",
        type=_pos_int,
        default=1,
        help="compute the orthogonality loss every this many steps, weighted λ_o × this "
        "(amortizes its Gram matrices; default 1 = every step, the paper's recipe; on "
        "digits, seeds 0-2, 4 and 16 stay within 0.6 pt of its accuracy with U, V as "
        "orthonormal)",
    )
    g.add_argument(
        "--compress-policy",
        choices=("latency", "flops", "lowrank", "dense"),
        default="latency",
        help="how the final model is deployed (svdkern.compress): latency = per layer the "
        "low-rank pair only where it was measured faster than the dense layer at batch 1 "
        "and the latency batch; flops = where it has fewer MACs (default latency)",
    )
    g.add_argument(
        "--deploy-runtime",
        choices=("eager", "compile", "onnxruntime"),
        default="eager",
        help="where the deployed models run, and are timed in the report: eager PyTorch, "
        "torch.compile (inductor, frozen weights) or ONNX Runtime (pip install "
        "svdkern[deploy]); the latency policy chooses the forms in it, and every deployed "
        "model has its batch norms folded into the convs before them (default eager)",
    )
    g.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        type=_compile_backend,
        metavar="BACKEND",
        help="train with torch.compile(model, backend=BACKEND) (default backend inductor); "
        "a rank cut recompiles once (--multiple-of bounds the distinct ranks)",
    )
    g.add_argument(
        "--init",
        metavar="CKPT",
        help="start from this dense checkpoint (a run's dense.pt or a plain state_dict) "
        "instead of training the dense model",
    )
    g.add_argument(
        "--decomposition",
        choices=DECOMPOSITIONS,
        default="channel",
        help="how a conv weight is viewed as a matrix (default channel)",
    )
    g.add_argument(
        "--orth",
        type=_nonneg_float,
        default=1.0,
        help="λ_o, weight of the orthogonality loss of U and V (default 1.0)",
    )
    g.add_argument(
        "--sparsity",
        choices=SPARSITY,
        default="hoyer",
        help="sparsity regulariser of the singular values (default hoyer)",
    )
    g.add_argument(
        "--strength",
        type=_nonneg_float,
        help="λ_s, weight of the sparsity loss (default per data set and --sparsity: digits "
        "l1 0.4, hoyer 0.1, hoyer_square 0.03; cifar10 l1 0.3, hoyer 0.07, "
        "hoyer_square 0.02)",
    )
    prune = g.add_mutually_exclusive_group()
    prune.add_argument(
        "--energy",
        type=_float_in("--energy", 0.0, 1.0),
        help="ε, fraction of each layer's energy Σs² removed by pruning, in (0, 1) "
        "(default 0.01 digits, 1e-3 cifar10)",
    )
    prune.add_argument(
        "--target-flops",
        type=_float_in("--target-flops", 0.0, 1.0, hi_open=False),
        help="prune to this fraction of the dense model's MACs (all Linear/Conv2d layers), "
        "in (0, 1], by one global ε, instead of --energy",
    )
    g.add_argument(
        "--multiple-of",
        type=_pos_int,
        help="round pruned ranks up to a multiple of this, capped at the layer's rank (e.g. 8 "
        "for tensor cores); must be below the largest SVD layer's rank, else nothing is pruned",
    )
    g.add_argument(
        "--trp-interval",
        type=_pos_int,
        default=20,
        help="trp: truncate every layer by the energy rule every this many steps (default 20)",
    )
    g.add_argument(
        "--trp-nuclear",
        type=_nonneg_float,
        default=1e-3,
        help="trp: weight of the nuclear-norm regulariser Σ‖W‖_* (default 1e-3)",
    )

    g = p.add_argument_group("optimisation (each phase starts a fresh optimizer and schedule)")
    g.add_argument(
        "--dense-epochs",
        type=_nonneg_int,
        help="epochs of dense training (default 30 digits, 164 cifar10; 0 with --init)",
    )
    g.add_argument(
        "--svd-epochs",
        type=_nonneg_int,
        help="epochs of SVD (or TRP) training (default 30 digits, 164 cifar10; svd-adaptive: "
        "the dense epochs minus --finetune-epochs)",
    )
    g.add_argument(
        "--finetune-epochs",
        type=_nonneg_int,
        help="epochs of fine-tuning after pruning, λ_o kept and λ_s = 0; the posthoc and trp "
        "baselines get the same (default 10 digits, 40 cifar10)",
    )
    g.add_argument(
        "--batch-size",
        type=_pos_int,
        help="global batch size, split evenly over torchrun processes (default 64 digits, "
        "100 cifar10)",
    )
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="(default adam)")
    g.add_argument(
        "--lr", type=_pos_float, help="learning rate (default adam 1e-3, text 2e-3; sgd 0.1)"
    )
    g.add_argument("--momentum", type=_nonneg_float, default=0.9, help="sgd momentum (0.9)")
    g.add_argument(
        "--weight-decay", type=_nonneg_float, help="weight decay (default 0 adam, 5e-4 sgd)"
    )
    g.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="LR schedule of each phase: step (×--gamma at --milestones), cosine (annealed "
        "every step, to 0 at the phase's end), constant (default step; cosine for text)",
    )
    g.add_argument(
        "--warmup-steps",
        type=_nonneg_int,
        help="optimizer steps at the start of each phase over which the LR rises linearly "
        "from lr/N to lr (default 0; 50 for text, whose transformer's fresh Adam state "
        "needs it)",
    )
    g.add_argument(
        "--milestones",
        type=_milestones,
        default=[0.5, 0.75],
        help="step schedule: fractions of a phase's epochs where the LR drops (default 0.5,0.75 "
        "= the authors' 81 and 122 of 164)",
    )
    g.add_argument(
        "--gamma",
        type=_float_in("--gamma", 0.0, 1.0, hi_open=False),
        default=0.1,
        help="step schedule: LR factor at each milestone (default 0.1)",
    )


def _given(action: argparse.Action, argv: list[str]) -> bool:
    return any(a == opt or a.startswith(opt + "=") for a in argv for opt in action.option_strings)


def _expected(action: argparse.Action) -> str:
    """The kind of value a flag takes, in words."""
    if action.nargs == 0:
        return "true or false"
    if action.choices is not None:
        return "one of " + ", ".join(repr(c) for c in action.choices)
    if action.nargs == "?":
        return "true or a string"
    return getattr(action.type, "kind", "a string")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _value_text(action: argparse.Action, value: Any) -> str:
    """The command-line text of a non-boolean config value, checked by the flag's own type
    and choices; ConfigError naming the expected kind and the problem otherwise."""
    expected = _expected(action)
    kind = getattr(action.type, "kind", None)
    if kind == "a list of numbers" and isinstance(value, list):
        if not all(_is_number(v) for v in value):
            raise ConfigError(f"expected {expected}, got {value!r}")
        text = ",".join(repr(float(v)) for v in value)
    elif kind in ("a number", "a list of numbers"):
        if not _is_number(value):
            raise ConfigError(f"expected {expected}, got {value!r}")
        text = repr(float(value)) if isinstance(value, float) else str(value)
    elif kind == "an integer":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"expected {expected}, got {value!r}")
        text = str(value)
    elif not isinstance(value, str):
        raise ConfigError(f"expected {expected}, got {value!r}")
    else:
        text = value
    if action.choices is not None and text not in action.choices:
        raise ConfigError(f"expected {expected}, got {value!r}")
    if action.type is not None:
        try:
            action.type(text)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(str(exc)) from None
    return text


def _file_value_argv(action: argparse.Action, opt: str, value: Any) -> list[str]:
    """The flags that a TOML key's value stands for (`opt` is the flag the key names)."""
    if action.nargs == 0 or (action.nargs == "?" and isinstance(value, bool)):
        if not isinstance(value, bool):
            raise ConfigError(f"expected {_expected(action)}, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            positive, negative = action.option_strings[:2]
            return [positive if value == (opt == positive) else negative]
        return [opt] if value else []
    return [f"{opt}={_value_text(action, value)}"]


def _file_flags(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.Action, str]]:
    """Config-file key (flag name with `_` for `-`) → (action, flag)."""
    return {
        opt.lstrip("-").replace("-", "_"): (action, opt)
        for action in parser._actions
        for opt in action.option_strings
        if opt.startswith("--")
        and action.help != argparse.SUPPRESS
        and action.dest not in ("config", "help", "resume")
    }


def config_file_argv(
    path: str, parser: argparse.ArgumentParser, cli_argv: list[str] = ()
) -> list[str]:
    """The flags equivalent to a TOML config file (keys are flag names, `-` or `_`).

    A key whose flag, or a flag exclusive with it (e.g. energy and target-flops), is given
    in `cli_argv` is left out: the command line wins. A file that cannot be read, is not
    TOML, or holds an unknown key or a value of the wrong kind ends in `parser.error`
    naming the file and the key.
    """
    rivals = {
        id(action): group._group_actions
        for group in parser._mutually_exclusive_groups
        for action in group._group_actions
    }
    try:
        with open(path, "rb") as f:
            table = tomllib.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        parser.error(f"argument --config: file not found: {path}")
    except IsADirectoryError:
        parser.error(f"argument --config: {path} is a directory, not a TOML file")
    except OSError as exc:
        parser.error(f"argument --config: cannot read {path}: {exc.strerror or exc}")
    except UnicodeDecodeError as exc:
        parser.error(
            f"argument --config: {path} is not UTF-8 text (byte {exc.start}); "
            "a config file is TOML, UTF-8 encoded"
        )
    except tomllib.TOMLDecodeError as exc:
        parser.error(f"argument --config: {path} is not valid TOML: {exc}")
    flags = _file_flags(parser)
    argv: list[str] = []
    seen: dict[int, str] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in flags:
            known = ", ".join(sorted(flags))
            parser.error(f"argument --config: unknown key {key!r} in {path} (known keys: {known})")
        action, opt = flags[name]
        if id(action) in seen:
            parser.error(
                f"argument --config: keys {seen[id(action)]!r} and {key!r} in {path} set the "
                "same flag; keep one"
            )
        seen[id(action)] = key
        try:
            flag_argv = _file_value_argv(action, opt, value)
        except ConfigError as exc:
            parser.error(f"argument --config: {path}: key {key!r}: {exc}")
        if not any(_given(a, list(cli_argv)) for a in rivals.get(id(action), [action])):
            argv += flag_argv
    return argv


# Keys that `resolve` always fills: None is not a valid saved value for them.
_RESOLVED = (
    "model",
    "dense_epochs",
    "svd_epochs",
    "finetune_epochs",
    "batch_size",
    "tune_forms",
    "strength",
    "lr",
    "weight_decay",
    "schedule",
    "warmup_steps",
)


def check_saved(cfg: dict, source: str) -> dict:
    """Re-check a saved run configuration (a checkpoint's or config.json's) as the command
    line checks its flags: every key known, none missing (runtime keys aside), every value
    of its flag's kind and passing the flag's own type and choices. Returns `cfg`, less the
    keys older versions saved that mean nothing now; raises ConfigError naming `source` and
    the key otherwise.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(
            f"{source}: the saved configuration is a {type(cfg).__name__}, not a table of keys"
        )
    for key in _RETIRED_KEYS:
        cfg.pop(key, None)
    for key, value in _ADDED_KEYS.items():
        cfg.setdefault(key, value)
    parser = argparse.ArgumentParser(add_help=False)
    add_train_arguments(parser)
    actions = {action.dest: action for action in parser._actions}
    for key in cfg:
        if key not in actions:
            raise ConfigError(
                f"{source}: config key {key!r} is unknown to this version of svdkern "
                "(saved by another version?); start a new run"
            )
    missing = [k for k in actions if k not in cfg and k not in RUNTIME_KEYS]
    if missing:
        raise ConfigError(
            f"{source}: config key {missing[0]!r} is missing (saved by an older version of "
            "svdkern?); start a new run"
        )
    for key, value in cfg.items():
        action = actions[key]
        if value is None and action.default is None and key not in _RESOLVED:
            continue
        try:
            if action.nargs == 0 or isinstance(value, bool):
                if not isinstance(value, bool) or action.nargs != 0:
                    raise ConfigError(f"expected {_expected(action)}, got {value!r}")
            else:
                _value_text(action, value)
        except ConfigError as exc:
            raise ConfigError(f"{source}: config key {key!r}: {exc}") from None
    if (cfg.get("energy") is None) == (cfg.get("target_flops") is None):
        raise ConfigError(
            f"{source}: config keys 'energy' and 'target_flops': exactly one must be set, got "
            f"energy={cfg.get('energy')!r}, target_flops={cfg.get('target_flops')!r}"
        )
    return cfg


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Fill the per-data-set defaults; returns the run's configuration as a plain dict."""
    cfg = {k: v for k, v in vars(args).items() if k not in ("command",)}
    defaults = _DATA_DEFAULTS[cfg["data"]]
    adaptive_svd = cfg.get("svd_epochs") is None and cfg["method"] == "svd-adaptive"
    for key in ("model", "dense_epochs", "svd_epochs", "finetune_epochs", "batch_size"):
        if cfg.get(key) is None:
            cfg[key] = defaults[key]
    if cfg.get("schedule") is None:
        cfg["schedule"] = defaults.get("schedule", "step")
    if cfg.get("epoch_size") is None:
        cfg["epoch_size"] = defaults.get("epoch_size")
    if cfg.get("warmup_steps") is None:
        cfg["warmup_steps"] = defaults.get("warmup_steps", 0)
    if adaptive_svd:
        # SVD training and fine-tuning together take as many epochs as dense training.
        cfg["svd_epochs"] = max(cfg["dense_epochs"] - cfg["finetune_epochs"], 0)
    if cfg.get("tune_forms") is None:
        cfg["tune_forms"] = cfg["method"] == "svd-adaptive" and defaults["tune_forms"]
    if cfg["strength"] is None:
        cfg["strength"] = defaults["strength"][cfg["sparsity"]]
    if cfg["energy"] is None and cfg["target_flops"] is None:
        cfg["energy"] = defaults["energy"]
    if cfg["threads"] is None and cfg["data"] in ("digits", "synthetic"):
        cfg["threads"] = 1
    if cfg["lr"] is None:
        adam = defaults.get("lr", 1e-3)
        cfg["lr"] = adam if cfg["optimizer"] == "adam" else 0.1
    if cfg["weight_decay"] is None:
        cfg["weight_decay"] = 0.0 if cfg["optimizer"] == "adam" else 5e-4
    if cfg["init"]:
        cfg["dense_epochs"] = 0
    if cfg["out"] is None:
        cfg["out"] = str(Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return cfg
