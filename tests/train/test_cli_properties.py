"""Properties of `svdkern train`'s command line and config files, over random inputs.

Every run stops where training would start (the data set's loading is replaced by a
stop), so an example costs a parse and a resolve. The properties:

- any flags with any values, any TOML document over the known keys and some unknown
  ones: either the configuration is accepted (and then a resume would accept it too:
  `config.check_saved` passes on it), or the command ends with exit code 2 and exactly
  one `svdkern train: error: ` line on stderr, never a traceback;
- a valid TOML document is accepted and every key it sets arrives unchanged in the
  run's configuration.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import budget
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from svdkern.__main__ import main
from svdkern.train import cli, config
from svdkern.train.models import LM_MODELS

PROPERTY = settings(
    max_examples=budget(150),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
ERROR = "svdkern train: error: "


class _Reached(Exception):
    """Raised in place of loading the data set: the configuration was accepted."""

    def __init__(self, name: str):
        super().__init__(name)


def _parser_actions() -> dict[str, object]:
    """Flag → action of every documented flag but the run-directory ones (--out is set by
    the test to a fresh directory; --resume reads runs)."""
    parser = cli.build_train_parser()
    return {
        opt: action
        for action in parser._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt not in ("--help", "--out", "--resume")
    }


FLAGS = sorted(_parser_actions())
KEYS = sorted({f[2:] for f in FLAGS} - {"config"})  # TOML keys, with `-`
UNKNOWN_KEYS = ["modle", "epochs", "stop-after-epochs", "resume", "help", "no-quiet", "Lr"]


def _run_train(argv: list[str], monkeypatch) -> tuple[str, dict | None, str]:
    """("accepted", cfg, stderr) or ("error", None, stderr) of `svdkern train argv`."""
    seen: dict = {}

    def stop(name, data_dir=None, **sizes):
        raise _Reached(name)

    monkeypatch.setattr(cli, "load_dataset", stop)
    resolve = config.resolve

    def spy(args):
        seen["cfg"] = resolve(args)
        return seen["cfg"]

    monkeypatch.setattr(config, "resolve", spy)
    err = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(err):
        try:
            code = main(["train", *argv, "--out", str(Path(tmp) / "run")])
        except _Reached:
            return "accepted", seen["cfg"], err.getvalue()
        except SystemExit as exc:
            code = exc.code
    assert code == 2, (argv, code, err.getvalue())
    return "error", None, err.getvalue()


def _assert_one_error_line(stderr: str, argv) -> None:
    assert "Traceback" not in stderr, (argv, stderr)
    errors = [line for line in stderr.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1, (argv, stderr)
    assert stderr.rstrip("\n").splitlines()[-1] == errors[0], (argv, stderr)


def _check_outcome(argv, outcome: str, cfg, stderr: str) -> None:
    if outcome == "accepted":
        # What the command line accepts, a resume of the same run accepts.
        saved = {k: v for k, v in cfg.items()}
        json_round_trip = json.loads(json.dumps(saved))
        assert config.check_saved(saved, "checkpoint.pt") is saved
        assert config.check_saved(json_round_trip, "config.json") is json_round_trip
    else:
        _assert_one_error_line(stderr, argv)


# Text without control characters or Unicode line separators (argparse quotes a value
# verbatim); the parser escapes \n and \r, which the values below include on purpose.
_TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")), max_size=12
)
_CLI_VALUE = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "1", "0.5", "1e-3", "nan", "-inf", "0.5,0.75", "0.75,0.5", "true"]),
    st.sampled_from(
        ["digits", "synthetic", "cifar10", "mlp", "cnn", "svd", "dense", "hoyer", "adam"]
    ),
    st.sampled_from(["cpu", "cuda", "cuda:1", "meta", "tpu:x"]),
    st.sampled_from(["a\nb", "runs/x\r\ny", "\n"]),  # paths with line breaks
    _TEXT,
)
_CLI_ARG = st.one_of(
    st.tuples(st.sampled_from(FLAGS), st.none()),  # the flag alone
    st.tuples(st.sampled_from(FLAGS), _CLI_VALUE),  # --flag VALUE
    st.tuples(st.sampled_from(FLAGS), _CLI_VALUE).map(lambda p: (f"{p[0]}={p[1]}", None)),
    st.tuples(st.sampled_from(["--lrr", "--no-such-flag", "-x", "--"]), st.none()),
)


def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int | datetime.date):
        return str(value).replace(" ", "T")
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


def _toml(table: dict) -> str:
    return "".join(f"{_toml_string(k)} = {_toml_value(v)}\n" for k, v in table.items())


_TOML_SCALAR = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["no", "yes", "true", "synthetic", "digits", "mlp", "cpu", "0.5", "svd"]),
    _TEXT,
    st.datetimes(min_value=datetime.datetime(1, 1, 1)),
)
_TOML_VALUE = st.one_of(
    _TOML_SCALAR,
    st.lists(_TOML_SCALAR, max_size=3),
    st.lists(st.floats(0.01, 0.99), max_size=3),
    st.dictionaries(st.sampled_from(["a", "lr"]), _TOML_SCALAR, max_size=2),
)
_TOML_KEY = st.one_of(
    st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k.replace("-", "_"))
)
_TOML_RANDOM = st.dictionaries(
    st.one_of(_TOML_KEY, _TOML_KEY, _TOML_KEY, st.sampled_from(UNKNOWN_KEYS)),
    _TOML_VALUE,
    max_size=2,
)


@PROPERTY
@given(st.binary(max_size=40))
def test_random_bytes_as_config_end_in_one_error_line_naming_the_file(monkeypatch, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.toml"
        path.write_bytes(data)
        outcome, cfg, stderr = _run_train(["--config", str(path)], monkeypatch)
        _check_outcome(data, outcome, cfg, stderr)
        if outcome == "error":
            assert str(path) in stderr


def _valid_tables():
    """TOML tables of valid values only (one of energy and target-flops, no --init; cifar10
    with a data directory, never read: the data set's loading is replaced by a stop)."""
    fraction = st.floats(0.001, 0.999)
    fields = {
        "data": st.sampled_from(["digits", "synthetic", "cifar10"]),
        # The image models (gpt2-tiny takes --data text, tested in test_lm_task.py).
        "model": st.sampled_from([m for m in config.MODELS if m not in LM_MODELS]),
        "method": st.sampled_from(config.METHODS),
        "no-baselines": st.booleans(),
        "cut-every": st.integers(1, 10),
        "cut-energy": fraction,
        "tune-forms": st.booleans(),
        "orth-every": st.integers(1, 5),
        "compress-policy": st.sampled_from(["latency", "flops", "lowrank", "dense"]),
        "decomposition": st.sampled_from(config.DECOMPOSITIONS),
        "orth": st.floats(0, 10),
        "sparsity": st.sampled_from(config.SPARSITY),
        "strength": st.floats(0, 1),
        "multiple-of": st.integers(1, 16),
        "trp-interval": st.integers(1, 100),
        "trp-nuclear": st.floats(0, 1),
        "dense-epochs": st.integers(0, 5),
        "svd-epochs": st.integers(0, 5),
        "finetune-epochs": st.integers(0, 5),
        "batch-size": st.integers(1, 64),
        "optimizer": st.sampled_from(config.OPTIMIZERS),
        "lr": st.floats(1e-6, 1),
        "momentum": st.floats(0, 0.99),
        "weight-decay": st.floats(0, 0.1),
        "schedule": st.sampled_from(config.SCHEDULES),
        "milestones": st.lists(fraction, min_size=1, max_size=3, unique=True).map(sorted),
        "gamma": st.floats(0.01, 1),
        "seed": st.integers(0, 2**32 - 1),
        "threads": st.integers(1, 4),
        "quiet": st.booleans(),
        "device": st.just("cpu"),
    }
    exclusive = st.one_of(
        st.just({}),
        st.fixed_dictionaries({"energy": fraction}),
        st.fixed_dictionaries({"target-flops": fraction}),
    )
    others = {k: v for k, v in fields.items() if k not in ("energy", "target-flops")}
    tables = st.tuples(st.fixed_dictionaries({}, optional=others), exclusive)
    return tables.map(lambda t: {**t[0], **t[1], **_data_dir(t[0])})


def _data_dir(table: dict) -> dict:
    return {"data-dir": tempfile.gettempdir()} if table.get("data") == "cifar10" else {}


def _flags(table: dict) -> list[str]:
    """The command line equivalent to a valid table."""
    argv = []
    for key, value in table.items():
        if isinstance(value, bool):
            argv += [f"--{key}"] if value else (["--no-tune-forms"] if key == "tune-forms" else [])
        elif isinstance(value, list):
            argv.append(f"--{key}={','.join(map(repr, value))}")
        else:
            argv.append(f"--{key}={value!r}" if isinstance(value, float) else f"--{key}={value}")
    return argv


def _argv(pairs) -> list[str]:
    argv = [s for flag, value in pairs for s in ([flag] if value is None else [flag, value])]
    return [a for a in argv if a != "--config"]


@PROPERTY
@given(_valid_tables(), st.lists(_CLI_ARG, max_size=3))
def test_random_command_lines_are_accepted_or_end_in_one_error_line(monkeypatch, valid, pairs):
    # Random flags and values after a valid command line: each example probes a few flags.
    argv = _flags(valid) + _argv(pairs)
    _check_outcome(argv, *_run_train(argv, monkeypatch))


@PROPERTY
@given(_valid_tables(), _TOML_RANDOM, st.lists(_CLI_ARG, max_size=1))
def test_random_config_files_are_accepted_or_end_in_one_error_line(
    monkeypatch, valid, random_keys, pairs
):
    # Random keys and values over a valid document: each example probes a few keys.
    table = {**valid, **random_keys}
    argv = _argv(pairs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.toml"
        path.write_text(_toml(table), encoding="utf-8")
        argv = ["--config", str(path), *argv]
        outcome, cfg, stderr = _run_train(argv, monkeypatch)
    _check_outcome(argv, outcome, cfg, stderr)
    if not pairs:  # a value of the wrong kind names its key, never as a stray argument
        assert "unrecognized arguments" not in stderr, (table, stderr)


@PROPERTY
@given(_valid_tables(), st.booleans())
def test_valid_config_files_are_accepted_and_every_key_arrives(monkeypatch, table, underscore):
    if underscore:
        table = {k.replace("-", "_"): v for k, v in table.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.toml"
        path.write_text(_toml(table), encoding="utf-8")
        outcome, cfg, stderr = _run_train(["--config", str(path)], monkeypatch)
    assert outcome == "accepted", (table, stderr)
    for key, value in table.items():
        assert cfg[key.replace("-", "_")] == value, key
    assert config.check_saved(cfg, "checkpoint.pt") is cfg


@PROPERTY
@given(_valid_tables())
def test_valid_command_lines_are_accepted_like_the_same_config_file(monkeypatch, table):
    outcome, cfg, stderr = _run_train(_flags(table), monkeypatch)
    assert outcome == "accepted", (table, stderr)
    for key, value in table.items():
        assert cfg[key.replace("-", "_")] == value, key


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("no_baselines", "no", "expected true or false, got 'no'"),
        ("lr", True, "expected a number, got True"),
        ("batch-size", 16.0, "expected an integer, got 16.0"),
        ("batch_size", [16], "expected an integer, got [16]"),
        ("model", 3, "expected one of 'mlp'"),
        ("milestones", ["a"], "expected a list of numbers"),
        ("lr", -5, "must be > 0, got -5"),
    ],
)
def test_config_value_of_the_wrong_kind_names_the_key_and_the_kind(
    monkeypatch, tmp_path, key, value, expected
):
    path = tmp_path / "run.toml"
    path.write_text(_toml({key: value}))
    outcome, _, stderr = _run_train(["--config", str(path)], monkeypatch)
    assert outcome == "error"
    _assert_one_error_line(stderr, key)
    assert f"{path}: key {key!r}: {expected}" in stderr
    assert "unrecognized arguments" not in stderr


@pytest.mark.parametrize("flag", ["--init", "--config", "--resume"])
def test_a_path_with_a_line_break_is_one_error_line(flag, monkeypatch):
    argv = [flag, "no\nsuch\rfile"]
    outcome, _, stderr = _run_train(argv, monkeypatch)
    assert outcome == "error"
    _assert_one_error_line(stderr, argv)
    assert "\\n" in stderr.splitlines()[-1]


NUMBER_FLAGS = sorted(
    flag
    for flag, action in _parser_actions().items()
    if getattr(action.type, "kind", None) == "a number"
)


@pytest.mark.parametrize("value", ["1e39", "3.4028235e38", "-1e39", "inf", "-inf", "nan"])
@pytest.mark.parametrize("flag", NUMBER_FLAGS)
def test_every_number_flag_refuses_what_float32_cannot_hold_in_one_line(flag, value, monkeypatch):
    argv = [f"{flag}={value}"]
    outcome, _, stderr = _run_train(argv, monkeypatch)
    assert outcome == "error", (argv, stderr)
    _assert_one_error_line(stderr, argv)
    assert f"argument {flag}: " in stderr


def test_the_largest_accepted_lr_is_one_torch_applies_to_float32_tensors(monkeypatch):
    largest = repr(config._FLOAT32_MAX)
    outcome, cfg, stderr = _run_train(["--lr", largest, "--momentum", largest], monkeypatch)
    assert outcome == "accepted", stderr
    weights, grads = [torch.zeros(3)], [torch.ones(3)]
    torch._foreach_add_(weights, grads, alpha=-cfg["lr"])  # raises beyond the float32 range
    assert torch.equal(weights[0], torch.full((3,), -config._FLOAT32_MAX))
