"""`svdkern train --data text`: a GPT-2 byte-level language model through every method,
bits per byte in the report, `compare` and the plots, and the flags that do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from svdkern.__main__ import main
from svdkern.train import report

pytest.importorskip("transformers")

TINY = ["--data", "text", "--width", "32", "--layers", "1", "--heads", "2", "--seq-len", "16"]
TINY += ["--batch-size", "16", "--quiet", "--compress-policy", "flops"]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """A few small text files: this package's own sources, cut to ~3 kB each."""
    root = tmp_path_factory.mktemp("text")
    sources = sorted((Path(__file__).parents[2] / "svdkern").glob("*.py"))
    for i, src in enumerate(sources[:8]):
        (root / f"f{i}.py").write_bytes(src.read_bytes()[:3000])
    return root


def _models(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())["models"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, expected",
    [
        ("svd-adaptive", {"dense", "adaptive_svd", "adaptive", "compressed", "posthoc"}),
        ("svd", {"dense", "svd", "pruned", "compressed", "posthoc"}),
        ("trp", {"dense", "trp_trained", "trp", "compressed"}),
    ],
)
def test_every_method_trains_the_language_model_and_reports_bits_per_byte(
    tmp_path, text_dir, method, expected
):
    run = tmp_path / method
    epochs = ["--dense-epochs", "2", "--svd-epochs", "1", "--finetune-epochs", "1"]
    argv = ["train", *TINY, "--data-dir", str(text_dir), "--method", method, *epochs]
    assert main([*argv, "--out", str(run)]) == 0
    models = _models(run)
    assert set(models) == expected
    for name, m in models.items():
        # bits per byte = the validation cross-entropy in bits; a byte-level model starts
        # near 8 (uniform over 256) and must not be worse than that.
        assert m["bits_per_byte"] == pytest.approx(m["loss"] / 0.6931471805599453), name
        assert 0 < m["bits_per_byte"] < 8.5, name
    final = {"svd-adaptive": "adaptive", "svd": "pruned", "trp": "trp"}[method]
    assert models[final]["macs"] < models["dense"]["macs"]
    text = (run / "report.md").read_text()
    assert "| model | val bits/byte |" in text
    assert "Bits per byte right after pruning" in text
    assert "val bits/byte" in report.compare([str(run)], plot=str(tmp_path / "cmp.png"))
    assert (tmp_path / "cmp.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--data", "text", "--model", "cnn"], "--model: cnn does not fit --data text"),
        (["--model", "gpt2-tiny"], "--model: gpt2-tiny does not fit --data digits"),
        (["--data", "text", "--width", "30", "--heads", "4"], "--heads: the width 30"),
        (["--layers", "2"], "--layers: --model cnn takes no --layers"),
        (["--data", "synthetic", "--width", "8"], "--width: --model mlp takes no --width"),
    ],
)
def test_sizes_and_models_that_do_not_fit_the_data_are_refused(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv, "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_a_text_directory_without_text_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        main(["train", *TINY, "--data-dir", str(empty), "--out", str(tmp_path / "run")])
    assert "argument --data-dir" in capsys.readouterr().err
