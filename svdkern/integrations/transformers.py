"""SVD training inside transformers' `Trainer`, added with one callback.

    model = svdkern.decompose(GPT2LMHeadModel(config))
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    svd = add_svd_training(trainer, cut_every=50, cut_energy=0.1)
    trainer.train()            # penalty, rank cuts, ranks and MACs in the Trainer's logs
    deployable = svd.compressed

At the start of training the callback builds an `svdkern.SVDTraining` around the
Trainer's own model and optimizer (the torch optimizer inside accelerate's wrapper, so the
Trainer's scheduler keeps driving it). Before every optimizer step it adds the gradient of
`SVDTraining.penalty()` (the same update as adding the penalty to the loss, once per
optimizer step whatever the gradient accumulation; it is added after the Trainer's
gradient clipping, which bounds the task gradient only); after every optimizer step it
calls `SVDTraining.step()`, which cuts ranks with the optimizer state sliced. Its logs
add `svd_orth`, `svd_sparsity`, `svd_rank_fraction` and, after the first cut,
`svd_macs_ratio`; the end of training saves the compressed model to
`<output_dir>/svdkern_compressed.pt` (`torch.save` of the module, plain torch).

`add_svd_training` puts the callback first in the Trainer's list, so the reporting
integrations (TensorBoard, W&B, ...) that the Trainer adds before user callbacks see the
`svd_*` keys too; a callback passed in `Trainer(callbacks=[...])` adds them to the logs
that later callbacks and `trainer.state.log_history` see.

Every Trainer checkpoint also holds the SVDTraining's state (`svdkern_training.pt`: steps,
cuts, forms). To resume from one saved after a cut, name it to `add_svd_training` as well
as to `train`: the Trainer reloads its weights with `model.load_state_dict`, which needs
the model at the checkpoint's ranks, so `add_svd_training(trainer, ...,
resume_from_checkpoint=path)` first resizes the model's SVD layers to them (before the
Trainer builds its optimizer, whose saved state then loads), and the callback restores the
SVDTraining's state when training begins:

    svd = add_svd_training(trainer, cut_every=50, resume_from_checkpoint=path)
    trainer.train(resume_from_checkpoint=path)   # goes on as if never stopped
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from svdkern.nn import svd_layers
from svdkern.state import load_state_dict
from svdkern.train import checkpoint
from svdkern.training import SVDTraining

__all__ = ["COMPRESSED_FILE", "STATE_FILE", "SVDTrainingCallback", "add_svd_training"]

COMPRESSED_FILE = "svdkern_compressed.pt"
# The SVDTraining's state in every checkpoint folder the Trainer writes.
STATE_FILE = "svdkern_training.pt"


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's AcceleratedOptimizer (which delegates its
    state and param groups to it)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class SVDTrainingCallback(TrainerCallback):
    """Adds `svdkern.SVDTraining` to a transformers `Trainer`.

    Args:
        **svd_training: the arguments of `svdkern.SVDTraining` after model and optimizer
            (orth, sparsity, strength, cut_every, cut_energy, cut_until, multiple_of,
            min_rank, example_inputs, example_kwargs, ...). Steps are optimizer steps
            (`state.global_step`).
        compress_policy: the `svdkern.compress` policy of the model saved at the end
            ("flops" by default; None saves nothing).

    After training, `callback.training` is the SVDTraining (its `history` lists the
    cuts) and `callback.compressed` the deployable model.
    """

    def __init__(self, *, compress_policy: str | None = "flops", **svd_training: Any) -> None:
        bad = {"model", "optimizer"} & set(svd_training)
        if bad:
            raise TypeError(
                "SVDTrainingCallback takes the Trainer's own model and optimizer; drop "
                f"{sorted(bad)}"
            )
        self.kwargs = svd_training
        self.compress_policy = compress_policy
        self.training: SVDTraining | None = None
        self.compressed: torch.nn.Module | None = None
        # The SVDTraining state to restore when training begins (add_svd_training's
        # resume_from_checkpoint).
        self.resume_state: dict[str, Any] | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or not svd_layers(model):
            raise ValueError(
                "SVDTrainingCallback: the Trainer's model has no SVD layers; decompose it "
                "before building the Trainer: model = svdkern.decompose(model)"
            )
        if optimizer is None:
            raise ValueError("SVDTrainingCallback: the Trainer has no optimizer at train begin")
        self.training = SVDTraining(model, _torch_optimizer(optimizer), **self.kwargs)
        self.training.steps = state.global_step
        if self.resume_state is not None:
            if self.resume_state["steps"] != state.global_step:
                raise ValueError(
                    f"SVDTrainingCallback: the SVD training state to resume is of step "
                    f"{self.resume_state['steps']} but the Trainer resumes at step "
                    f"{state.global_step}: pass the same checkpoint to add_svd_training and "
                    "to trainer.train(resume_from_checkpoint=...)"
                )
            self.training.load_state_dict(self.resume_state)
            self.resume_state = None

    def on_save(self, args, state, control, **kwargs):
        if self.training is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            checkpoint.save_atomic(self.training.state_dict(), folder / STATE_FILE)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.training.penalty().backward()

    def on_step_end(self, args, state, control, **kwargs):
        cut = self.training.step()
        if cut is not None and cut.changed:
            # Log the new ranks at once rather than at the next logging step.
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.training is None:
            return
        st = self.training
        for key in ("orth", "sparsity"):
            if key in st.last_terms:
                logs[f"svd_{key}"] = float(st.last_terms[key].detach())
        full = sum(layer.full_rank for _, layer in svd_layers(st.model))
        logs["svd_rank_fraction"] = sum(st.ranks.values()) / full
        if st.history and st.history[-1].flops_ratio is not None:
            logs["svd_macs_ratio"] = st.history[-1].flops_ratio
        # The Trainer appends a copy of the logs to its history before the callbacks run.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update({k: v for k, v in logs.items() if k.startswith("svd_")})

    def on_train_end(self, args, state, control, **kwargs):
        if self.compress_policy is None or self.training is None:
            return
        self.compressed = self.training.compress(self.compress_policy)
        if args.output_dir and state.is_world_process_zero:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            checkpoint.save_atomic(self.compressed, Path(args.output_dir) / COMPRESSED_FILE)


def add_svd_training(
    trainer, *, resume_from_checkpoint: str | os.PathLike | bool | None = None, **kwargs: Any
) -> SVDTrainingCallback:
    """Add SVD training to `trainer` (a transformers `Trainer` whose model was decomposed):
    an `SVDTrainingCallback(**kwargs)` placed first among its callbacks. Returns it.

    resume_from_checkpoint: the checkpoint folder (or True: the last one in the Trainer's
        output_dir) that `trainer.train(resume_from_checkpoint=...)` will resume from: the
        model's SVD layers are resized to its ranks now, before the Trainer builds its
        optimizer and loads the weights, and the SVDTraining's state saved there is
        restored when training begins. Call it before `trainer.train`, once.
    """
    callback = SVDTrainingCallback(**kwargs)
    if resume_from_checkpoint not in (None, False):
        callback.resume_state = _resize_to_checkpoint(trainer, resume_from_checkpoint)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def _resize_to_checkpoint(trainer, path: str | os.PathLike | bool) -> dict[str, Any]:
    """Resize `trainer.model`'s SVD layers to the ranks of the Trainer checkpoint `path`
    (its weights loaded with `svdkern.load_state_dict`); returns the SVDTraining state
    saved there."""
    if path is True:
        path = get_last_checkpoint(trainer.args.output_dir)
        if path is None:
            raise ValueError(
                f"resume_from_checkpoint=True: no checkpoint folder in the Trainer's "
                f"output_dir {trainer.args.output_dir}"
            )
    folder = Path(path)
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise ValueError(
            f"resume_from_checkpoint: {folder} holds no {STATE_FILE} (it was not saved by a "
            "Trainer with SVD training); resume it without add_svd_training's "
            "resume_from_checkpoint"
        )
    safetensors, binary = folder / "model.safetensors", folder / "pytorch_model.bin"
    if safetensors.is_file():
        from safetensors.torch import load_file

        weights = load_file(str(safetensors))
    elif binary.is_file():
        weights = torch.load(binary, map_location="cpu", weights_only=True)
    else:
        raise ValueError(
            f"resume_from_checkpoint: {folder} holds neither model.safetensors nor "
            "pytorch_model.bin (a sharded checkpoint is not supported)"
        )
    # Tied weights are saved once: strict=False lets their other names fill from the tie.
    load_state_dict(trainer.model, weights, strict=False)
    return checkpoint.load(state_file)
