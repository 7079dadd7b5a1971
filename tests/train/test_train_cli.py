"""`svdkern train` end to end on synthetic data: the phase recipe, report, checkpoints,
methods, config files, bad flags, NaN stop, kill -9 and resume; `svdkern compare` and
`svdkern check`."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TRAIN, kill_at, run_cli

import svdkern
from svdkern.__main__ import main
from svdkern.train import checkpoint, cli, config, recipe
from svdkern.train.cli import _parse, build_train_parser
from svdkern.train.measure import deployed_forms
from svdkern.train.models import CLASSIFIER, build_model
from svdkern.train.report import _forms_note

TINY = ["--data", "synthetic", "--quiet", "--dense-epochs", "1", "--svd-epochs", "1"]
TINY += ["--finetune-epochs", "1"]
TIMES = ("seconds", "train_seconds", "train_cpu_seconds", "step_ms")  # measured times


def _train(*args: str) -> int:
    return main(["train", *TINY, *args])


def _run(*args: str) -> subprocess.CompletedProcess:
    return run_cli([*TRAIN, *args])


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def _tensors_equal(a: Path, b: Path) -> None:
    sa, sb = checkpoint.load(a)["model"], checkpoint.load(b)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_train_end_to_end_writes_report_checkpoints_and_plots(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("--out", str(run)) == 0
    out = capsys.readouterr().out
    assert "pruned" in out and "posthoc" in out and "report.md" in out

    doc = _report(run)
    assert set(doc["models"]) == {"dense", "svd", "pruned", "compressed", "posthoc"}
    for name, m in doc["models"].items():
        assert 0.0 <= m["accuracy"] <= 1.0, name
        assert isinstance(m["params"], int) and isinstance(m["macs"], int) and m["macs"] > 0
        assert set(m["ranks"]) == {"fc1", "fc2"}
    assert doc["models"]["dense"]["ranks"] == {"fc1": 64, "fc2": 256}
    assert doc["config"]["data"] == "synthetic" and doc["config"]["method"] == "svd"
    assert doc["models"]["posthoc"]["macs"] <= doc["models"]["pruned"]["macs"]
    # pruned counts each layer's cheaper form; the measured (latency) policy may deploy
    # a layer in its other form where that runs faster.
    assert doc["models"]["compressed"]["macs"] >= doc["models"]["pruned"]["macs"]
    assert set(doc["latency"]["ms"]) == {"dense", "compressed"}
    assert doc["latency"]["policy"] == "latency"
    # One interleaved measurement of every deployed model: the latency section and the
    # per-model figures agree, and the final (pruned) model's deployed form is compressed.
    batches = [str(b) for b in doc["latency"]["batches"]]
    for name in ("dense", "compressed"):
        per_model = [doc["models"][name]["latency_ms"][b] for b in batches]
        assert per_model == doc["latency"]["ms"][name], name
    assert doc["models"]["pruned"]["latency_ms"] == doc["models"]["compressed"]["latency_ms"]
    assert all(v > 0 for m in doc["models"].values() for v in m["latency_ms"].values())
    forms = doc["models"]["compressed"]["forms"]
    assert set(forms) == {"fc1", "fc2"} and set(forms.values()) <= {"lowrank", "dense"}

    md = (run / "report.md").read_text()
    assert "| pruned |" in md and "Inference latency" in md and "Ranks per layer" in md
    assert re.search(r"\*\*compressed\*\*: .*\((all 2|1 of 2) SVD layers", md)
    for png in ("spectra.png", "ranks.png", "accuracy_vs_macs.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in rows] == [
        ("dense", 1),
        ("svd", 1),
        ("finetune", 1),
        ("posthoc", 1),
    ]
    assert rows[1]["sparsity"] > 0 and rows[1]["orth"] >= 0

    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["phase"] == "posthoc" and state["epoch"] == 1
    assert set(state["rng"]) >= {"torch", "numpy_keys", "python"}
    assert {"optimizer", "scheduler", "config", "results"} <= set(state)

    pruned = svdkern.decompose(build_model("mlp", (1, 8, 8), 10), skip=[CLASSIFIER])
    svdkern.load_state_dict(pruned, checkpoint.load(run / "pruned.pt")["model"])
    ranks = {n: m.rank for n, m in pruned.named_modules() if isinstance(m, svdkern.SVDLinear)}
    assert ranks == doc["models"]["pruned"]["ranks"]


@pytest.mark.parametrize("policy", ["lowrank", "dense", "flops"])
def test_the_report_records_what_compress_made_of_each_svd_layer(policy):
    torch.manual_seed(0)
    model = svdkern.decompose(build_model("mlp", (1, 8, 8), 10), skip=[CLASSIFIER])
    svdkern.prune(model, ranks={"fc1": 2})  # fc1 cheaper as a pair, fc2 (full rank) dense
    forms = deployed_forms(model, svdkern.compress(model, policy))
    expected = {"lowrank": "lowrank", "dense": "dense", "flops": None}[policy]
    assert forms == {"fc1": expected or "lowrank", "fc2": expected or "dense"}
    assert (
        _forms_note({"forms": forms})
        == {
            "lowrank": " (all 2 SVD layers as low-rank pairs)",
            "dense": " (all 2 SVD layers as one dense layer each)",
            "flops": " (1 of 2 SVD layers as low-rank pairs, 1 dense)",
        }[policy]
    )
    assert _forms_note({}) == ""


@pytest.mark.parametrize(
    "method, models",
    [
        ("dense", {"dense"}),
        ("posthoc", {"dense", "posthoc", "compressed"}),
        ("trp", {"dense", "trp_trained", "trp", "compressed"}),
    ],
)
def test_train_methods(tmp_path, method, models):
    run = tmp_path / method
    extra = ["--trp-interval", "3"] if method == "trp" else []
    assert _train("--out", str(run), "--method", method, *extra) == 0
    assert set(_report(run)["models"]) == models


def test_the_recipe_chains_every_phase_to_results_its_method_made_before():
    for method in recipe.METHODS:
        for no_baselines in (False, True):
            made: set[str] = set()
            for name in recipe.phases_of({"method": method, "no_baselines": no_baselines}):
                phase = recipe.PHASES[name]
                start = phase.start
                if start.result is not None:
                    assert start.result in made, (method, name)
                    source = recipe.RESULTS[start.result]
                    assert phase.svd == (source.svd or start.decompose), name
                    assert not (source.svd and start.decompose), name
                assert phase.svd or not (start.prune or phase.sparsity or phase.cuts), name
                made.add(phase.result)
            assert recipe.FINAL[method] in made
    assert recipe.FINAL == {
        "svd": "pruned",
        "svd-adaptive": "adaptive",
        "dense": "dense",
        "posthoc": "posthoc",
        "trp": "trp",
    }
    assert recipe.PRODUCED_BY == {
        "dense": ("dense",),
        "svd": ("dense", "svd"),
        "pruned": ("dense", "svd", "finetune"),
        "adaptive_svd": ("adaptive",),
        "adaptive": ("adaptive", "adaptive_finetune"),
        "posthoc": ("dense", "posthoc"),
        "trp_trained": ("dense", "trp"),
        "trp": ("dense", "trp", "trp_finetune"),
    }
    epochs = {phase.epochs for phase in recipe.PHASES.values()}
    assert epochs <= set(config.resolve(_parse(build_train_parser(), [])))


def test_init_from_dense_checkpoint_with_sgd_and_cosine(tmp_path):
    first, second = tmp_path / "dense", tmp_path / "svd"
    assert _train("--out", str(first), "--method", "dense") == 0
    args = ["--init", str(first / "dense.pt"), "--optimizer", "sgd", "--schedule", "cosine"]
    assert _train("--out", str(second), "--no-baselines", "--svd-epochs", "2", *args) == 0
    a, b = _report(first), _report(second)
    assert b["config"]["dense_epochs"] == 0
    assert b["models"]["dense"]["accuracy"] == a["models"]["dense"]["accuracy"]
    rows = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["svd", "svd", "finetune"]
    assert rows[0]["lr"] == 0.1 and rows[1]["lr"] < 0.1  # cosine over the 2 SVD epochs


def test_spatial_decomposition_and_target_flops_with_cnn(tmp_path):
    run = tmp_path / "run"
    args = ["--model", "cnn", "--decomposition", "spatial", "--target-flops", "0.5"]
    assert _train("--out", str(run), "--no-baselines", *args) == 0
    doc = _report(run)
    assert set(doc["models"]) == {"dense", "svd", "pruned", "compressed"}
    assert doc["models"]["pruned"]["macs"] <= 0.5 * doc["models"]["dense"]["macs"]


def test_deploy_runtime_folds_and_times_every_deployed_model_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    args = ["--model", "cnn", "--deploy-runtime", "onnxruntime", "--compress-policy", "flops"]
    assert _train("--out", str(run), "--no-baselines", *args) == 0
    doc = _report(run)
    assert doc["latency"]["runtime"] == "onnxruntime"
    assert all(v > 0 for m in doc["models"].values() for v in m["latency_ms"].values())
    # Folding the batch norms is exact in eval mode: the deployed model classifies the test
    # set as the pruned SVD model does.
    assert doc["models"]["compressed"]["accuracy"] == doc["models"]["pruned"]["accuracy"]
    assert "run in onnxruntime" in (run / "report.md").read_text()


def test_config_file_sets_flags_and_command_line_wins(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        'data = "synthetic"\nmethod = "dense"\ndense-epochs = 1\nbatch_size = 16\n'
        "quiet = true\nmilestones = [0.5]\nlr = 0.01\n"
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--lr", "0.002"]) == 0
    config = _report(run)["config"]
    assert config["batch_size"] == 16 and config["milestones"] == [0.5]
    assert config["lr"] == 0.002 and config["method"] == "dense"


def test_command_line_flag_overrides_an_exclusive_config_key(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('data = "synthetic"\nenergy = 0.01\n')
    parser = build_train_parser()
    args = _parse(parser, ["--config", str(cfg), "--target-flops", "0.5"])
    assert args.target_flops == 0.5 and args.energy is None and args.data == "synthetic"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "vgg"], "argument --model: invalid choice: 'vgg'"),
        (["--energy", "1.5"], r"argument --energy: --energy must be in \(0, 1\), got 1.5"),
        (["--energy", "0.1", "--target-flops", "0.5"], "argument --target-flops: not allowed"),
        (["--data", "cifar10"], "argument --data-dir: required with --data cifar10"),
        (
            ["--data", "cifar10", "--data-dir", "{tmp}/missing"],
            "argument --data-dir: .*data_batch_1.bin",
        ),
        (
            ["--data", "cifar10", "--data-dir", "{tmp}"],
            "argument --data-dir: .*no complete CIFAR-10",
        ),
        (["--resume", "{tmp}"], "argument --resume: no checkpoint.pt"),
        (["--init", "{tmp}/none.pt"], "argument --init: no such checkpoint"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1"),
        (["--device", "tpu:x"], "argument --device"),
        (["--config", "{tmp}/bad.toml"], "argument --config: unknown key 'modle'"),
        (["--config", "{tmp}"], "argument --config: .* is a directory, not a TOML file"),
        (["--config", "{tmp}/latin1.toml"], r"argument --config: .*latin1.toml is not UTF-8"),
        (["--config", "{tmp}/broken.toml"], r"argument --config: .*broken.toml is not valid TOML"),
        (
            ["--config", "{tmp}/kind.toml"],
            "argument --config: .*kind.toml: key 'no_baselines': expected true or false, got 'no'",
        ),
        (
            ["--config", "{tmp}/twice.toml"],
            "argument --config: keys 'dense-epochs' and 'dense_epochs' in .* set the same flag",
        ),
        (["--lr", "-5"], "argument --lr: must be > 0, got -5"),
        (["--lr", "1e39"], r"argument --lr: must be at most 3.402823e\+38 \(the largest float32"),
        (["--lr", "1e-50"], "argument --lr: must be > 0, got 1e-50, which is 0 in float32"),
        (["--lr", "inf"], "argument --lr: must be a finite number, got inf"),
        (["--weight-decay", "1e39"], "argument --weight-decay: must be at most 3.402823e"),
        (
            ["--data", "synthetic", "--multiple-of", "1000"],
            "argument --multiple-of: 1000 is not below the rank of any SVD layer of --model mlp "
            r"\(the largest is 256, fc2\): .*nothing would be pruned; use a value below 256",
        ),
        (["--compile", "nosuch"], "argument --compile: unknown torch.compile backend 'nosuch'"),
        (["--compile="], "argument --compile: unknown torch.compile backend ''"),
        (["--seed", "-1"], "argument --seed: must be >= 0"),
        (["--seed", str(2**32)], r"argument --seed: must be < 2\*\*32"),
        (["--milestones", "0.5,0.5"], "argument --milestones: expected increasing"),
        (
            ["--data", "synthetic", "--target-flops", "0.001"],
            "argument --target-flops: target_flops=0.001 cannot be reached",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_flags_are_answered_by_argparse_naming_the_flag(tmp_path, capsys, argv, message):
    (tmp_path / "bad.toml").write_text('modle = "mlp"\n')
    (tmp_path / "latin1.toml").write_bytes('model = "mlp" # \xe9t\xe9\n'.encode("latin-1"))
    (tmp_path / "broken.toml").write_text("lr = \n")
    (tmp_path / "kind.toml").write_text('no_baselines = "no"\n')
    (tmp_path / "twice.toml").write_text("dense-epochs = 1\ndense_epochs = 2\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "run"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: svdkern train" in err
    assert re.search(message, err), err
    assert err.splitlines()[-1].startswith("svdkern train: error: ") and "Traceback" not in err
    assert "unrecognized arguments" not in err


def test_config_file_booleans_set_either_side_of_an_optional_flag(tmp_path):
    parser = build_train_parser()
    for text, expected in [("tune-forms = false", False), ("tune_forms = true", True)]:
        (tmp_path / "run.toml").write_text(text + "\nno-baselines = false\ncompile = true\n")
        args = _parse(parser, ["--config", str(tmp_path / "run.toml")])
        assert args.tune_forms is expected and args.no_baselines is False
        assert args.compile == "inductor"
    (tmp_path / "run.toml").write_text('compile = "eager"\nno-tune-forms = true\n')
    args = _parse(parser, ["--config", str(tmp_path / "run.toml")])
    assert args.compile == "eager" and args.tune_forms is False


def _resolved(*argv: str) -> dict:
    return config.resolve(_parse(build_train_parser(), [*TINY, *argv]))


def test_check_saved_accepts_every_resolved_configuration():
    for argv in ([], ["--target-flops", "0.5", "--compile"], ["--method", "svd-adaptive"]):
        cfg = _resolved(*argv)
        assert config.check_saved(cfg, "checkpoint.pt") is cfg
        from_json = json.loads(json.dumps(cfg))
        assert config.check_saved(from_json, "config.json") == cfg


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lr": -5.0}, "runs/a/checkpoint.pt: config key 'lr': must be > 0, got -5.0"),
        ({"momentum": 1e39}, "config key 'momentum': must be at most 3.402823e"),
        ({"batch_size": 0}, "config key 'batch_size': must be >= 1, got 0"),
        ({"batch_size": 16.5}, "config key 'batch_size': expected an integer, got 16.5"),
        ({"orth": True}, "config key 'orth': expected a number, got True"),
        ({"no_baselines": "no"}, "config key 'no_baselines': expected true or false, got 'no'"),
        ({"model": "vgg"}, "config key 'model': expected one of 'mlp'"),
        ({"milestones": [0.75, 0.5]}, "config key 'milestones': expected increasing fractions"),
        ({"energy": 1.5}, r"config key 'energy': --energy must be in \(0, 1\), got 1.5"),
        ({"lr": None}, "config key 'lr': expected a number, got None"),
        ({"compile": True}, "config key 'compile': expected true or a string, got True"),
        ({"energy": None}, "config keys 'energy' and 'target_flops': exactly one must be set"),
        ({"modle": "mlp"}, "config key 'modle' is unknown to this version of svdkern"),
        ({"gamma": "DELETE"}, "config key 'gamma' is missing .*older version"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_check_saved_refuses_what_the_command_line_refuses(change, message):
    cfg = _resolved()
    for key, value in change.items():
        if value == "DELETE":
            del cfg[key]
        else:
            cfg[key] = value
    with pytest.raises(config.ConfigError, match=message) as exc:
        config.check_saved(cfg, "runs/a/checkpoint.pt")
    assert str(exc.value).startswith("runs/a/checkpoint.pt: ") and "\n" not in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_check_saved_refuses_a_configuration_that_is_not_a_table():
    with pytest.raises(config.ConfigError, match=r"runs/a/checkpoint.pt: .* a list, not a table"):
        config.check_saved([1, 2], "runs/a/checkpoint.pt")


def test_config_error_escaping_a_command_is_one_line_and_exit_2(monkeypatch, capsys):
    def refuse(argv):
        raise config.ConfigError("runs/a/checkpoint.pt: config key 'lr': must be > 0, got -5.0")

    monkeypatch.setattr(cli, "train_main", refuse)
    assert main(["train", "--resume", "runs/a"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "svdkern train: error: runs/a/checkpoint.pt: config key 'lr': must be > 0, got -5.0\n"
    )


def test_a_bug_escaping_a_command_keeps_its_traceback(monkeypatch):
    def bug(argv):
        raise KeyError("not a user error")

    monkeypatch.setattr(cli, "train_main", bug)
    with pytest.raises(KeyError):
        main(["train"])


def test_existing_run_dir_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("--out", str(run), "--method", "dense") == 0
    with pytest.raises(SystemExit):
        _train("--out", str(run), "--method", "dense")
    assert "already holds a run" in capsys.readouterr().err


def test_non_finite_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("--out", str(run), "--strength", "1e38", "--no-baselines") == 1
    err = capsys.readouterr().err
    assert "loss became inf" in err and "phase 'svd', epoch 1, step 1" in err
    assert "last good checkpoint" in err
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (state["phase"], state["epoch"]) == ("dense", 1)
    assert not (run / "report.json").exists()


@pytest.mark.slow
def test_kill_9_in_fine_tuning_and_resume_ends_like_an_uninterrupted_run(tmp_path):
    args = [*TINY, "--svd-epochs", "2", "--finetune-epochs", "2", "--method", "svd"]
    args += ["--compress-policy", "flops"]  # the latency policy's choice depends on timings
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(["train", *args, "--out", str(full)]) == 0  # the reference, in process
    # kill -9 once fine-tuning has checkpointed an epoch: the resume starts from whatever
    # checkpoint is on disk then, and must end with the reference's figures and weights.
    phases = ["dense", "svd", "finetune", "posthoc"]
    state = kill_at([*TRAIN, *args, "--out", str(killed)], killed, phases, ("finetune", 1))
    assert phases.index(state["phase"]) >= phases.index("finetune")
    assert not (killed / "report.json").exists()
    resumed = _run("--resume", str(killed), "--quiet")
    assert resumed.returncode == 0, resumed.stderr

    a, b = _report(full)["models"], _report(killed)["models"]
    assert a.keys() == b.keys()
    for name in a:
        for key in ("accuracy", "loss", "params", "macs", "ranks"):
            assert a[name][key] == b[name][key], (name, key)
    for name in ("dense.pt", "svd.pt", "pruned.pt", "posthoc.pt"):
        _tensors_equal(full / name, killed / name)
    rows = lambda run: [  # noqa: E731
        {k: v for k, v in json.loads(line).items() if k not in TIMES}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows(full) == rows(killed)


def test_compare_prints_one_table_and_one_plot(tmp_path, capsys):
    runs = []
    for method in ("dense", "posthoc"):
        runs.append(str(tmp_path / method))
        assert _train("--out", runs[-1], "--method", method) == 0
    capsys.readouterr()
    plot = tmp_path / "cmp.png"
    assert main(["compare", *runs, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert out.count("dense") >= 2 and "posthoc" in out and str(plot) in out
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"models": ', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8 text"),
        (b"[1, 2]", 'no "models" table'),
        (b'{"models": {}}', 'no "models" table'),
        (b'{"models": {"dense": {"accuracy": 0.9, "params": 10}}}', "model 'dense' lacks"),
        (
            b'{"models": {"dense": {"accuracy": "high", "params": 1, "macs": 2}}}',
            "model 'dense' lacks",
        ),
    ],
    ids=["truncated", "empty", "binary", "list", "no-models", "no-macs", "text-accuracy"],
)
def test_compare_on_a_damaged_report_is_one_line_naming_the_file(
    tmp_path, capsys, content, message
):
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_bytes(content)
    assert main(["compare", str(run), "--plot", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"svdkern compare: error: {run / 'report.json'}: {message}"), err
    assert not (tmp_path / "c.png").exists()


def test_compare_without_a_report_or_with_an_unwritable_plot_names_the_path(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(tmp_path / "none")])
    assert exc.value.code == 2
    assert f"{tmp_path / 'none'}: no report.json" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(
        '{"models": {"dense": {"accuracy": 0.5, "params": 1, "macs": 2}}}'
    )
    plot = tmp_path / "missing-dir" / "c.png"
    assert main(["compare", str(run), "--plot", str(plot)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"svdkern compare: error: --plot {plot}: cannot write")
        and err.count("\n") == 1
    )


def test_train_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--data-dir",
        "--decomposition",
        "--orth",
        "--sparsity",
        "--strength",
        "--energy",
        "--target-flops",
        "--method",
        "--no-baselines",
        "--init",
        "--resume",
        "--optimizer",
        "--schedule",
        "--device",
        "--config",
        "--seed",
        "--cut-every",
        "--cut-energy",
        "--tune-forms",
        "--compile",
    ):
        assert flag in out, flag


def test_check_is_the_default_command_and_passes(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "backend:" in out and "compose" in out and "FAIL" not in out


def test_unknown_command(capsys):
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err
