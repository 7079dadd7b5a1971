"""svdkern.flops: MACs of dense, SVD and compressed models, cross-checked against
torch.utils.flop_counter.FlopCounterMode (FLOPs = 2·MACs)."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import svdkern
from svdkern.examples import Example, example_call
from svdkern.nn import SVDLinear
from svdkern.trace import FLOP_FORMULAS, _cpu_sdpa_flop, layer_inputs, weight_reads


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 24, (3, 5), stride=2, padding=(1, 2), dilation=(1, 2)),
        nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding="same", groups=2),
        nn.Conv2d(24, 32, 1, stride=(2, 1)),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 40),
        nn.ReLU(),
        nn.Linear(40, 10),
    )


INPUT = (2, 3, 20, 18)


def _counted_macs(model: nn.Module, shape=INPUT) -> int:
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(shape))
    return counter.get_total_flops() // 2


def test_flops_of_dense_model_matches_flop_counter():
    model = _cnn()
    report = svdkern.flops(model, INPUT)
    assert report.dense_macs == report.svd_macs == report.compressed_macs == _counted_macs(model)
    params = sum(p.numel() for p in model.parameters())
    assert report.dense_params == report.svd_params == report.compressed_params == params


@pytest.mark.parametrize("decomposition", ["channel", "spatial"])
def test_flops_of_pruned_svd_model_matches_compressed_and_dense_counts(decomposition):
    dense = _cnn()
    with pytest.warns(UserWarning, match="groups"):
        model = svdkern.decompose(copy.deepcopy(dense), decomposition)
    svdkern.prune(model, energy=0.4)
    report = svdkern.flops(model, INPUT)
    assert report.dense_macs == _counted_macs(dense)
    plain = svdkern.compress(model, input_shape=INPUT)
    assert report.compressed_macs == _counted_macs(plain)
    lowrank = svdkern.compress(model, policy="lowrank")
    assert report.svd_macs == _counted_macs(lowrank)
    assert report.compressed_params == sum(p.numel() for p in plain.parameters())
    assert report.dense_params == sum(p.numel() for p in dense.parameters())
    assert report.svd_params == sum(p.numel() for p in model.parameters())
    assert report.compressed_macs <= min(report.dense_macs, report.svd_macs)
    assert report.ratio == report.compressed_macs / report.dense_macs
    # counting the compressed model itself gives its own MACs as dense
    assert svdkern.flops(plain, INPUT).dense_macs == report.compressed_macs


def test_flops_per_layer_report():
    model = svdkern.decompose(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    )
    model[0].prune_(2)
    report = svdkern.flops(model, (1, 3, 6, 6))
    conv, fc = report.layers
    assert conv.name == "0" and conv.kind == "SVDConv2d/channel" and conv.shape == (8, 3, 3, 3)
    assert conv.rank == 2 and conv.full_rank == 8 and conv.calls == 1
    assert conv.dense_macs == 16 * 8 * 27 and conv.svd_macs == 16 * 2 * (27 + 8)
    assert conv.compressed_form == "lowrank" and conv.compressed_macs == conv.svd_macs
    assert fc.rank == 5 and fc.compressed_form == "dense" and fc.dense_macs == 128 * 5
    assert "total" in str(report) and "SVDConv2d/channel" in str(report)
    data = report.to_dict()
    assert data["layers"][0]["name"] == "0" and data["ratio"] == report.ratio


def test_flops_counts_every_call_of_a_shared_layer():
    shared = SVDLinear(6, 6, rank=2)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = svdkern.flops(model, (4, 6))
    assert report.layers[0].calls == 2 and report.svd_macs == 2 * 4 * 2 * 12


def test_flops_restores_training_mode_and_running_stats():
    model = _cnn().train()
    stats = model[1].running_mean.clone()
    svdkern.flops(model, INPUT)
    assert model.training and model[1].training
    torch.testing.assert_close(model[1].running_mean, stats)


def test_flops_exposed_at_top_level():
    assert callable(svdkern.flops) and svdkern.FlopsReport.__name__ == "FlopsReport"


# --- example inputs, the FlopCounterMode total and its breakdown -------------------------


def _flop_counter_macs(model: nn.Module, *args, formulas: bool = True, **kwargs) -> int:
    """FlopCounterMode's MACs of one eval, no-grad forward (MultiheadAttention fast path
    off), with svdkern's formulas for the ops it has none for when `formulas`."""
    mapping = FLOP_FORMULAS if formulas else None
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model.eval()(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() // 2


class _Attention(nn.Module):
    """Hand-written self-attention: q/k/v/o Linears and two activation × activation matmuls."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape

        def split(t):
            return t.reshape(B, L, self.heads, D // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = scores.softmax(-1) @ v
        return self.o(out.transpose(1, 2).reshape(B, L, D))


class _TokenModel(nn.Module):
    """Token ids → embedding → attention → Conv1d over time → MultiheadAttention →
    ConvTranspose1d (not a counted layer) → LM head tied to the embedding."""

    def __init__(self, vocab=40, dim=16, heads=2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = _Attention(dim, heads)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.up = nn.ConvTranspose1d(dim, dim, 1)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.attn(h, mask)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        h = self.up(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h)


class _SwinPattern(nn.Module):
    """torchvision Swin's pattern: the parent reads qkv.weight into F.linear, so qkv's own
    forward never runs."""

    def __init__(self, dim=24, heads=3) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x + self.out(F.gelu(self.fc(x)))


B, L, DIM, HEADS, VOCAB = 2, 7, 16, 2, 40


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (B, L))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, -2:] = False
    return ids, mask


def test_flops_of_token_id_model_splits_the_flop_counter_total_by_category():
    model = _TokenModel(VOCAB, DIM, HEADS)
    ids, mask = _ids()
    report = svdkern.flops(model, example_inputs=(ids,), example_kwargs={"mask": mask})
    assert report.total_macs == _flop_counter_macs(model, ids, mask=mask)
    rows = B * L
    # counted: 4 attention Linears, Conv1d (k=3), MHA in-projection (3·E·E) + out_proj, head
    expected = rows * DIM * DIM * (4 + 3 + 3 + 1) + rows * DIM * VOCAB
    assert report.dense_macs == report.svd_macs == expected
    layers = {lay.name: lay for lay in report.layers}
    assert layers["mha"].kind == "MultiheadAttention.in_proj" and layers["mha"].calls == 3
    assert layers["mha"].dense_macs == 3 * rows * DIM * DIM
    assert layers["mha.out_proj"].dense_macs == rows * DIM * DIM
    assert layers["conv"].kind == "Conv1d" and layers["conv"].dense_macs == rows * 3 * DIM * DIM
    # attention: QKᵀ and AV of the hand-written block and of the MHA (heads·L·L·d each)
    assert report.attention_macs == 2 * 2 * B * L * L * DIM
    assert report.other_macs == {"aten.convolution": rows * DIM * DIM}  # the ConvTranspose1d
    assert report.total_macs == report.svd_macs + report.uncounted_macs
    assert report.weight_reads == {} and report.weight_read_macs == 0
    text = str(report)
    assert "FlopCounterMode" in text and "attention" in text and "aten.convolution" in text


def test_flops_total_includes_what_plain_flop_counter_misses_only_through_added_formulas():
    # A batch-first MHA with need_weights=False runs scaled_dot_product_attention, whose
    # CPU kernel FlopCounterMode has no formula for: plain, it counts the projections only.
    model = nn.Sequential(nn.Linear(DIM, DIM))
    mha = nn.MultiheadAttention(DIM, HEADS, batch_first=True)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.mha = model[0], mha

        def forward(self, x):
            return self.mha(self.lin(x), x, x, need_weights=False)[0]

    block = Block()
    x = torch.randn(B, L, DIM)
    report = svdkern.flops(block, example_inputs=x)
    plain = _flop_counter_macs(block, x, formulas=False)
    assert report.total_macs == _flop_counter_macs(block, x)
    assert report.total_macs - plain == report.attention_macs == 2 * B * L * L * DIM
    assert plain == report.dense_macs == B * L * DIM * DIM * 5


def test_flops_of_svd_model_counts_the_chains_as_flop_counter_does():
    with pytest.warns(UserWarning, match="ConvTranspose1d"):
        model = svdkern.decompose(_TokenModel(VOCAB, DIM, HEADS))
    ids, mask = _ids()
    svdkern.prune(model, ranks={"attn.*": 3, "conv": 5})
    report = svdkern.flops(model, example_inputs=(ids, mask))
    assert report.total_macs == report.svd_macs + report.uncounted_macs
    plain = svdkern.compress(model, policy="lowrank")
    measured = _flop_counter_macs(plain, ids, mask)
    assert report.svd_macs + report.uncounted_macs == measured
    deployed = svdkern.compress(model, example_inputs=(ids, mask))
    assert svdkern.flops(deployed, example_inputs=(ids, mask)).dense_macs == (
        report.compressed_macs
    )
    assert _flop_counter_macs(deployed, ids, mask) == report.compressed_macs + (
        report.uncounted_macs
    )


def test_layer_read_through_weight_is_counted_with_its_real_macs():
    model = _SwinPattern()
    x = torch.randn(B, L, 24)
    report = svdkern.flops(model, example_inputs=x)
    qkv = next(lay for lay in report.layers if lay.name == "qkv")
    assert qkv.weight_read and qkv.calls == 0
    assert qkv.dense_macs == qkv.svd_macs == qkv.compressed_macs == B * L * 24 * 72
    assert set(report.weight_reads) == {"qkv"} and "aten.addmm" in report.weight_reads["qkv"]
    assert report.weight_read_macs == qkv.dense_macs
    assert report.total_macs == _flop_counter_macs(model, x)
    assert report.total_macs == report.svd_macs + report.uncounted_macs
    assert "read through .weight" in str(report)


def test_svd_layer_read_through_weight_costs_its_dense_macs_at_any_rank():
    dense = _SwinPattern()
    x = torch.randn(B, L, 24)
    with pytest.warns(UserWarning, match="qkv"):
        model = svdkern.decompose(copy.deepcopy(dense), example_inputs=(x,))
    model.qkv.prune_(4)
    report = svdkern.flops(model, example_inputs=x)
    qkv = next(lay for lay in report.layers if lay.name == "qkv")
    assert qkv.weight_read and qkv.rank == 4 and qkv.compressed_form == "dense"
    assert qkv.dense_macs == qkv.compressed_macs == B * L * 24 * 72
    # The SVD form also composes W (72 × 24 at rank 4) for the parent's product.
    assert qkv.svd_macs == B * L * 24 * 72 + 72 * 24 * 4
    assert report.weight_read_macs == qkv.svd_macs
    assert report.total_macs == _flop_counter_macs(model, x)
    assert report.total_macs == report.svd_macs + report.uncounted_macs
    assert report.dense_macs == svdkern.flops(dense, example_inputs=x).dense_macs
    deployed = svdkern.compress(model, example_inputs=(x,))
    assert _flop_counter_macs(deployed, x) == report.compressed_macs + report.uncounted_macs


def test_weight_reads_names_only_layers_used_outside_their_forward():
    x = torch.randn(B, L, 24)
    reads = weight_reads(_SwinPattern(), Example(example_inputs=x))
    assert list(reads) == ["qkv"] and "own forward does not run" in reads["qkv"]
    # nn.MultiheadAttention reads its out_proj.weight itself: not a weight read
    ids, mask = _ids()
    assert weight_reads(_TokenModel(VOCAB, DIM, HEADS), Example(example_inputs=(ids, mask))) == {}


def test_flops_of_conv1d_and_svd_conv1d_match_flop_counter():
    dense = nn.Sequential(nn.Conv1d(6, 12, 5, stride=2, padding=2), nn.ReLU(), nn.Conv1d(12, 8, 3))
    shape = (3, 6, 31)
    report = svdkern.flops(dense, shape)
    assert report.dense_macs == report.total_macs == _counted_macs(dense, shape)
    model = svdkern.decompose(copy.deepcopy(dense))
    svdkern.prune(model, ranks={"0": 3, "2": 2})
    report = svdkern.flops(model, shape)
    assert report.dense_macs == _counted_macs(dense, shape)
    assert report.svd_macs == _counted_macs(svdkern.compress(model, policy="lowrank"), shape)
    assert report.compressed_macs == _counted_macs(
        svdkern.compress(model, input_shape=shape), shape
    )


def test_flops_without_example_counts_one_row_and_no_total():
    report = svdkern.flops(nn.Sequential(nn.Linear(5, 7), nn.MultiheadAttention(7, 1)))
    assert report.dense_macs == 5 * 7 + 3 * 7 * 7 + 7 * 7 and report.total_macs is None
    assert report.uncounted_macs is None and "no example forward" in str(report)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param(
            {"input_shape": (3, 20, 18)}, ValueError, "input_shape=\\(3, 20, 18\\)", id="3d-shape"
        ),
        pytest.param(
            {"input_shape": INPUT, "example_inputs": torch.zeros(INPUT)},
            ValueError,
            "input_shape.*example_inputs",
            id="both",
        ),
        pytest.param({"input_shape": (2, 3.5)}, ValueError, "input_shape must be", id="float"),
        pytest.param(
            {"example_inputs": torch.zeros(2, 5, 20, 18)}, ValueError, "example_inputs", id="bad"
        ),
        pytest.param(
            {"example_inputs": torch.zeros(INPUT), "example_kwargs": [1]},
            TypeError,
            "example_kwargs",
            id="kwargs-list",
        ),
        pytest.param({"example_inputs": {"x": 1}}, TypeError, "example_inputs", id="dict"),
    ],
)
def test_flops_errors_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        svdkern.flops(_cnn(), **kwargs)


def test_layer_inputs_take_example_inputs_and_keep_the_input_shape_path():
    model = _TokenModel(VOCAB, DIM, HEADS)
    ids, mask = _ids()
    shapes = layer_inputs(model, Example(example_inputs=ids, example_kwargs={"mask": mask}))
    assert shapes["mha"] == [(B, L, DIM)] * 3 and shapes["mha.out_proj"] == [(B, L, DIM)]
    assert shapes["conv"] == [(B, DIM, L)] and shapes["attn.q"] == [(B, L, DIM)]
    assert layer_inputs(_cnn(), Example(INPUT))["0"] == [INPUT]
    args, kwargs = example_call(model, example_kwargs={"ids": ids})
    assert args == () and kwargs["ids"] is ids


class _DtypeRead(nn.Module):
    """Reads a child's weight only for its dtype (no op uses it) and calls it normally."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(x.to(self.fc.weight.dtype)))


def test_layer_whose_weight_attribute_is_read_stays_dense_in_the_counts():
    x = torch.randn(5, 12)
    reads = weight_reads(_DtypeRead(), Example(example_inputs=x))
    assert list(reads) == ["fc"] and ".weight is read" in reads["fc"]
    model = svdkern.decompose(_DtypeRead())
    model.fc.prune_(2)
    model.out.prune_(1)
    report = svdkern.flops(model, example_inputs=x)
    fc, out = report.layers
    assert fc.weight_read and fc.compressed_form == "dense" and fc.compressed_macs == 5 * 144
    assert not out.weight_read and out.compressed_form == "lowrank"
    # Read for its dtype: no product uses W, but the SVD form composes it (12 × 12, rank 2).
    assert report.weight_read_macs == 12 * 12 * 2
    assert fc.svd_macs == 5 * 2 * (12 + 12) + 12 * 12 * 2  # its chain + the compose
    assert report.total_macs == report.svd_macs + report.uncounted_macs
    assert isinstance(model.fc, SVDLinear) and type(model.fc) is SVDLinear  # class restored


@pytest.mark.parametrize(
    "q, k, v",
    [((2, 8, 5, 16), (2, 2, 7, 16), (2, 2, 7, 12)), ((1, 4, 3, 8), (1, 1, 3, 8), (1, 1, 3, 8))],
    ids=["gqa-8q-2kv", "mqa-4q-1kv"],
)
def test_cpu_attention_formula_counts_grouped_query_attention_over_the_query_heads(q, k, v):
    b, h_q, s_q, d_q = q
    expected = 2 * b * h_q * s_q * k[2] * (d_q + v[3])
    assert _cpu_sdpa_flop(q, k, v) == expected
    # equal heads: the same count as torch's formula for the CUDA flash kernel
    flash = torch.utils.flop_counter.flop_registry[
        torch.ops.aten._scaled_dot_product_flash_attention
    ]
    same = (b, h_q, k[2], d_q)
    assert _cpu_sdpa_flop(q, same, (b, h_q, k[2], d_q)) == flash(q, same, (b, h_q, k[2], d_q))


def test_cpu_attention_formula_matches_the_kernel_it_counts():
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is None:
        pytest.skip("this torch has no CPU flash attention kernel")
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with counter:
        cpu_sdpa(q, k, v)
    assert counter.get_total_flops() == 2 * 2 * 4 * 5 * 7 * (8 + 8)


# --- FlopCounterMode counts svdkern's ops ------------------------------------------------


def _flop_counts(fn, reference: bool) -> tuple[int, dict[str, int]]:
    """(total FLOPs, {op: FLOPs}) FlopCounterMode counts for fn(), without any custom
    mapping, on the C++ ops or on the plain-PyTorch reference."""
    from svdkern import ops

    with (
        ops.reference_mode() if reference else contextlib.nullcontext(),
        FlopCounterMode(display=False) as counter,
    ):
        fn()
    by_op = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), by_op


@pytest.mark.parametrize("rows, m, n, r", [(7, 5, 9, 3), (1, 4, 4, 1), (12, 16, 6, 6)])
@pytest.mark.parametrize("grad", [True, False], ids=["fwd+bwd", "no-grad"])
def test_flop_counter_counts_svdkern_ops_as_their_reference(rows, m, n, r, grad):
    from svdkern import ops

    torch.manual_seed(0)
    U, s, V = torch.randn(m, r), torch.randn(r), torch.randn(n, r)
    U2, s2, V2 = torch.randn(n, r + 1), torch.randn(r + 1), torch.randn(m, r + 1)
    x = torch.randn(2, rows, n)
    for t in (U, s, V, U2, s2, V2, x):
        t.requires_grad_(grad)

    def run(out: torch.Tensor) -> None:
        if grad:
            out.sum().backward()

    cases = {
        "lowrank_linear": lambda: run(ops.lowrank_linear(x, U, s, V)),
        "compose": lambda: run(ops.compose(U, s, V)),
        "compose_grouped": lambda: run(
            sum(W.sum() for W in ops.compose_grouped([U, U2], [s, s2], [V, V2]))
        ),
    }
    for name, fn in cases.items():
        with torch.set_grad_enabled(grad):
            ours, by_op = _flop_counts(fn, reference=False)
            ref, _ = _flop_counts(fn, reference=True)
        assert ours == ref > 0, name
        assert any(op.startswith("svdkern.") for op in by_op), (name, by_op)


def test_flop_counter_counts_the_orthogonality_backward_as_one_product_per_matrix():
    from svdkern import ops

    mats = [torch.randn(9, 4, requires_grad=True), torch.randn(5, 2, requires_grad=True)]
    grams = 2 * 9 * 4**2 + 2 * 5 * 2**2
    with torch.no_grad():
        assert _flop_counts(lambda: ops.orth_loss(mats), False)[0] == grams
        assert _flop_counts(lambda: ops.orth_loss(mats), True)[0] == grams
    # The reference's autograd takes two products per Gram, the op's backward one (4·M·R).
    assert _flop_counts(lambda: ops.orth_loss(mats).backward(), False)[0] == 2 * grams
    assert _flop_counts(lambda: ops.orth_loss(mats).backward(), True)[0] == 3 * grams
    svals = [torch.rand(5, requires_grad=True)]
    assert _flop_counts(lambda: ops.sparsity_loss(svals, "hoyer").backward(), False)[0] == 0


def test_lowrank_backward_formula_adds_the_recomputed_product_where_xv_is_not_kept():
    from torch.utils.flop_counter import flop_registry

    formula = flop_registry[torch.ops.svdkern.lowrank_linear_backward]
    rows, m, n, r = 6, 4, 5, 3
    g, x = torch.empty(rows, m, device="meta"), torch.empty(rows, n, device="meta")
    U, s, V = (torch.empty(*shape, device="meta") for shape in ((m, r), (r,), (n, r)))
    kept = formula(g, x, U, s, V, torch.empty(rows, r, device="meta"), False)
    recomputed = formula(g, x, U, s, V, torch.empty(0, device="meta"), False)
    assert kept == 4 * rows * r * (n + m)
    assert recomputed - kept == 2 * rows * n * r
