"""decompose on the layer kinds and model patterns real models use: Conv1d, transformers-style
Conv1D, nn.MultiheadAttention, skip by glob/type, tied and frozen parameters, Lazy modules,
hooks, and layers whose weight the parent reads directly (then compress and export)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import svdkern
from svdkern.nn import SVDConv1d, SVDConv2d, SVDLayer, SVDLinear, SVDMultiheadAttention


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _close(actual, expected, rtol=1e-10):
    assert (actual - expected).abs().max() <= rtol * expected.abs().max()


def _decompose_quietly(model, *args, **kwargs):
    """decompose, returning (result, the DecomposeWarnings it emitted)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = svdkern.decompose(model, *args, **kwargs)
    return out, [w.message for w in caught if issubclass(w.category, svdkern.DecomposeWarning)]


class Conv1D(nn.Module):
    """The transposed-weight Linear of transformers' GPT-2 (y = x·W + b, W (nx, nf))."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(
            *x.shape[:-1], self.nf
        )


class Mixed(nn.Module):
    """Every convertible dense kind: Conv2d, Conv1d, Conv1D, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1 = nn.Conv1d(6, 5, 3, stride=2, padding=1)
        self.c_fc = Conv1D(7, 5)
        self.head = nn.Linear(7, 4)

    def forward(self, x):
        y = F.relu(self.conv2(x)).flatten(2)  # (N, 6, H·W)
        y = F.relu(self.conv1(y)).transpose(1, 2)  # (N, L, 5)
        return self.head(F.gelu(self.c_fc(y)))


def test_decompose_converts_every_dense_kind_exactly_and_quietly():
    model = Mixed().double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    expected = model(x)
    out, warned = _decompose_quietly(model)
    assert out is model and not warned
    assert isinstance(model.conv2, SVDConv2d) and isinstance(model.conv1, SVDConv1d)
    assert isinstance(model.c_fc, SVDLinear) and isinstance(model.head, SVDLinear)
    assert (model.c_fc.in_features, model.c_fc.out_features) == (5, 7)
    _close(model(x), expected)


def test_plan_lists_what_decompose_does_without_changing_the_model():
    model = Mixed()
    report = svdkern.plan(model, skip=["head"])
    assert type(model.head) is nn.Linear and type(model.conv1) is nn.Conv1d
    targets = {p.name: p.target for p in report.layers}
    assert targets == {
        "conv2": "SVDConv2d/channel",
        "conv1": "SVDConv1d",
        "c_fc": "SVDLinear",
        "head": None,
    }
    assert [p.name for p in report.left] == ["head"] and report.left[0].skipped
    assert "head" in str(report) and "SVDConv1d" in str(report)


class LinearSubclass(nn.Linear):
    pass


def _odd_layers() -> nn.ModuleDict:
    parametrized = nn.Linear(4, 4)
    nn.utils.parametrize.register_parametrization(parametrized, "weight", nn.Identity())
    return nn.ModuleDict(
        {
            "grouped": nn.Conv2d(4, 4, 3, groups=2),
            "reflect": nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect"),
            "subclass": LinearSubclass(4, 4),
            "transposed": nn.ConvTranspose2d(4, 4, 3),
            "conv3d": nn.Conv3d(4, 4, 1),
            "normed": nn.utils.weight_norm(nn.Linear(4, 4)),
            "parametrized": parametrized,
            "plain": nn.Linear(4, 4),
        }
    )


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_layers_left_dense_are_listed_with_their_reason_in_one_warning():
    model = _odd_layers()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        svdkern.decompose(model)
    ours = [w.message for w in caught if issubclass(w.category, svdkern.DecomposeWarning)]
    assert len(ours) == 1
    reasons = {p.name: p.reason for p in ours[0].report.left}
    assert set(reasons) == set(model.keys()) - {"plain"}
    assert "groups=2" in reasons["grouped"] and "reflect" in reasons["reflect"]
    assert "subclass" in reasons["subclass"] and "ConvTranspose2d" in reasons["transposed"]
    assert "Conv3d" in reasons["conv3d"] and "WeightNorm" in reasons["normed"]
    assert "parametriz" in reasons["parametrized"]
    text = str(ours[0])
    assert all(name in text for name in reasons)
    assert isinstance(model["plain"], SVDLinear) and type(model["subclass"]) is LinearSubclass


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.emb_proj = nn.Conv1d(8, 8, 1)

    def forward(self, x):
        return self.mlp(self.attn(x))


def _blocks() -> nn.Sequential:
    return nn.Sequential(Block(), Block())


def test_skip_by_glob_type_name_and_predicate_mixed():
    model = _blocks()
    skip = ["*.attn.*", nn.Conv1d, "1.mlp", lambda name, m: name == "0.mlp.2"]
    report = svdkern.plan(model, skip=skip)
    left = {p.name for p in report.left}
    assert left == {
        "0.attn.0",
        "0.attn.2",
        "1.attn.0",
        "1.attn.2",
        "0.emb_proj",
        "1.emb_proj",
        "1.mlp.0",
        "1.mlp.2",
        "0.mlp.2",
    }
    assert all(p.skipped for p in report.left)
    _, warned = _decompose_quietly(model, skip=skip)
    assert not warned, "layers the user skipped alone raise no warning"
    assert type(model[0].attn[0]) is nn.Linear and type(model[1].emb_proj) is nn.Conv1d
    assert isinstance(model[0].mlp[0], SVDLinear)


def test_skip_glob_on_a_container_skips_what_is_under_it():
    model = _blocks()
    svdkern.decompose(model, skip="*.attn")
    assert type(model[1].attn[2]) is nn.Linear and isinstance(model[1].mlp[2], SVDLinear)


def test_skip_unknown_plain_name_or_unmatched_glob_raises():
    with pytest.raises(ValueError, match=r"skip.*\['0.atn'\]"):
        svdkern.decompose(_blocks(), skip=["0.atn"])
    with pytest.raises(TypeError, match="skip entries"):
        svdkern.decompose(_blocks(), skip=[3])
    with pytest.raises(ValueError, match=r"\['\*\.nothing_here'\]"):
        svdkern.decompose(_blocks(), skip=["*.nothing_here"])


def test_module_shared_with_a_skipped_place_stays_dense_everywhere():
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    report = svdkern.plan(model, skip=["b"])
    assert report.left[0].skipped and "shared with 'b.0'" in report.left[0].reason
    svdkern.decompose(model, skip=["b"])
    assert model["a"][0] is model["b"][0] is shared


def test_linears_sharing_one_parameter_stay_dense_and_tied():
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Linear(6, 3))
    model[2].weight = model[0].weight
    with pytest.warns(svdkern.DecomposeWarning, match="tied") as record:
        svdkern.decompose(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert model[2].weight is model[0].weight
    assert isinstance(model[3], SVDLinear)
    left = {p.name: p.reason for p in record[0].message.report.left}
    assert "'2.weight'" in left["0"] and "'0.weight'" in left["2"]


class TinyLM(nn.Module):
    """Embedding → Linear block → LM head, optionally tied like transformers' tie_weights."""

    def __init__(self, tied: bool, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.tie_weights()

    def tie_weights(self) -> None:
        # What transformers' _tie_or_clone_weights does.
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.block(self.embed(ids))))


def test_lm_head_tied_to_embedding_stays_dense_and_tie_weights_still_works():
    model = TinyLM(tied=True).double()
    ids = torch.randint(0, 11, (2, 5))
    expected = model(ids)
    with pytest.warns(svdkern.DecomposeWarning, match=r"lm_head.*tied to 'embed.weight'"):
        svdkern.decompose(model)
    assert isinstance(model.block, SVDLinear) and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.embed.weight
    model.tie_weights()
    assert model.lm_head.weight is model.embed.weight
    _close(model(ids), expected)


def test_untied_lm_head_is_decomposed():
    model = TinyLM(tied=False).double()
    ids = torch.randint(0, 11, (2, 5))
    expected = model(ids)
    _, warned = _decompose_quietly(model)
    assert not warned and isinstance(model.lm_head, SVDLinear)
    _close(model(ids), expected)


def test_frozen_parameters_stay_frozen():
    model = nn.Sequential(nn.Linear(5, 4), nn.Conv1d(4, 3, 1), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)  # weight frozen, bias trained
    model[1].requires_grad_(False)
    svdkern.decompose(model)
    first, conv, last = model
    assert not any(p.requires_grad for p in (first.U, first.s, first.V))
    assert first.bias.requires_grad
    assert not any(p.requires_grad for p in conv.parameters())
    assert all(p.requires_grad for p in last.parameters())
    x = torch.randn(3, 5)
    y = last(torch.relu(conv(first(x).unsqueeze(-1)).squeeze(-1)))
    y.sum().backward()
    assert first.U.grad is None and first.bias.grad is not None and conv.U.grad is None
    assert last.U.grad is not None


def test_compress_keeps_hooks_and_frozen_flags():
    model = svdkern.decompose(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))
    model[0].requires_grad_(False)
    model[1].prune_(2)
    seen = []
    model[1].register_forward_hook(lambda m, a, out: seen.append(type(m)))
    plain = svdkern.compress(model, "lowrank")
    assert not any(p.requires_grad for p in plain[0].parameters())
    assert all(p.requires_grad for p in plain[1].parameters())
    plain(torch.randn(2, 8))
    assert seen == [nn.Sequential]


def test_decompose_twice_changes_nothing_and_says_nothing():
    model = svdkern.decompose(Mixed())
    layers = list(model.modules())
    _, warned = _decompose_quietly(model)
    assert not warned and list(model.modules()) == layers


def test_lazy_module_not_yet_run_is_a_clear_error():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'?0'? \(LazyLinear\).*forward"):
        svdkern.decompose(model)
    assert type(model[2]) is nn.Linear, "nothing is converted when decompose raises"
    svdkern.decompose(model, skip=["0"])  # a skipped Lazy module is fine
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    model(torch.randn(1, 7))
    svdkern.decompose(model)
    assert isinstance(model[0], SVDLinear) and model[0].in_features == 7


def test_hooks_move_to_the_svd_layer_and_their_handles_still_remove_them():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    calls = []
    handles = [
        model[0].register_forward_pre_hook(lambda m, a: calls.append(("pre", type(m)))),
        model[0].register_forward_hook(lambda m, a, out: calls.append(("post", type(m)))),
        model[0].register_forward_hook(lambda m, a, kw, out: out * 2, with_kwargs=True),
        model[0].register_full_backward_hook(lambda m, gi, go: calls.append(("bwd", type(m)))),
    ]
    x = torch.randn(3, 4, requires_grad=True)
    expected = model(x)
    calls.clear()
    svdkern.decompose(model)
    y = model(x)
    y.sum().backward()
    assert ("pre", SVDLinear) in calls and ("post", SVDLinear) in calls
    assert ("bwd", SVDLinear) in calls
    torch.testing.assert_close(y, expected)  # the hook doubling the output still runs
    for h in handles:
        h.remove()
    calls.clear()
    torch.testing.assert_close(model(x), model[2](torch.relu(model[0](x))))
    assert not calls


def test_state_dict_hooks_are_named_as_dropped():
    model = nn.Sequential(nn.Linear(4, 4))

    def rename_weight(module, state_dict, prefix, local_metadata):
        return state_dict

    model[0]._register_state_dict_hook(rename_weight)
    with pytest.warns(svdkern.DecomposeWarning, match="rename_weight"):
        svdkern.decompose(model)
    assert isinstance(model[0], SVDLinear)


class SwinStyle(nn.Module):
    """Reads its child's weight directly (torchvision Swin's shifted-window attention) and
    its dtype (a common cast), besides calling another child normally."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(3 * dim, dim)
        self.norm_in = nn.Linear(dim, dim)

    def forward(self, x):
        x = x.to(self.norm_in.weight.dtype)
        x = self.norm_in(x)
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        return self.proj(torch.tanh(qkv))


def test_weight_read_layers_are_listed_and_still_run_after_decompose():
    model = SwinStyle().double()
    x = torch.randn(4, 8, dtype=torch.float64)
    expected = model(x)
    report = svdkern.plan(model, example_inputs=(x,))
    notes = {p.name: p.reason for p in report.notes}
    assert set(notes) == {"qkv", "norm_in"}
    assert "SwinStyle.forward" in notes["qkv"] and "compress keeps it dense" in notes["qkv"]
    with pytest.warns(svdkern.DecomposeWarning, match="qkv"):
        svdkern.decompose(model, example_inputs=x)
    assert isinstance(model.qkv, SVDLinear) and isinstance(model.proj, SVDLinear)
    _close(model(x), expected)


@pytest.mark.parametrize("policy", ["flops", "lowrank", "dense"])
def test_weight_read_layers_stay_dense_after_compress_and_export(policy):
    model = SwinStyle()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", svdkern.DecomposeWarning)
        svdkern.decompose(model)
    for _, layer in svdkern.nn.svd_layers(model):
        layer.prune_(2)
    x = torch.randn(4, 8)
    expected = model(x)
    plain = svdkern.compress(model, policy, example_inputs=(x,))
    assert type(plain.qkv) is nn.Linear and type(plain.norm_in) is nn.Linear
    if policy == "lowrank":
        assert isinstance(plain.proj, nn.Sequential)
    torch.testing.assert_close(plain(x), expected, rtol=1e-4, atol=1e-5)
    program = torch.export.export(plain, (x,))
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-4, atol=1e-5)
    by_shape = svdkern.compress(model, policy, input_shape=(4, 8))
    assert type(by_shape.qkv) is nn.Linear


def test_transformer_encoder_fast_path_reads_are_found_and_compress_runs_and_exports():
    # nn.TransformerEncoderLayer reads its children's weights in eval mode only when no
    # module carries a hook, so the check must not use hooks.
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    expected = model(x)
    report = svdkern.plan(model, example_inputs=(x,))
    read = {"layers.0.self_attn", "layers.0.linear1", "layers.0.linear2"}
    assert {p.name for p in report.notes} == read
    assert all("TransformerEncoderLayer.forward" in p.reason for p in report.notes)
    with pytest.warns(svdkern.DecomposeWarning, match="linear1"):
        svdkern.decompose(model, example_inputs=(x,))
    torch.testing.assert_close(model(x), expected)
    svdkern.prune(model, energy=0.5)
    pruned = model(x)
    plain = svdkern.compress(model, "lowrank", example_inputs=(x,))
    assert type(plain.layers[0].linear1) is nn.Linear
    assert type(plain.layers[0].self_attn) is nn.MultiheadAttention
    torch.testing.assert_close(plain(x), pruned, rtol=1e-4, atol=1e-5)
    program = torch.export.export(plain, (x,))
    torch.testing.assert_close(program.module()(x), pruned, rtol=1e-4, atol=1e-5)


def test_decompose_flops_prune_and_compress_agree_on_fast_path_reads():
    # The reads happen only in a hook-free forward (the fast path); flops and prune count
    # by hooks and dispatch, and must still treat these layers as read through .weight.
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    _decompose_quietly(model, example_inputs=(x,))
    svd = {name for name, _ in svdkern.nn.svd_layers(model)}
    projections = ("q_proj", "k_proj", "v_proj", "out_proj")
    expected = {f"layers.0.self_attn.{n}" for n in projections}
    assert svd == expected | {"layers.0.linear1", "layers.0.linear2"}
    report = svdkern.flops(model, example_inputs=x)
    assert set(report.weight_reads) == svd
    assert all("TransformerEncoderLayer.forward" in why for why in report.weight_reads.values())
    assert all(lay.weight_read and lay.compressed_form == "dense" for lay in report.layers)
    with pytest.raises(ValueError, match=r"target_flops=0\.5 cannot be reached"):
        svdkern.prune(model, target_flops=0.5, example_inputs=x)
    pruned = svdkern.prune(model, energy=0.5, example_inputs=x)
    assert pruned.macs_after == pruned.macs_before == report.dense_macs
    plain = svdkern.compress(model, "lowrank", example_inputs=(x,))
    assert type(plain.layers[0].linear1) is nn.Linear
    torch.testing.assert_close(plain(x), model(x), rtol=1e-4, atol=1e-5)


def test_weight_reads_found_by_decompose_keep_compress_safe_without_an_example():
    x = torch.randn(4, 8)
    blind, seen = SwinStyle(), SwinStyle()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", svdkern.DecomposeWarning)
        svdkern.decompose(blind)
        svdkern.decompose(seen, example_inputs=(x,))
    with pytest.raises(AttributeError, match="weight"):
        svdkern.compress(blind, "lowrank")(x)  # nobody looked: qkv became a pair
    plain = svdkern.compress(seen, "lowrank")
    assert type(plain.qkv) is nn.Linear and isinstance(plain.proj, nn.Sequential)
    torch.testing.assert_close(plain(x), seen(x), rtol=1e-4, atol=1e-5)


def test_compress_takes_token_ids_and_keyword_arguments():
    class Keyed(TinyLM):
        def forward(self, ids, *, scale: float = 1.0):
            return super().forward(ids) * scale

    model = Keyed(tied=False, vocab=50, dim=40)
    svdkern.decompose(model)
    model.lm_head.prune_(2)
    ids = torch.randint(0, 50, (3, 7))
    plain = svdkern.compress(model, example_inputs=(ids,), example_kwargs={"scale": 2.0})
    assert isinstance(plain.lm_head, nn.Sequential)  # 2·(40 + 50) < 40·50 MACs per row
    torch.testing.assert_close(plain(ids, scale=2.0), model(ids, scale=2.0))


def test_pruned_checkpoint_of_conv1d_and_conv1d_like_layers_reloads():
    model = svdkern.decompose(Mixed().double())
    svdkern.prune(model, energy=0.3)
    state = model.state_dict()
    fresh = svdkern.decompose(Mixed().double())
    result = svdkern.load_state_dict(fresh, state)
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.conv1.rank == model.conv1.rank < fresh.conv1.full_rank
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    _close(fresh(x), model(x))


# --- nn.MultiheadAttention ---------------------------------------------------------------


class AttnBlock(nn.Module):
    def __init__(self, dim=8, heads=2, kdim=None, batch_first=True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, kdim=kdim, vdim=kdim, batch_first=batch_first)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x, memory=None):
        memory = x if memory is None else memory
        y, _ = self.attn(x, memory, memory, need_weights=False)
        return self.fc(y)


@pytest.mark.parametrize("mha", ["split", "fused"])
def test_multihead_attention_is_decomposed_exactly(mha):
    model = AttnBlock().double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    expected = model(x)
    _, warned = _decompose_quietly(model, mha=mha)
    assert not warned and isinstance(model.attn, SVDMultiheadAttention)
    names = {name for name, _ in svdkern.nn.svd_layers(model)}
    projections = (
        {"attn.q_proj", "attn.k_proj", "attn.v_proj"} if mha == "split" else {"attn.in_proj"}
    )
    assert names == projections | {"attn.out_proj", "fc"}
    _close(model(x), expected)


def test_multihead_attention_skip_leaves_it_with_a_reason():
    model = AttnBlock()
    with pytest.warns(svdkern.DecomposeWarning, match=r"attn \(MultiheadAttention\).*'skip'"):
        svdkern.decompose(model, mha="skip")
    assert type(model.attn) is nn.MultiheadAttention and isinstance(model.fc, SVDLinear)


def test_fused_multihead_attention_with_other_kdim_is_left_with_a_reason():
    model = AttnBlock(kdim=6)
    with pytest.warns(svdkern.DecomposeWarning, match="mha='split'"):
        svdkern.decompose(model, mha="fused")
    assert type(model.attn) is nn.MultiheadAttention
    model = AttnBlock(kdim=6).double().eval()
    x, memory = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    expected = model(x, memory)
    svdkern.decompose(model, mha="split")
    _close(model(x, memory), expected)


def test_frozen_multihead_attention_stays_frozen():
    model = AttnBlock()
    model.attn.requires_grad_(False)
    svdkern.decompose(model)
    assert not any(p.requires_grad for p in model.attn.parameters())
    assert all(p.requires_grad for p in model.fc.parameters())


def test_multihead_attention_prune_compress_reload():
    model = AttnBlock().eval()
    svdkern.decompose(model)
    svdkern.prune(model, energy=0.3)
    x = torch.randn(2, 5, 8)
    expected = model(x)
    state = model.state_dict()
    fresh = svdkern.decompose(AttnBlock().eval())
    svdkern.load_state_dict(fresh, state)
    torch.testing.assert_close(fresh(x), expected)
    dense = svdkern.compress(model, "dense")
    assert type(dense.attn) is nn.MultiheadAttention
    torch.testing.assert_close(dense(x), expected, rtol=1e-4, atol=1e-5)
    lowrank = svdkern.compress(model, "lowrank", example_inputs=(x,))
    assert isinstance(lowrank.attn.out_proj, nn.Sequential)
    assert isinstance(lowrank.attn.q_proj, nn.Sequential)
    torch.testing.assert_close(lowrank(x), expected, rtol=1e-4, atol=1e-5)
    program = torch.export.export(lowrank, (x,))
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-4, atol=1e-5)


def test_decompose_of_a_bare_layer_keeps_its_hooks():
    layer = nn.Conv1d(3, 4, 3)
    seen = []
    layer.register_forward_hook(lambda m, a, out: seen.append(type(m)))
    svd = svdkern.decompose(layer)
    svd(torch.randn(1, 3, 9))
    assert isinstance(svd, SVDLayer) and seen == [SVDConv1d]


def test_decompose_rejects_unknown_mha_option():
    with pytest.raises(ValueError, match="mha"):
        svdkern.decompose(copy.deepcopy(AttnBlock()), mha="packed")
