"""svdkern.SVDTraining in a plain loop and in transformers' Trainer: the penalty, the cut
schedule, sliced optimizer state, exact resume from state_dict(), and one clear error per
bad argument."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svdkern
from svdkern.nn import svd_layers

transformers = pytest.importorskip("transformers")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 5)
    )
    return svdkern.decompose(model, skip=["4"])


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 24, generator=g), torch.randint(0, 5, (32,), generator=g))] * n


def _loop(model, opt, st, batches) -> list[float]:
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y) + st.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        st.step()
        losses.append(loss.item())
    return losses


def _make(model=None, **kwargs):
    model = _mlp() if model is None else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    kwargs.setdefault("cut_every", 4)
    kwargs.setdefault("cut_energy", 0.1)
    st = svdkern.SVDTraining(model, opt, example_inputs=torch.zeros(1, 24), **kwargs)
    return model, opt, st


def test_cuts_run_every_cut_every_steps_and_record_ranks_and_macs():
    model, opt, st = _make(cut_until=14)
    _loop(model, opt, st, _batches(16))
    assert [c.step for c in st.history] == [4, 8, 12]
    for cut in st.history:
        assert all(cut.ranks[n] <= r for n, r in cut.ranks_before.items())
        assert 0 < cut.flops_ratio <= 1
    assert st.history[0].changed
    assert st.ranks == st.history[-1].ranks
    # The optimizer trains the cut parameters, with their state sliced to the new shapes.
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    for _, layer in svd_layers(model):
        assert id(layer.s) in held
        assert opt.state[layer.s]["exp_avg"].shape == layer.s.shape


def test_penalty_is_the_regularizers_total_and_orth_every_amortizes():
    model, _opt, st = _make(cut_every=None, orth=1.0, sparsity="hoyer", strength=0.1)
    reg = svdkern.SVDRegularizer(model, orth=1.0, sparsity="hoyer", strength=0.1)
    torch.testing.assert_close(st.penalty(), reg()["total"])
    _, _, st3 = _make(model=_mlp(), cut_every=None, orth_every=3)
    scales = []
    for _ in range(6):
        st3.penalty()
        scales.append(st3.last_terms["orth"].item() > 0)
    assert scales == [True, False, False, True, False, False]


def test_resume_from_state_dict_is_bit_identical():
    batches = _batches(12)
    model, opt, st = _make()
    _loop(model, opt, st, batches[:6])  # one cut (step 4), killed between cuts
    saved = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "st": st.state_dict()}
    )
    _loop(model, opt, st, batches[6:])

    fresh = _mlp()
    svdkern.load_state_dict(fresh, saved["model"])
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    st2 = svdkern.SVDTraining(
        fresh, opt2, cut_every=4, cut_energy=0.1, example_inputs=torch.zeros(1, 24)
    )
    st2.load_state_dict(saved["st"])
    _loop(fresh, opt2, st2, batches[6:])
    assert [c.to_dict() for c in st2.history] == [c.to_dict() for c in st.history]
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k


def test_load_state_dict_refuses_a_model_at_other_ranks():
    model, opt, st = _make()
    _loop(model, opt, st, _batches(4))
    _, _, other = _make()
    with pytest.raises(ValueError, match=r"svdkern.load_state_dict\(model, state_dict\) first"):
        other.load_state_dict(st.state_dict())
    with pytest.raises(ValueError, match=r"SVDTraining\.state_dict"):
        other.load_state_dict({"steps": 3})


def test_a_cut_between_backward_and_step_keeps_the_gradients():
    model, opt, st = _make(cut_every=1)
    x, y = _batches(1)[0]
    for _ in range(3):
        (F.cross_entropy(model(x), y) + st.penalty()).backward()
        opt.step()
        opt.zero_grad()
    (F.cross_entropy(model(x), y) + st.penalty()).backward()
    st.cut()
    for _, layer in svd_layers(model):
        assert layer.s.grad is not None and layer.s.grad.shape == layer.s.shape


def test_compress_gives_a_plain_model_with_the_same_outputs():
    model, opt, st = _make()
    _loop(model, opt, st, _batches(8))
    model.eval()
    deployed = st.compress()
    assert not any(isinstance(m, svdkern.nn.SVDLayer) for m in deployed.modules())
    x = torch.randn(7, 24)
    torch.testing.assert_close(deployed(x), model(x), atol=1e-5, rtol=1e-4)


def test_wrapped_models_are_cut_through_their_wrapper():
    model = _mlp()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    st = svdkern.SVDTraining(compiled, opt, cut_every=1, cut_energy=0.5)
    assert st.model is model
    x, y = _batches(1)[0]
    F.cross_entropy(compiled(x), y).backward()
    opt.step()
    st.step()
    assert sum(st.ranks.values()) < sum(layer.full_rank for _, layer in svd_layers(model))
    compiled(x)  # the compiled wrapper runs the cut model


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"cut_energy": 1.0}, ValueError, r"cut_energy .*1 would cut every singular value"),
        ({"cut_energy": 0.0}, ValueError, "cut_energy"),
        ({"cut_every": 0}, ValueError, "cut_every must be a positive int"),
        ({"orth_every": -1}, ValueError, "orth_every"),
        ({"tune_forms": True}, ValueError, "tune_inputs"),
        ({"example_inputs": "x"}, TypeError, "example_inputs"),
        ({"sparsity": "l2"}, ValueError, "sparsity"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, error, match):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(error, match=match):
        svdkern.SVDTraining(model, opt, **kwargs)


def test_an_optimizer_without_the_svd_parameters_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before decompose
    svdkern.decompose(model)
    with pytest.raises(ValueError, match=r"optimizer does not hold the SVD parameters.*0\.U"):
        svdkern.SVDTraining(model, opt)
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        svdkern.SVDTraining(model, "adam")


def test_a_model_without_svd_layers_is_refused():
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"model has no SVD layers.*svdkern.decompose"):
        svdkern.SVDTraining(model, torch.optim.SGD(model.parameters(), lr=0.1))


# --- transformers' Trainer ----------------------------------------------------------------


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    with pytest.warns(svdkern.DecomposeWarning):  # lm_head stays dense: tied to wte
        return svdkern.decompose(transformers.GPT2LMHeadModel(config))


def _lm_data(n: int = 32) -> torch.Tensor:
    return torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(2))


def _trainer(model, ids, out, callback, steps_per_log=2, **arguments):
    from torch.utils.data import SequentialSampler

    class InOrder(transformers.Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    args = transformers.TrainingArguments(
        str(out),
        per_device_train_batch_size=8,
        num_train_epochs=2,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=steps_per_log,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    args = dataclasses.replace(args, **arguments)
    data = [{"input_ids": x, "labels": x} for x in ids]
    callbacks = [] if callback is None else [callback]
    trainer = InOrder(model=model, args=args, train_dataset=data, callbacks=callbacks)
    # The model's own mean loss over the shifted labels, as the plain loop takes it (not
    # the Trainer's sum over the batch's unshifted label count).
    trainer.model_accepts_loss_kwargs = False
    return trainer


def test_trainer_callback_matches_the_plain_loop(tmp_path):
    from svdkern.integrations.transformers import COMPRESSED_FILE, SVDTrainingCallback

    ids = _lm_data()
    kwargs = {"cut_every": 2, "cut_energy": 0.2, "example_kwargs": {"input_ids": ids[:1]}}
    callback = SVDTrainingCallback(**kwargs)
    trainer = _trainer(_gpt2(), ids, tmp_path, callback)
    trainer.train()
    trained = callback.training

    model = _gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    st = svdkern.SVDTraining(model, opt, **kwargs)
    losses = []
    for _ in range(2):
        for i in range(0, len(ids), 8):
            x = ids[i : i + 8]
            task = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            (task + st.penalty()).backward()
            opt.step()
            st.step()
            losses.append(task.item())

    assert [c.ranks for c in trained.history] == [c.ranks for c in st.history]
    assert [c.step for c in trained.history] == [2, 4, 6, 8]
    logged = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    # The Trainer logs the mean task loss over each logging window of 2 steps.
    expected = [sum(losses[i : i + 2]) / 2 for i in range(0, len(losses), 2)]
    assert logged == pytest.approx(expected, rel=1e-4)
    rows = [row for row in trainer.state.log_history if "svd_rank_fraction" in row]
    assert rows and rows[-1]["svd_rank_fraction"] < 1
    assert rows[-1]["svd_macs_ratio"] == pytest.approx(st.history[-1].flops_ratio)
    deployed = torch.load(tmp_path / COMPRESSED_FILE, weights_only=False)
    assert not any(isinstance(m, svdkern.nn.SVDLayer) for m in deployed.modules())
    model.eval()
    deployed.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            deployed(input_ids=ids[:2]).logits,
            model(input_ids=ids[:2]).logits,
            atol=1e-4,
            rtol=1e-4,
        )


def test_a_trainer_run_resumed_after_a_cut_goes_on_as_if_never_stopped(tmp_path):
    from svdkern.integrations.transformers import STATE_FILE, add_svd_training

    ids = _lm_data()
    kwargs = {"cut_every": 2, "cut_energy": 0.2, "example_kwargs": {"input_ids": ids[:1]}}
    saving = {"save_strategy": "steps", "save_steps": 5}

    whole = _trainer(_gpt2(), ids, tmp_path / "whole", None, **saving)
    whole_svd = add_svd_training(whole, **kwargs)
    whole.train()
    # A checkpoint after the cuts of steps 2 and 4, which changed the ranks.
    saved = tmp_path / "whole" / "checkpoint-5"
    assert (saved / STATE_FILE).is_file()
    assert whole_svd.training.history[1].changed

    resumed = _trainer(_gpt2(), ids, tmp_path / "resumed", None, **saving)
    with pytest.raises(RuntimeError, match="size mismatch"):
        # The Trainer alone cannot load the cut weights into the fresh, full-rank model.
        resumed.train(resume_from_checkpoint=str(saved))
    resumed = _trainer(_gpt2(), ids, tmp_path / "resumed", None, **saving)
    resumed_svd = add_svd_training(resumed, resume_from_checkpoint=saved, **kwargs)
    resumed.train(resume_from_checkpoint=str(saved))

    assert [c.to_dict() for c in resumed_svd.training.history] == [
        c.to_dict() for c in whole_svd.training.history
    ]
    final, again = whole.model.state_dict(), resumed.model.state_dict()
    assert final.keys() == again.keys()
    for key in final:
        torch.testing.assert_close(again[key], final[key], rtol=0, atol=0, msg=key)


def test_resume_from_a_checkpoint_without_svd_state_is_refused(tmp_path):
    from svdkern.integrations.transformers import add_svd_training

    trainer = _trainer(_gpt2(), _lm_data(8), tmp_path, None)
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(ValueError, match=r"holds no svdkern_training\.pt"):
        add_svd_training(trainer, resume_from_checkpoint=tmp_path / "checkpoint-3")
    with pytest.raises(ValueError, match="no checkpoint folder"):
        add_svd_training(
            _trainer(_gpt2(), _lm_data(8), tmp_path / "new", None), resume_from_checkpoint=True
        )


def test_add_svd_training_puts_the_callback_first(tmp_path):
    from svdkern.integrations.transformers import SVDTrainingCallback, add_svd_training

    trainer = _trainer(_gpt2(), _lm_data(8), tmp_path, transformers.TrainerCallback())
    callback = add_svd_training(trainer, cut_every=1)
    assert isinstance(callback, SVDTrainingCallback)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    assert [c.step for c in callback.training.history] == [1, 2]


def test_trainer_with_a_model_that_was_not_decomposed_is_refused(tmp_path):
    from svdkern.integrations.transformers import SVDTrainingCallback

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    trainer = _trainer(
        transformers.GPT2LMHeadModel(config), _lm_data(8), tmp_path, SVDTrainingCallback()
    )
    with pytest.raises(ValueError, match="no SVD layers; decompose it before building"):
        trainer.train()


def test_trainer_callback_takes_the_trainers_own_model_and_optimizer():
    from svdkern.integrations.transformers import SVDTrainingCallback

    with pytest.raises(TypeError, match=r"drop \['optimizer'\]"):
        SVDTrainingCallback(optimizer=None)


def test_load_state_dict_applies_the_saved_forms_and_memory_format():
    from svdkern.train.models import build_model
    from svdkern.tune import memory_format_of

    model = svdkern.decompose(build_model("cnn", (1, 8, 8), 10), skip=["fc"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    st = svdkern.SVDTraining(model, opt)
    name, layer = svd_layers(model)[0]
    state = st.state_dict()
    state["forms"][name] = [[True, [4, 1, 8, 8], True]]
    state["memory_format"] = "channels_last"
    st.load_state_dict(state)
    assert layer.forms == {(True, (4, 1, 8, 8)): True}
    assert memory_format_of(model) == "channels_last"
    assert st.state_dict()["forms"][name] == [[True, [4, 1, 8, 8], True]]
