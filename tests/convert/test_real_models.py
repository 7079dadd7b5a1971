"""GPT-2, BERT and Llama from transformers through the whole pipeline: decompose → one
training step with SVDRegularizer → prune(target_flops=0.5) → compress → torch.export →
save and reload with svdkern.load_state_dict.

The models are built from their config classes at tiny sizes (2 layers, hidden 64, vocab 128)
with random weights: nothing is downloaded (conftest.py also sets the hub's offline flags).
Dropout is 0 so that a training step on one batch can be checked to lower that batch's loss.
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import svdkern
from svdkern.nn import svd_layers

# The offline flags must be set before transformers is imported (it reads them once).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if os.environ.get("SVDKERN_REQUIRE_DEV"):
    # `make test` installed the dev dependencies (pyproject.toml): a missing one must fail.
    import transformers
else:
    # Elsewhere (e.g. a GPU machine without network) the module says why it does not run.
    transformers = pytest.importorskip(
        "transformers", reason="transformers is a dev dependency: pip install -e '.[dev]'"
    )

VOCAB, HIDDEN, HEADS, LAYERS, FFN, SEQ, BATCH = 128, 64, 4, 2, 128, 16, 2
TARGET = 0.5
# What FlopCounterMode may measure on the compressed model, as a fraction of the original's
# counted MACs: the target plus the slack the acceptance criterion allows.
MEASURED_BOUND = 0.52
# Decompose is an exact float64 SVD cast back to fp32: outputs agree to fp32 rounding.
EXACT_RTOL = 1e-5


def _gpt2(tied: bool = True, attn: str = "sdpa") -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
        tie_word_embeddings=tied,
        attn_implementation=attn,
    )
    return transformers.GPT2LMHeadModel(config)


def _bert(attn: str = "sdpa") -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=SEQ,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        attn_implementation=attn,
    )
    return transformers.BertForSequenceClassification(config)


def _llama(attn: str = "sdpa") -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS // 2,
        max_position_embeddings=SEQ,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
        tie_word_embeddings=False,
        attn_implementation=attn,
    )
    return transformers.LlamaForCausalLM(config)


# name → (builder, the tied LM head left dense or None). GPT-2 ties its LM head to the token
# embedding, which stays an nn.Embedding: that head is not decomposed (it must stay shared).
MODELS: dict[str, tuple[Callable[..., nn.Module], str | None]] = {
    "gpt2": (_gpt2, "lm_head"),
    "gpt2-untied": (lambda **kw: _gpt2(tied=False, **kw), None),
    "bert": (_bert, None),
    "llama": (_llama, None),
}


def _batch(name: str) -> tuple[tuple, dict, dict]:
    """(example args, example kwargs, training targets) of one batch for model `name`."""
    ids = torch.randint(1, VOCAB, (BATCH, SEQ))
    if name == "bert":
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[1, SEQ - 4 :] = 0  # padding in one row: the kwargs path must carry it
        return (ids,), {"attention_mask": mask}, {"labels": torch.tensor([0, 2])}
    return (ids,), {}, {"labels": ids}


def _build(name: str, **kw) -> nn.Module:
    return MODELS[name][0](**kw).eval()


def _projections(model: nn.Module) -> list[str]:
    """Qualified names of every Linear and GPT-2 Conv1D projection (LM head included)."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
    ]


def _logits(out) -> torch.Tensor:
    return out["logits"] if isinstance(out, dict) else out[0]


@torch.no_grad()
def _run(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    return _logits(model(*args, **kwargs))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _decompose(model: nn.Module) -> nn.Module:
    """decompose, its summary warning (checked by the decompose test) silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return svdkern.decompose(model)


def _train_step(model: nn.Module, name: str) -> tuple[float, float]:
    """One Adam step on one batch with the task loss + SVDRegularizer; (loss before, after)."""
    args, kwargs, targets = _batch(name)
    reg = svdkern.SVDRegularizer(model, orth=1.0, sparsity="hoyer", strength=1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def loss() -> torch.Tensor:
        return model(*args, **kwargs, **targets).loss + reg(model)["total"]

    before = loss()
    opt.zero_grad()
    before.backward()
    for layer_name, layer in svd_layers(model):
        for key in ("U", "s", "V"):
            grad = getattr(layer, key).grad
            assert grad is not None, f"{layer_name}.{key} got no gradient"
            assert torch.isfinite(grad).all(), f"{layer_name}.{key} has a non-finite gradient"
            assert grad.abs().sum() > 0, f"{layer_name}.{key} has an all-zero gradient"
    opt.step()
    with torch.no_grad():
        after = loss()
    model.eval()
    return float(before.detach()), float(after)


def _counted_macs(model: nn.Module, names: list[str], args: tuple, kwargs: dict) -> dict[str, int]:
    """MACs that torch.utils.flop_counter.FlopCounterMode measures inside each module of
    `names` (its children included) in one forward of `model`: flops / 2 per name.

    FlopCounterMode names a module "<root class>.<qualified name>"; a name it did not see
    maps to 0, so callers can tell a missing measurement from a cheap one.
    """
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*args, **kwargs)
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    return {n: sum(per_module.get(f"{root}.{n}", {}).values()) // 2 for n in names}


def _total_macs(model: nn.Module, args: tuple, kwargs: dict) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*args, **kwargs)
    return counter.get_total_flops() // 2


def _pruned_and_compressed(name: str):
    """The pipeline up to compress: (original, pruned SVD model, prune report, compressed,
    projection names, example args, example kwargs)."""
    args, kwargs, _ = _batch(name)
    original = _build(name)
    model = copy.deepcopy(original)
    names = _projections(model)
    model = _decompose(model)
    _train_step(model, name)
    report = svdkern.prune(model, target_flops=TARGET, example_inputs=args, example_kwargs=kwargs)
    compressed = svdkern.compress(model, example_inputs=args, example_kwargs=kwargs).eval()
    return original, model, report, compressed, names, args, kwargs


@pytest.mark.parametrize("name", list(MODELS))
def test_decompose_converts_every_projection_exactly(name):
    args, kwargs, _ = _batch(name)
    model = _build(name)
    expected = _run(model, args, kwargs)
    names = _projections(model)
    tied = MODELS[name][1]
    left = {p.name: p.reason for p in svdkern.plan(model).left}
    assert set(left) == ({tied} if tied else set()), f"plan leaves {left}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = svdkern.decompose(model)
    if tied is not None:
        assert any(tied in str(w.message) for w in caught), (
            f"decompose left the tied {tied!r} dense without naming it in a warning: "
            f"{[str(w.message) for w in caught]}"
        )
    converted = {layer_name for layer_name, _ in svd_layers(model)}
    wanted = {n for n in names if n != tied}
    assert converted == wanted, (
        f"not decomposed: {sorted(wanted - converted)}; unexpected: {sorted(converted - wanted)}"
    )
    assert _rel_err(_run(model, args, kwargs), expected) <= EXACT_RTOL


@pytest.mark.parametrize("name", list(MODELS))
def test_training_step_has_finite_gradients_and_lowers_the_loss(name):
    model = _decompose(_build(name))
    before, after = _train_step(model, name)
    assert after < before, f"loss {before:.6f} → {after:.6f} after one Adam step on its batch"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(MODELS))
def test_flops_report_agrees_with_flop_counter(name, attn):
    """The report of the decomposed model against FlopCounterMode on the original: the
    counted (dense) MACs equal what FlopCounterMode measures inside the projections, the
    attention matmuls are listed apart (QKᵀ and AV: 2·B·S²·hidden per layer, whatever the
    head count or the key/value heads), and the total is their sum. With eager attention
    (plain matmuls, which FlopCounterMode counts itself) the report's total is also
    FlopCounterMode's own total; the sdpa CPU kernel has no formula in torch, so there
    the difference is the report's attention line."""
    args, kwargs, _ = _batch(name)
    original = _build(name, attn=attn)
    names = _projections(original)
    measured = _counted_macs(original, names, args, kwargs)
    assert all(measured.values()), f"FlopCounterMode measured no MACs in {measured}"
    projections = sum(measured.values())
    attention = LAYERS * 2 * BATCH * SEQ * SEQ * HIDDEN
    model = _decompose(_build(name, attn=attn))
    report = svdkern.flops(model, example_inputs=args, example_kwargs=kwargs)
    assert report.dense_macs == pytest.approx(projections, rel=0.01), str(report)
    assert report.attention_macs == pytest.approx(attention, rel=0.01), str(report)
    assert report.total_macs == pytest.approx(report.svd_macs + attention, rel=0.01)
    assert report.total_macs == report.svd_macs + report.uncounted_macs
    if attn == "eager":
        dense = svdkern.flops(original, example_inputs=args, example_kwargs=kwargs)
        assert dense.total_macs == pytest.approx(_total_macs(original, args, kwargs), rel=0.01)


@pytest.mark.parametrize("name", list(MODELS))
def test_prune_to_half_the_flops_measured_by_flop_counter(name):
    """`prune(target_flops=0.5)` aims at half of the counted MACs: those of the layers svdkern
    counts and can cut, i.e. every Linear / Conv1D projection, LM head included (dense when
    tied). Not counted: the attention score and value matmuls, embeddings, norms and
    activations, which no rank cut changes. FlopCounterMode measures the MACs inside those
    same modules (by qualified name; on the compressed model each is a low-rank pair or a
    dense layer) independently of svdkern's cost formulas, and must find ≤ 52% of the
    original's."""
    original, model, report, compressed, names, args, kwargs = _pruned_and_compressed(name)
    assert report.flops_ratio <= TARGET
    before = _counted_macs(original, names, args, kwargs)
    after = _counted_macs(compressed, names, args, kwargs)
    assert all(before.values()) and all(after.values()), (
        f"FlopCounterMode saw no MACs in some counted layers: {before}, {after}"
    )
    ratio = sum(after.values()) / sum(before.values())
    assert ratio <= MEASURED_BOUND, f"compressed model keeps {ratio:.1%} of the counted MACs"
    # svdkern's prediction of the compressed model's cost is what it really costs.
    assert report.macs_after == pytest.approx(sum(after.values()), rel=0.01)
    assert report.dense_macs == pytest.approx(sum(before.values()), rel=0.01)
    assert _rel_err(_run(compressed, args, kwargs), _run(model, args, kwargs)) <= EXACT_RTOL


@pytest.mark.parametrize("name", list(MODELS))
def test_compressed_model_exports_and_matches(name):
    _, _, _, compressed, _, args, kwargs = _pruned_and_compressed(name)
    left = [n for n, m in compressed.named_modules() if type(m).__module__.startswith("svdkern")]
    assert not left, f"compress left svdkern modules (the model must run without it): {left}"
    program = torch.export.export(compressed, args, kwargs)
    got = _logits(program.module()(*args, **kwargs))
    assert _rel_err(got, _run(compressed, args, kwargs)) <= EXACT_RTOL


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_checkpoint_reloads_into_a_fresh_model(name):
    _, model, _, _, _, args, kwargs = _pruned_and_compressed(name)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _decompose(_build(name))  # other random weights, full ranks
    svdkern.load_state_dict(fresh, torch.load(buffer, weights_only=True))
    ranks = {n: layer.rank for n, layer in svd_layers(model)}
    assert {n: layer.rank for n, layer in svd_layers(fresh)} == ranks
    assert min(ranks.values()) < max(layer.full_rank for _, layer in svd_layers(model))
    torch.testing.assert_close(_run(fresh, args, kwargs), _run(model, args, kwargs))


def test_tie_weights_works_after_decompose_and_keeps_the_head_shared():
    args, kwargs, _ = _batch("gpt2")
    model = _build("gpt2")
    expected = _run(model, args, kwargs)
    model = _decompose(model)
    model.tie_weights()
    embedding = model.get_input_embeddings().weight
    assert model.lm_head.weight is embedding
    assert _rel_err(_run(model, args, kwargs), expected) <= EXACT_RTOL


def test_load_state_dict_round_trips_tied_gpt2_and_its_optimizer_after_a_rank_cut():
    args, kwargs, targets = _batch("gpt2")
    model = _decompose(_build("gpt2")).train()
    count = len(list(model.parameters()))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(m: nn.Module, o: torch.optim.Optimizer) -> None:
        o.zero_grad()
        m(*args, **kwargs, **targets).loss.backward()
        o.step()

    step(model, opt)
    svdkern.prune(model, ranks={"*": 8}, optimizer=opt)
    step(model, opt)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    fresh = _decompose(_build("gpt2")).train()  # other random weights, full ranks
    svdkern.load_state_dict(fresh, saved["model"])
    assert len(list(fresh.parameters())) == count
    assert fresh.lm_head.weight is fresh.get_input_embeddings().weight
    assert {n: lay.rank for n, lay in svd_layers(fresh)} == dict.fromkeys(
        (n for n, _ in svd_layers(model)), 8
    )
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    fresh_opt.load_state_dict(saved["opt"])
    step(model, opt)
    step(fresh, fresh_opt)
    expected = model.state_dict()
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
