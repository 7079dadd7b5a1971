"""`svdkern train --method svd-adaptive`: SVD training with rank cuts (optimizer state
sliced, forms re-tuned), its epoch budget, report fields (train_seconds, latency_ms,
cuts), plots, --compile, its starting model (fresh, or --init decomposed), and kill -9
after a cut then resume."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TRAIN, kill_at, run_cli

from svdkern.__main__ import main
from svdkern.train import checkpoint, config
from svdkern.train.cli import _parse, build_train_parser

# Tiny synthetic data; a large cut ε so that cuts happen within a few epochs.
ADAPTIVE = ["--data", "synthetic", "--quiet", "--method", "svd-adaptive", "--no-baselines"]
ADAPTIVE += ["--dense-epochs", "4", "--finetune-epochs", "1", "--cut-every", "1"]
ADAPTIVE += ["--cut-energy", "0.2", "--strength", "0.3", "--tune-forms"]
TIMES = ("seconds", "train_seconds", "train_cpu_seconds", "step_ms")


def _run(*args: str) -> subprocess.CompletedProcess:
    return run_cli([*TRAIN, *args])


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _resolve(*argv: str) -> dict:
    return config.resolve(_parse(build_train_parser(), list(argv)))


def test_adaptive_defaults_epochs_add_up_to_the_dense_epochs():
    cfg = _resolve("--method", "svd-adaptive")
    assert cfg["svd_epochs"] + cfg["finetune_epochs"] == cfg["dense_epochs"] == 30
    assert cfg["compile"] is None and cfg["cut_energy"] == 0.1 and cfg["cut_every"] == 1
    assert not cfg["tune_forms"]  # digits: tuning costs more than it saves
    cifar = ["--method", "svd-adaptive", "--data", "cifar10", "--data-dir", "d"]
    assert _resolve(*cifar)["tune_forms"] and not _resolve("--data", "cifar10")["tune_forms"]
    cfg = _resolve("--method", "svd-adaptive", "--init", "x.pt", "--finetune-epochs", "4")
    assert cfg["svd_epochs"] == 26 and cfg["dense_epochs"] == 0  # the budget of dense training
    assert _resolve("--method", "svd-adaptive", "--svd-epochs", "7")["svd_epochs"] == 7
    assert not _resolve()["tune_forms"] and _resolve("--tune-forms")["tune_forms"]
    assert _resolve("--compile")["compile"] == "inductor"
    assert _resolve("--compile", "aot_eager")["compile"] == "aot_eager"


def test_adaptive_run_cuts_ranks_and_reports_times_and_latency(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *ADAPTIVE, "--out", str(run)]) == 0
    doc = json.loads((run / "report.json").read_text())
    models = doc["models"]
    assert set(models) == {"dense", "adaptive_svd", "adaptive", "compressed"}

    rows = _rows(run)
    assert [r["phase"] for r in rows] == ["dense"] * 4 + ["adaptive"] * 3 + ["adaptive_finetune"]
    adaptive = [r for r in rows if r["phase"] == "adaptive"]
    fractions = [r["rank_fraction"] for r in adaptive]
    assert fractions == sorted(fractions, reverse=True) and fractions[-1] < 1.0
    cuts = doc["prune"]["cuts"]
    assert [c["epoch"] for c in cuts] == [1, 2]  # not after the last SVD epoch
    assert cuts[-1]["ranks"] == adaptive[-1]["ranks"] == models["adaptive_svd"]["ranks"]
    assert all(
        models["adaptive"]["ranks"][k] <= v for k, v in models["adaptive_svd"]["ranks"].items()
    )

    seconds = doc["environment"]["phase_seconds"]
    assert set(seconds) == {"dense", "adaptive", "adaptive_finetune"}
    assert models["dense"]["train_seconds"] == pytest.approx(seconds["dense"])
    assert models["adaptive"]["train_seconds"] == pytest.approx(
        seconds["adaptive"] + seconds["adaptive_finetune"]
    )
    by_phase = {p: sum(r["train_seconds"] for r in rows if r["phase"] == p) for p in seconds}
    assert by_phase == pytest.approx(seconds)
    cpu = doc["environment"]["phase_cpu_seconds"]
    assert models["adaptive"]["train_cpu_seconds"] == pytest.approx(
        cpu["adaptive"] + cpu["adaptive_finetune"]
    )
    assert min(cpu.values()) > 0
    for name, m in models.items():
        assert set(m["latency_ms"]) == {"1", "160"} and min(m["latency_ms"].values()) > 0, name
    tuned = doc["prune"]["tuned_forms"]["adaptive"]
    assert len(tuned) == 3  # phase start and after each cut
    assert set(tuned[0]["forms"].values()) <= {"compose", "chain"}

    for png in ("ranks_over_epochs.png", "step_time.png", "ranks.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    md = (run / "report.md").read_text()
    assert "Training time and deployed latency" in md and "rank over epochs" in md


def test_adaptive_with_compile_trains(tmp_path, monkeypatch):
    from torch._dynamo.testing import CompileCounter

    # The requested backend reaches torch.compile, and the steps really run compiled
    # (frames counted by a backend that runs the captured graphs as they are).
    counter, backends, real_compile = CompileCounter(), [], torch.compile

    def counting_compile(model, *, backend="inductor", **kwargs):
        backends.append(backend)
        return real_compile(model, backend=counter, **kwargs)

    monkeypatch.setattr(torch, "compile", counting_compile)
    run = tmp_path / "run"
    args = [*ADAPTIVE, "--compile", "aot_eager", "--multiple-of", "4", "--no-tune-forms"]
    args += ["--dense-epochs", "3"]  # 2 SVD epochs, one cut: one recompile
    assert main(["train", *args, "--out", str(run)]) == 0
    assert backends and set(backends) == {"aot_eager"}
    assert counter.frame_count > 0
    doc = json.loads((run / "report.json").read_text())
    assert doc["config"]["compile"] == "aot_eager"
    assert all(r % 4 == 0 or r == 10 for c in doc["prune"]["cuts"] for r in c["ranks"].values())
    assert doc["models"]["adaptive"]["accuracy"] > 0.5


PHASES = ["dense", "adaptive", "adaptive_finetune"]


@pytest.mark.slow
def test_kill_9_after_a_cut_and_resume_ends_like_an_uninterrupted_run(tmp_path):
    args = [*ADAPTIVE, "--no-tune-forms"]  # measured forms could differ between the runs
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(["train", *args, "--out", str(full)]) == 0
    # kill -9 as soon as the first cut's epoch is checkpointed (so between the two cuts,
    # unless the kill comes late): the resume starts from the resized model on disk.
    state = kill_at([*TRAIN, *args, "--out", str(killed)], killed, PHASES, ("adaptive", 1))
    assert state["info"]["cuts"] and not (killed / "report.json").exists()
    resumed = _run("--resume", str(killed), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("adaptive_svd.pt", "adaptive.pt"):
        a, b = checkpoint.load(full / name)["model"], checkpoint.load(killed / name)["model"]
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMES} for r in rows]  # noqa: E731
    assert strip(_rows(full)) == strip(_rows(killed))


@pytest.mark.slow
def test_resume_applies_the_forms_in_force_instead_of_timing_again(tmp_path):
    run = tmp_path / "run"
    state = kill_at([*TRAIN, *ADAPTIVE, "--out", str(run)], run, PHASES, ("adaptive", 1))
    assert state["svd_training"]["memory_format"] in ("contiguous", "channels_last")
    assert any(state["svd_training"]["forms"].values())
    timed_before = state["info"]["tuned_forms"]["adaptive"]
    resumed = _run("--resume", str(run), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    # The adaptive phase times the forms at its start and after each cut, never at a resume:
    # the resumed run keeps the timings made before the kill and adds one per later cut.
    doc = json.loads((run / "report.json").read_text())
    timed = doc["prune"]["tuned_forms"]["adaptive"]
    cuts = [c for c in doc["prune"]["cuts"] if c["phase"] == "adaptive"]
    assert timed[: len(timed_before)] == timed_before and len(timed) == 1 + len(cuts)


def _adaptive_training(pipe, loop):
    """The SVDTraining of the pipeline's adaptive phase, on its starting model."""
    from svdkern.train.recipe import PHASES

    model = pipe.start_model("adaptive")
    opt = loop._make_optimizer(model.parameters(), pipe.cfg)
    return model, pipe._svd_training(model, opt, PHASES["adaptive"], 100, 10)


def test_every_process_applies_the_ranks_and_forms_process_0_decided(tmp_path, monkeypatch):
    """Under DDP a cut's ranks and the tuned forms/layout come from process 0: here this
    process is rank 1 of 2 and "process 0" (the patched broadcast) decided otherwise."""
    from svdkern import training
    from svdkern.nn import svd_layers
    from svdkern.train import loop
    from svdkern.tune import memory_format_of

    cfg = _resolve(*ADAPTIVE, "--out", str(tmp_path / "run"))
    pipe = loop.Pipeline(cfg, loop.Env(1, 2, torch.device("cpu")))
    model, st = _adaptive_training(pipe, loop)
    decided = {name: 1 for name, _ in svd_layers(model)}
    sources = []

    def broadcast(objects, src, group=None):
        sources.append(src)
        if isinstance(objects[0], dict):  # the cut's ranks
            objects[0] = dict(decided)
        else:  # [forms, memory format] after the cut's re-tuning
            objects[0] = [objects[0][0], "channels_last"]

    monkeypatch.setattr(training.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(training.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(training.dist, "broadcast_object_list", broadcast)
    cut = st.cut()
    assert cut.changed and sources == [0, 0]
    assert {name: m.rank for name, m in svd_layers(model)} == decided
    assert memory_format_of(model) == "channels_last"
    assert st.state_dict()["memory_format"] == "channels_last"


def test_cut_reports_the_macs_flops_counts_without_a_new_forward(tmp_path, monkeypatch):
    import svdkern
    from svdkern import training
    from svdkern.train import loop

    cfg = _resolve(*ADAPTIVE, "--no-tune-forms", "--out", str(tmp_path / "run"))
    pipe = loop.Pipeline(cfg, loop.Env(0, 1, torch.device("cpu")))
    model, st = _adaptive_training(pipe, loop)
    recorded = []
    layer_inputs = training.layer_inputs
    monkeypatch.setattr(
        training, "layer_inputs", lambda *a, **k: recorded.append(1) or layer_inputs(*a, **k)
    )
    for _ in range(2):  # the second cut reuses the shapes recorded by the first
        cut = st.cut()
        fl = svdkern.flops(model, example_inputs=(pipe.example,))
        assert cut.macs == fl.compressed_macs
        assert cut.flops_ratio == pytest.approx(fl.compressed_macs / fl.dense_macs)
    assert recorded == [1]


def test_adaptive_starts_from_a_fresh_svd_model_or_from_the_init_weights_decomposed(tmp_path):
    from svdkern.nn import svd_layers
    from svdkern.train import loop

    env = loop.Env(0, 1, torch.device("cpu"))
    pipe = loop.Pipeline(_resolve(*ADAPTIVE, "--out", str(tmp_path / "fresh")), env)
    fresh, skeleton = pipe.start_model("adaptive").state_dict(), pipe.skeleton(svd=True)
    assert all(torch.equal(fresh[k], v) for k, v in skeleton.state_dict().items())

    dense = pipe.skeleton(svd=False)
    with torch.no_grad():
        for p in dense.parameters():
            p.mul_(2.0)  # not the seeded init
    torch.save(dense.state_dict(), tmp_path / "init.pt")
    cfg = _resolve(*ADAPTIVE, "--init", str(tmp_path / "init.pt"), "--out", str(tmp_path / "run"))
    pipe = loop.Pipeline(cfg, env)
    pipe.dir.mkdir()
    pipe.finish_phase("dense", pipe.start_model("dense"))  # dense.pt: --init's weights
    model = pipe.start_model("adaptive")
    layers = svd_layers(model)
    assert [name for name, _ in layers] == ["fc1", "fc2"]
    for name, layer in layers:
        weight = dense.get_submodule(name).weight
        torch.testing.assert_close(layer.weight, weight, atol=1e-5, rtol=1e-5)


def test_orth_scale_amortizes_the_orthogonality_term(monkeypatch):
    import svdkern
    from svdkern import ops
    from svdkern.nn import SVDLinear

    model = torch.nn.Sequential(SVDLinear(6, 5), SVDLinear(5, 4))
    with torch.no_grad():
        model[0].U.mul_(1.5)
    reg = svdkern.SVDRegularizer(model, orth=0.5, sparsity="l1", strength=0.1)
    full = reg(model)
    scaled = reg(model, orth_scale=3.0)
    torch.testing.assert_close(scaled["total"], 1.5 * full["orth"] + 0.1 * full["sparsity"])
    calls = []
    monkeypatch.setattr(ops, "orth_loss", lambda mats: calls.append(mats))
    skipped = reg(model, orth_scale=0.0)
    assert calls == [] and skipped["orth"].item() == 0.0
    torch.testing.assert_close(skipped["total"], 0.1 * full["sparsity"])


def test_orth_every_trains(tmp_path):
    run = tmp_path / "run"
    args = [*ADAPTIVE, "--orth-every", "4", "--dense-epochs", "2", "--no-tune-forms"]
    assert main(["train", *args, "--out", str(run)]) == 0
    rows = [r for r in _rows(run) if r["phase"] == "adaptive"]
    assert json.loads((run / "report.json").read_text())["config"]["orth_every"] == 4
    assert rows and rows[0]["orth"] > 0  # the Gram steps' values, averaged over all steps


def test_svdkern_train_and_a_plain_loop_with_svd_training_give_the_same_ranks_and_losses(
    tmp_path,
):
    """The adaptive phase of `svdkern train` is SVDTraining in a loop: written out by hand
    on the same data order and seed, the loop makes the same cuts and losses."""
    import torch.nn.functional as F

    import svdkern
    from svdkern.train.data import load_dataset, steps_per_epoch, train_batches
    from svdkern.train.models import build_model
    from svdkern.train.recipe import phases_of

    args = [*ADAPTIVE, "--no-tune-forms", "--dense-epochs", "4", "--out", str(tmp_path / "run")]
    assert main(["train", *args]) == 0
    rows = [r for r in _rows(tmp_path / "run") if r["phase"] == "adaptive"]
    cfg = _resolve(*args)

    ds = load_dataset("synthetic")
    torch.manual_seed(cfg["seed"])
    model = svdkern.decompose(
        build_model(cfg["model"], ds.input_shape, ds.num_classes), skip=["fc"]
    )
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], foreach=True)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=cfg["gamma"])
    steps = steps_per_epoch(ds, cfg["batch_size"])
    epochs = cfg["svd_epochs"]
    st = svdkern.SVDTraining(
        model,
        opt,
        strength=cfg["strength"],
        cut_every=steps,
        cut_energy=cfg["cut_energy"],
        cut_until=epochs * steps,
        example_inputs=ds.example(),
    )
    phase = phases_of(cfg).index("adaptive")
    for epoch in range(epochs):
        losses = []
        for x, y in train_batches(ds, cfg["batch_size"], cfg["seed"], phase, epoch, "cpu", 0, 1):
            task = F.cross_entropy(model(x), y)
            loss = task + st.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            st.step()
            losses.append(task.item())
        sched.step()
        assert rows[epoch]["ranks"] == st.ranks
        assert rows[epoch]["task_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    doc = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [c["ranks"] for c in doc["prune"]["cuts"]] == [c.ranks for c in st.history]
    assert len(st.history) == epochs - 1
