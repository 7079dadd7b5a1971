"""Measurements of `svdkern train`'s models: test loss and accuracy, params and MACs as
deployed, ranks, singular-value spectra, and the forms `svdkern.compress` gave each layer."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import svdkern
from svdkern.nn import svd_layers
from svdkern.train.baselines import decomposable, weight_matrix
from svdkern.train.data import Dataset, bits_per_byte, eval_batches

__all__ = ["deployed_forms", "evaluate", "full_ranks", "measure", "ranks", "spectra"]


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, device: torch.device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy as a fraction) on the test set: per sample for a
    classifier, per predicted byte for a language model."""
    was = model.training
    model.eval()
    loss = correct = 0.0
    for x, y in eval_batches(ds, device):
        out = model(x)
        loss += F.cross_entropy(out.flatten(0, -2), y.flatten(), reduction="sum").item()
        correct += (out.argmax(-1) == y).sum().item()
    model.train(was)
    n = ds.y_test.numel()
    return loss / n, correct / n


def spectra(model: nn.Module, decomposition: str) -> dict[str, list[float]]:
    """Per layer, the singular values (|s| sorted descending) of every decomposed layer."""
    out = {}
    for name, m in svd_layers(model):
        out[name] = torch.sort(m.s.detach().abs().float().cpu(), descending=True).values.tolist()
    for name, m in decomposable(model):
        W = weight_matrix(m.weight.detach().double().cpu(), decomposition)
        out[name] = torch.linalg.svdvals(W).float().tolist()
    return out


def full_ranks(model: nn.Module, decomposition: str) -> dict[str, int]:
    """Per decomposed (or decomposable) layer, min(m, n) of its matrix view."""
    out = {name: m.full_rank for name, m in svd_layers(model)}
    for name, m in decomposable(model):
        out[name] = min(weight_matrix(m.weight, decomposition).shape)
    return out


def ranks(model: nn.Module, decomposition: str) -> dict[str, int]:
    """Per layer, its rank: r of an SVD layer, full rank of a dense one."""
    out = full_ranks(model, decomposition)
    out.update({name: m.rank for name, m in svd_layers(model)})
    return out


def measure(
    model: nn.Module, ds: Dataset, example: torch.Tensor, decomposition: str
) -> dict[str, Any]:
    """A model's entry in report.json: test accuracy and loss (and bits per byte of a
    language model), params and MACs per sample at `example` (each SVD layer in its cheaper
    form, as `svdkern.compress(policy="flops")` deploys it), ranks and full ranks."""
    loss, acc = evaluate(model, ds, example.device)
    fl = svdkern.flops(model, example_inputs=(example,))
    quality = {"bits_per_byte": bits_per_byte(loss)} if ds.task == "lm" else {}
    return {
        "accuracy": acc,
        "loss": loss,
        **quality,
        "params": fl.compressed_params,
        "macs": fl.compressed_macs,
        "ranks": ranks(model, decomposition),
        "full_ranks": full_ranks(model, decomposition),
    }


def deployed_forms(svd_model: nn.Module, deployed: nn.Module) -> dict[str, str]:
    """{SVD layer: "lowrank" or "dense"}: what `svdkern.compress` made of each layer (a
    low-rank pair is an nn.Sequential at the layer's name)."""
    forms = {}
    for name, _ in svd_layers(svd_model):
        try:
            plain = deployed.get_submodule(name)
        except AttributeError:  # inside an attention block deployed as nn.MultiheadAttention
            plain = None
        forms[name] = "lowrank" if isinstance(plain, nn.Sequential) else "dense"
    return forms
