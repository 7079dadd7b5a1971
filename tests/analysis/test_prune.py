"""svdkern.prune: the energy rule exactly, target_flops by bisection within 2%, multiple_of,
the report, and argument errors."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import svdkern
from svdkern.nn import SVDConv2d, SVDLinear


def _expected_rank(s: torch.Tensor, eps: float) -> int:
    e = sorted((float(v) ** 2 for v in s), reverse=True)
    total = sum(e)
    acc = 0.0
    for k, v in enumerate(e, start=1):
        acc += v
        if acc >= (1 - eps) * total:
            return k
    return len(e)


def _layer_with(s_values) -> SVDLinear:
    layer = SVDLinear(len(s_values), len(s_values), dtype=torch.float64)
    with torch.no_grad():
        layer.s.copy_(torch.tensor(s_values, dtype=torch.float64))
    return layer


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.05, 0.3, 0.9, 0.999])
def test_energy_pruning_keeps_exactly_the_rule_k(eps):
    s = [3.0, -0.01, 1.5, 0.2, -2.0, 0.0, 0.7, 0.05]
    model = nn.Sequential(_layer_with(s), nn.ReLU(), _layer_with([1.0, 1.0, 1.0, 1.0]))
    svdkern.prune(model, energy=eps)
    k = _expected_rank(torch.tensor(s), eps)
    assert model[0].rank == k
    kept = sorted((abs(v) for v in model[0].s.tolist()), reverse=True)
    assert kept == sorted((abs(v) for v in s), reverse=True)[:k]
    assert model[2].rank == _expected_rank(torch.ones(4), eps)


def test_energy_boundary_is_inclusive():
    # s² = 9, 4, 1 (total 14): keeping 2 keeps exactly 13/14, so ε = 1/14 keeps k = 2
    layer = _layer_with([1.0, 3.0, 2.0])
    svdkern.prune(nn.Sequential(layer), energy=1 / 14)
    assert layer.rank == 2 and sorted(layer.s.tolist()) == [2.0, 3.0]


def test_all_zero_singular_values_keep_rank_one():
    layer = _layer_with([0.0, 0.0, 0.0])
    report = svdkern.prune(nn.Sequential(layer), energy=0.1)
    assert layer.rank == 1 and report.layers[0].energy_kept == 1.0


def test_multiple_of_rounds_up_and_caps_at_rank():
    model = nn.Sequential(SVDLinear(40, 40), SVDLinear(40, 6))
    with torch.no_grad():
        model[0].s.copy_(torch.logspace(0, -8, 40))
    svdkern.prune(model, energy=1e-3, multiple_of=8)
    assert model[0].rank == 8  # the rule gives 2, rounded up
    assert model[1].rank == 6  # rounded up to 8, capped at the layer's rank


def test_report_table_and_dict():
    model = nn.Sequential(SVDConv2d(3, 8, 3), nn.Flatten(), SVDLinear(8 * 16, 4))
    report = svdkern.prune(model, energy=0.2, input_shape=(1, 3, 6, 6))
    rows = {lay.name: lay for lay in report.layers}
    assert set(rows) == {"0", "2"}
    conv = rows["0"]
    assert conv.shape == (8, 3, 3, 3) and conv.rank_before == 8 and conv.rank_after == model[0].rank
    assert 0.8 <= conv.energy_kept <= 1.0
    assert conv.macs_before == 16 * 8 * 27 and conv.macs_after <= conv.macs_before
    text = str(report)
    assert "energy kept" in text and "8 → " in text and "total" in text
    data = report.to_dict()
    assert data["energy"] == 0.2 and data["layers"][1]["name"] == "2"
    assert data["flops_ratio"] == report.macs_after / report.dense_macs


def test_report_without_input_shape_has_no_conv_macs():
    model = nn.Sequential(SVDConv2d(3, 8, 3), nn.Flatten(), SVDLinear(8 * 16, 4))
    report = svdkern.prune(model, energy=0.2)
    assert report.layers[0].macs_before is None and report.macs_after is None
    assert "-" in str(report)


@functools.cache
def _wide_template() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for c_in, c_out in [(3, 32), (32, 48), (48, 48), (48, 64)]:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
    return svdkern.decompose(
        nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 8 * 8, 10)), "channel"
    )


def _wide_model() -> nn.Module:
    return copy.deepcopy(_wide_template())


@pytest.mark.parametrize("target", [0.2, 0.35, 0.5, 0.8])
def test_target_flops_lands_within_two_percent(target):
    model = _wide_model()
    shape = (1, 3, 8, 8)
    report = svdkern.prune(model, target_flops=target, input_shape=shape)
    achieved = svdkern.flops(model, shape).ratio
    assert achieved == pytest.approx(report.flops_ratio)
    assert target - 0.02 <= achieved <= target
    assert report.target_flops == target and 0 < report.energy < 1


def test_target_flops_with_multiple_of_meets_the_target():
    model = _wide_model()
    report = svdkern.prune(model, target_flops=0.4, input_shape=(1, 3, 8, 8), multiple_of=8)
    assert report.flops_ratio <= 0.4
    assert all(
        lay.rank_after % 8 == 0 or lay.rank_after == lay.rank_before for lay in report.layers
    )


def test_target_flops_of_one_prunes_only_what_costs_nothing():
    model = _wide_model()
    report = svdkern.prune(model, target_flops=1.0, input_shape=(1, 3, 8, 8))
    assert report.energy == 0.0


def test_unreachable_target_is_an_error():
    model = nn.Sequential(nn.Linear(50, 50), SVDLinear(50, 50))
    with pytest.raises(ValueError, match=r"target_flops=0\.1 cannot be reached"):
        svdkern.prune(model, target_flops=0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"energy": 1.0}, "energy", id="energy-1"),
        pytest.param({"energy": -0.1}, "energy", id="energy-negative"),
        pytest.param({"target_flops": 0.0}, "target_flops", id="target-0"),
        pytest.param({"target_flops": 1.5}, "target_flops", id="target-1.5"),
        pytest.param({}, "exactly one", id="neither"),
        pytest.param({"energy": 0.1, "target_flops": 0.5}, "exactly one", id="both"),
        pytest.param({"energy": 0.1, "multiple_of": 0}, "multiple_of", id="multiple-of"),
    ],
)
def test_prune_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        svdkern.prune(nn.Sequential(SVDLinear(4, 4)), **kwargs)


def test_target_flops_on_convs_needs_input_shape():
    with pytest.raises(ValueError, match="input_shape"):
        svdkern.prune(nn.Sequential(SVDConv2d(3, 4, 3)), target_flops=0.5)


def test_prune_is_exposed_at_top_level():
    assert callable(svdkern.prune) and svdkern.PruneReport.__name__ == "PruneReport"


def test_multiple_of_rounds_a_rule_rank_above_the_multiple_up():
    # s² = 1, 1, ..., 1 (10 ones) then tiny values: the rule keeps 10; multiple_of=8 gives 16,
    # not 8 (rounding down would drop energy the rule asked to keep).
    s = [1.0] * 10 + [1e-6] * 14
    layer = _layer_with(s)
    svdkern.prune(nn.Sequential(layer), energy=1e-3, multiple_of=8)
    assert _expected_rank(torch.tensor(s), 1e-3) == 10
    assert layer.rank == 16


# --- example inputs, per-layer ranks, min_rank, layers read through .weight ---------------


class _Blocks(nn.Module):
    """Token ids → embedding → two MLP blocks with a hand-written attention matmul → head."""

    def __init__(self, vocab=30, dim=24) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "qk": nn.Linear(dim, 2 * dim),
                    "fc1": nn.Linear(dim, 48),
                    "fc2": nn.Linear(48, dim),
                }
            )
            for _ in range(2)
        )
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = self.embed(ids) * scale
        for block in self.blocks:
            q, k = block["qk"](h).chunk(2, dim=-1)
            h = h + (q @ k.transpose(-2, -1)).softmax(-1) @ h
            h = h + block["fc2"](torch.relu(block["fc1"](h)))
        return self.head(h)


class _SwinPattern(nn.Module):
    """The parent reads qkv.weight into F.linear (torchvision Swin); proj/fc are called."""

    def __init__(self, dim=32) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        x = x + self.proj((q @ k.transpose(-2, -1)).softmax(-1) @ v)
        return x + self.out(torch.relu(self.fc(x)))


def _measured_counted_macs(model: nn.Module, names, *args, **kwargs) -> int:
    """FlopCounterMode's MACs inside the modules `names` of `model` (a pair of Linears
    after compress included), plus those of weights `model` reads (the Swin qkv)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(*args, **kwargs)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    inside = sum(sum(counts.get(f"{root}.{n}", {}).values()) for n in names)
    return inside // 2


def _trained_like(model: nn.Module) -> nn.Module:
    """Decomposed, with a decaying spectrum so that energy pruning has something to cut."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = svdkern.decompose(model)
    with torch.no_grad():
        for _, layer in svdkern.nn.svd_layers(model):
            layer.s.mul_(torch.logspace(0, -2, layer.rank, dtype=layer.s.dtype))
    return model


def test_target_flops_with_token_ids_holds_under_flop_counter():
    torch.manual_seed(0)
    dense = _Blocks()
    ids = torch.randint(0, 30, (2, 9))
    names = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear)]
    model = _trained_like(copy.deepcopy(dense))
    report = svdkern.prune(
        model, target_flops=0.5, example_inputs=(ids,), example_kwargs={"scale": 2.0}
    )
    assert 0.48 <= report.flops_ratio <= 0.5
    compressed = svdkern.compress(model, example_inputs=(ids,), example_kwargs={"scale": 2.0})
    before = _measured_counted_macs(dense, names, ids, scale=2.0)
    after = _measured_counted_macs(compressed, names, ids, scale=2.0)
    assert report.dense_macs == before and report.macs_after == after
    assert after / before <= 0.5


def test_target_flops_counts_a_layer_read_through_weight_as_a_fixed_cost():
    torch.manual_seed(0)
    dense = _SwinPattern()
    x = torch.randn(2, 10, 32)
    model = _trained_like(copy.deepcopy(dense))
    report = svdkern.prune(model, target_flops=0.5, example_inputs=x)
    qkv = next(lay for lay in report.layers if lay.name == "qkv")
    assert qkv.macs_before == qkv.macs_after == 2 * 10 * 32 * 96
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dense.eval()(x)
    counted_before = counter.get_total_flops() // 2 - 2 * 2 * 10 * 10 * 32  # minus attention
    assert report.dense_macs == counted_before
    compressed = svdkern.compress(model, example_inputs=x)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = compressed.eval()(x)
    counted_after = counter.get_total_flops() // 2 - 2 * 2 * 10 * 10 * 32
    assert report.macs_after == counted_after and counted_after <= 0.5 * counted_before
    assert out.shape == x.shape


def test_ranks_take_globs_exact_names_first():
    model = _trained_like(_Blocks())
    report = svdkern.prune(
        model, ranks={"blocks.0.fc1": 7, "blocks.*.fc*": 5, "blocks.*": 3, "head": 2}
    )
    ranks = {lay.name: lay.rank_after for lay in report.layers}
    assert ranks == {
        "blocks.0.qk": 3,
        "blocks.0.fc1": 7,
        "blocks.0.fc2": 5,
        "blocks.1.qk": 3,
        "blocks.1.fc1": 5,
        "blocks.1.fc2": 5,
        "head": 2,
    }
    assert model.blocks[0]["fc1"].rank == 7 and model.head.rank == 2


def test_ranks_glob_caps_at_each_layers_rank():
    model = nn.Sequential(SVDLinear(8, 3), SVDLinear(3, 8))
    svdkern.prune(model, ranks={"*": 5})
    assert model[0].rank == 3 and model[1].rank == 3


def test_ranks_glob_without_a_match_is_an_error():
    with pytest.raises(ValueError, match=r"not SVD layers.*'blocks\.\*\.nope'"):
        svdkern.prune(_trained_like(_Blocks()), ranks={"blocks.*.nope": 2})


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_prune_of_a_compiled_model_takes_the_models_own_names():
    model = _trained_like(_Blocks())
    compiled = torch.compile(model)
    report = svdkern.prune(compiled, ranks={"head": 2, "blocks.0.*": 3})
    ranks = {lay.name: lay.rank_after for lay in report.layers}
    assert ranks["head"] == 2 and ranks["blocks.0.fc1"] == 3 and model.head.rank == 2
    svdkern.prune(compiled, ranks={"_orig_mod.head": 1})  # the wrapper's names also work
    assert model.head.rank == 1
    again = svdkern.prune(compiled, ranks=dict.fromkeys(ranks, 1), dry_run=True)
    assert [lay.name for lay in again.layers] == list(ranks)


def test_min_rank_floors_the_energy_rule_capped_at_the_rank():
    model = nn.Sequential(_layer_with([3.0, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4]), _layer_with([1.0, 0.0]))
    svdkern.prune(model, energy=1e-3, min_rank=4)
    assert model[0].rank == 4 and model[1].rank == 2


def test_min_rank_applies_to_target_flops():
    model = _trained_like(_Blocks())
    ids = torch.randint(0, 30, (2, 9))
    report = svdkern.prune(model, target_flops=0.6, example_inputs=ids, min_rank=6)
    assert all(lay.rank_after >= 6 for lay in report.layers)
    assert report.flops_ratio <= 0.6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"energy": 0.1, "min_rank": 0}, "min_rank", id="min-rank-0"),
        pytest.param({"ranks": {"0": 2}, "min_rank": 2}, "min_rank", id="min-rank-with-ranks"),
        pytest.param({"ranks": {"0": 0}}, r"ranks\['0'\]", id="rank-0"),
    ],
)
def test_prune_rejects_bad_per_layer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        svdkern.prune(nn.Sequential(SVDLinear(4, 4)), **kwargs)


def test_target_flops_with_a_wrong_input_shape_names_input_shape():
    model = nn.Sequential(SVDConv2d(3, 4, 3), nn.Flatten(), SVDLinear(4 * 4 * 4, 2))
    with pytest.raises(ValueError, match=r"input_shape=\(3, 6, 6\)"):
        svdkern.prune(model, target_flops=0.5, input_shape=(3, 6, 6))


def _model_with_bad_s(value: float) -> nn.Module:
    model = nn.Sequential(
        SVDLinear(6, 5, dtype=torch.float64), SVDLinear(5, 4, dtype=torch.float64)
    )
    with torch.no_grad():
        model[1].s[2] = value
    return model


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"energy": 0.1},
        {"energy": 0.0},
        {"target_flops": 0.5},
        {"ranks": {"1": 2}},
        {"ranks": {"*": 1}},
    ],
    ids=["energy", "energy-0", "target_flops", "ranks-name", "ranks-glob"],
)
def test_non_finite_singular_values_raise_naming_the_layer(value, kwargs):
    model = _model_with_bad_s(value)
    ranks = [model[0].rank, model[1].rank]
    with pytest.raises(ValueError, match=r"SVD layer\(s\) '1' .*not finite.*check the training"):
        svdkern.prune(model, **kwargs)
    assert [model[0].rank, model[1].rank] == ranks


def test_ranks_that_leave_a_non_finite_layer_uncut_still_prune_the_others():
    model = _model_with_bad_s(float("nan"))
    report = svdkern.prune(model, ranks={"0": 2})
    assert model[0].rank == 2 and model[1].rank == 4
    assert report.layers[1].energy_kept == 1.0
