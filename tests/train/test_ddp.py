"""`torchrun -m svdkern train` with 2 gloo processes on CPU equals a 1-process run with the
same global batch (each process takes half of every global batch; DDP averages gradients;
the SVD regularizer acts on the wrapped module's parameters)."""

from __future__ import annotations

import json
import socket
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import run_cli

from svdkern.__main__ import main
from svdkern.train import checkpoint

ARGS = ["--data", "synthetic", "--model", "mlp", "--quiet", "--batch-size", "32", "--seed", "3"]
ARGS += ["--dense-epochs", "2", "--svd-epochs", "2", "--finetune-epochs", "1", "--no-baselines"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_on_two_processes(args: list[str], out) -> None:
    """`svdkern train *args --out out` under torchrun with 2 gloo processes on this host."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"]
    launch += ["--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    launch += ["--master-port", str(_free_port())]
    done = run_cli([*launch, "-m", "svdkern", "train", *args, "--out", str(out)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_gloo_processes_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *ARGS, "--out", str(one)]) == 0

    _train_on_two_processes(ARGS, two)

    a = json.loads((one / "report.json").read_text())
    b = json.loads((two / "report.json").read_text())
    assert b["environment"]["processes"] == 2 and a["environment"]["processes"] == 1
    for name in ("dense", "svd"):
        sa = checkpoint.load(one / f"{name}.pt")["model"]
        sb = checkpoint.load(two / f"{name}.pt")["model"]
        for key in sa:
            torch.testing.assert_close(sb[key], sa[key], atol=2e-4, rtol=1e-3, msg=key)
        assert abs(a["models"][name]["accuracy"] - b["models"][name]["accuracy"]) <= 0.02
    assert a["models"]["pruned"]["ranks"] == b["models"]["pruned"]["ranks"]
    assert abs(a["models"]["pruned"]["accuracy"] - b["models"]["pruned"]["accuracy"]) <= 0.02
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 5  # rank 0 alone writes metrics


ADAPTIVE = ["--data", "synthetic", "--model", "mlp", "--quiet", "--batch-size", "32"]
ADAPTIVE += ["--method", "svd-adaptive", "--no-baselines", "--dense-epochs", "4"]
ADAPTIVE += ["--finetune-epochs", "1", "--cut-every", "1", "--cut-energy", "0.2"]
ADAPTIVE += ["--strength", "0.3", "--seed", "3", "--tune-forms"]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_adaptive_rank_cuts_under_two_gloo_processes_match_one_process(tmp_path):
    """Ranks are cut twice during SVD training (decided on process 0, applied everywhere,
    optimizer state sliced, DDP rebuilt); both runs end with the same ranks and weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *ADAPTIVE, "--out", str(one)]) == 0

    _train_on_two_processes(ADAPTIVE, two)

    a = json.loads((one / "report.json").read_text())
    b = json.loads((two / "report.json").read_text())
    assert b["environment"]["processes"] == 2
    assert len(a["prune"]["cuts"]) == 2
    assert [c["ranks"] for c in a["prune"]["cuts"]] == [c["ranks"] for c in b["prune"]["cuts"]]
    assert a["prune"]["cuts"][-1]["flops_ratio"] < 1.0
    for name in ("adaptive_svd", "adaptive"):
        assert a["models"][name]["ranks"] == b["models"][name]["ranks"]
        sa = checkpoint.load(one / f"{name}.pt")["model"]
        sb = checkpoint.load(two / f"{name}.pt")["model"]
        for key in sa:
            torch.testing.assert_close(sb[key], sa[key], atol=2e-4, rtol=1e-3, msg=key)
