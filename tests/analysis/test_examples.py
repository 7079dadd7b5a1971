"""svdkern.examples: the one check of the example inputs (`Example`: input_shape,
example_inputs, example_kwargs), and that every public verb takes them by the same
keywords, or as an `Example`, with the same errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import svdkern
from svdkern import tune
from svdkern.examples import Example, example_call
from svdkern.nn import SVDConv2d, SVDLinear

SHAPE = (2, 3, 8, 8)


def _cnn() -> nn.Module:
    return nn.Sequential(
        SVDConv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), SVDLinear(6 * 8 * 8, 4)
    )


def _tune_forms(model, **kw):
    return svdkern.tune_forms(model, repeats=1, use_cache=False, **kw)


# Every public verb that runs the model on an example, called with only the example keywords.
VERBS = {
    "flops": svdkern.flops,
    "prune": lambda model, **kw: svdkern.prune(model, energy=0.1, dry_run=True, **kw),
    "compress": svdkern.compress,
    "plan": svdkern.plan,
    "decompose": svdkern.decompose,
    "tune_forms": _tune_forms,
    "set_memory_format": lambda model, **kw: svdkern.set_memory_format(model, "contiguous", **kw),
}

BAD = [
    pytest.param(
        {"input_shape": SHAPE, "example_inputs": torch.zeros(SHAPE)},
        ValueError,
        "input_shape.*example_inputs.*not both",
        id="shape-and-inputs",
    ),
    pytest.param({"input_shape": (2, 3.5)}, ValueError, "input_shape must be", id="float-shape"),
    pytest.param({"input_shape": "2x3"}, ValueError, "input_shape must be", id="str-shape"),
    pytest.param({"input_shape": (2, -1)}, ValueError, "input_shape must be", id="negative"),
    pytest.param({"input_shape": [SHAPE, 3]}, ValueError, "input_shape must be", id="mixed-list"),
    pytest.param({"example_inputs": {"x": 1}}, TypeError, "example_inputs", id="dict-inputs"),
    pytest.param(
        {"example_inputs": torch.zeros(SHAPE), "example_kwargs": [1]},
        TypeError,
        "example_kwargs",
        id="list-kwargs",
    ),
    pytest.param({"example": (1, 2)}, TypeError, "example must be a svdkern.Example", id="ex"),
    pytest.param(
        {"example": Example(SHAPE), "input_shape": SHAPE},
        ValueError,
        "example or input_shape",
        id="example-and-shape",
    ),
]


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("kwargs, error, match", BAD)
def test_every_verb_rejects_bad_example_inputs_naming_the_argument(verb, kwargs, error, match):
    with pytest.raises(error, match=match):
        VERBS[verb](_cnn(), **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [p for p in BAD if "example" not in p.values[0]])
def test_example_raises_what_the_verbs_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        Example(**kwargs)


def test_example_needs_something():
    with pytest.raises(ValueError, match=r"pass input_shape .* or example_inputs"):
        Example()
    assert Example.of() is None


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_takes_the_same_example_by_shape_inputs_or_example(verb):
    state = _cnn().state_dict()
    results = []
    for kwargs in (
        {"input_shape": SHAPE},
        {"example_inputs": torch.randn(SHAPE)},
        {"example": Example(SHAPE)},
    ):
        model = _cnn()
        model.load_state_dict(state)
        results.append(_summary(VERBS[verb](model, **kwargs)))
    assert results[0] == results[1] == results[2]


def _summary(result) -> object:
    """What a verb's result says that does not depend on timing or on the input's values."""
    if isinstance(result, svdkern.FlopsReport):
        return result.dense_macs, result.compressed_macs, result.total_macs
    if isinstance(result, svdkern.PruneReport):
        return [(lay.name, lay.rank_after, lay.macs_after) for lay in result.layers]
    if isinstance(result, svdkern.TuneReport):
        return [(lay.name, lay.input_shape) for lay in result.layers]
    if isinstance(result, svdkern.DecomposeReport):
        return [(p.name, p.target) for p in result.layers]
    return [type(m).__name__ for m in result.modules()]


class _ReadsWeight(nn.Module):
    """The parent reads qkv.weight into F.linear: only an example forward shows it."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.linear(x, self.qkv.weight, self.qkv.bias))


@pytest.mark.parametrize(
    "kwargs",
    [{"input_shape": (2, 8)}, {"example_inputs": torch.randn(2, 8)}, {"example": Example((2, 8))}],
    ids=["shape", "inputs", "example"],
)
def test_plan_and_decompose_find_weight_reads_with_any_form_of_the_example(kwargs):
    assert [p.name for p in svdkern.plan(_ReadsWeight(), **kwargs).notes] == ["qkv"]
    with pytest.warns(svdkern.DecomposeWarning, match="qkv"):
        model = svdkern.decompose(_ReadsWeight(), **kwargs)
    assert model.qkv.weight_read is not None and model.out.weight_read is None


def test_flops_reports_the_shape_of_an_example_given_as_one():
    assert svdkern.flops(_cnn(), example=Example(SHAPE)).input_shape == SHAPE


def test_verbs_that_run_one_forward_refuse_several_shapes():
    shapes = [SHAPE, (4, *SHAPE[1:])]
    for verb in ("flops", "prune", "compress", "tune_forms"):
        with pytest.raises(ValueError, match=rf"input_shape: {verb}.* one .*got 2"):
            VERBS[verb](_cnn(), input_shape=shapes)


def test_compress_latency_takes_several_shapes_and_times_each(monkeypatch):
    timed = []

    def fake_times(models, examples, **kw):
        timed.append([tuple(args[0].shape) for args, _ in examples])
        return {name: [1.0] * len(examples) for name in models}

    monkeypatch.setattr(tune, "time_models", fake_times)
    shapes = [(1, 16), (8, 16)]
    svdkern.compress(nn.Sequential(SVDLinear(16, 16)), "latency", shapes)
    assert timed == [shapes]
    svdkern.clear_tune_cache()


def test_tune_forms_keeps_its_positional_batch_and_kwargs_dict():
    x = torch.randn(4, 12)

    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = SVDLinear(12, 6)

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.fc(x) * scale

    report = svdkern.tune_forms(Keyword(), x, repeats=1, example_kwargs={"scale": 2.0})
    assert [(lay.name, lay.input_shape) for lay in report.layers] == [("fc", (4, 12))]
    report = svdkern.tune_forms(Keyword(), example_kwargs={"x": x}, repeats=1)
    assert [lay.input_shape for lay in report.layers] == [(4, 12)]
    with pytest.raises(ValueError, match=r"tune_forms .* example_inputs .* or input_shape"):
        svdkern.tune_forms(Keyword())


def test_example_calls_build_inputs_like_the_models_first_parameter():
    model = _cnn().double()
    ((args, kwargs),) = Example(SHAPE, example_kwargs={"flag": True}).calls(model)
    assert args[0].dtype == torch.float64 and not args[0].any() and kwargs == {"flag": True}
    random = Example([SHAPE, (1, 3, 8, 8)]).calls(model, fill=torch.randn)
    assert [a[0].shape for a, _ in random] == [SHAPE, (1, 3, 8, 8)] and random[0][0][0].any()
    ids = torch.arange(6).reshape(2, 3)
    assert Example(example_inputs=ids).call(model) == ((ids,), {})
    assert example_call(model, example_kwargs={"ids": ids}) == ((), {"ids": ids})


@pytest.mark.parametrize(
    "example, match",
    [
        (Example((3, 8, 8)), r"input_shape=\(3, 8, 8\).*batch included"),
        (Example(example_inputs=torch.zeros(2, 5)), r"example_inputs / example_kwargs \(tensor"),
    ],
    ids=["shape", "inputs"],
)
def test_a_failing_example_forward_names_the_argument(example, match):
    with pytest.raises(ValueError, match=match):
        example.run(_cnn())
