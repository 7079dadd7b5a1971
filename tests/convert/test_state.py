"""svdkern.state: `load_state_dict` through the SVD layers' public protocol (`resize_`,
`forms` / `set_form` / `clear_forms`): a failed load leaves the fixed forms as they were,
a load that changes a rank forgets them, and a rank outside [1, full rank] is refused.
The round trips and the all-or-nothing checks of the weights are in test_convert.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import svdkern
from svdkern.nn import SVDLinear


def _model() -> nn.Sequential:
    return nn.Sequential(SVDLinear(8, 6), nn.ReLU(), SVDLinear(6, 4))


def _with_forms() -> nn.Sequential:
    model = _model()
    model[0].set_form((3, 8), chain=True)
    model[2].set_form((3, 6), chain=False, training=False)
    return model


def test_failed_load_leaves_the_fixed_forms_as_they_were():
    source = _model()
    source[0].prune_(2)
    state = source.state_dict()
    state["2.bias"] = torch.zeros(5)  # does not fit: nothing is loaded
    model = _with_forms()
    forms = [model[0].forms, model[2].forms]
    with pytest.raises(ValueError, match=r"nothing was loaded.*2\.bias"):
        svdkern.load_state_dict(model, state)
    assert [model[0].forms, model[2].forms] == forms and model[0].rank == 6


def test_load_that_changes_a_rank_forgets_that_layers_forms():
    source = _model()
    source[0].prune_(2)
    model = _with_forms()
    forms = model[2].forms
    svdkern.load_state_dict(model, source.state_dict())
    assert model[0].rank == 2 and model[0].forms == {}
    assert model[2].forms == forms
    assert model(torch.randn(3, 8)).shape == (3, 4)


@pytest.mark.parametrize("rank", [0, 7])
def test_a_checkpoint_rank_outside_one_to_full_rank_is_refused(rank):
    state = _model().state_dict()
    state["0.U"], state["0.s"], state["0.V"] = (
        torch.zeros(6, rank),
        torch.ones(rank),
        torch.zeros(8, rank),
    )
    model = _model()
    with pytest.raises(ValueError, match=rf"0\.s has rank {rank}.*\[1, 6\]"):
        svdkern.load_state_dict(model, state)
    assert model[0].rank == 6


def test_resize_keeps_requires_grad_dtype_and_checks_the_rank():
    layer = SVDLinear(8, 6, dtype=torch.float64)
    layer.s.requires_grad_(False)
    layer.set_form((2, 8), chain=True)
    assert layer.resize_(3) is layer
    assert (layer.U.shape, layer.s.shape, layer.V.shape) == ((6, 3), (3,), (8, 3))
    assert layer.U.dtype == torch.float64 and not layer.s.requires_grad and layer.V.requires_grad
    assert layer.forms == {}
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 6\]"):
        layer.resize_(7)
