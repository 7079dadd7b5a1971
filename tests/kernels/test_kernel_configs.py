"""The Triton kernels' launch decisions: config spaces, pruning, autotune keys, problem
tables, dtype and precision handling. Most tests need no kernel launch (they run in the CPU
pass); the `interp` ones run kernels under TRITON_INTERPRET=1 (or on a GPU).

What only a compiler shows (registers, spills, the shared memory a config really uses, the
MMA instructions) is checked by `make kernel-check`; here the pruning that keeps configs
within those limits is checked against the same estimates for every supported shape.
"""

from __future__ import annotations

import itertools
import os
import types

import pytest
import torch

triton = pytest.importorskip("triton")

from svdkern import reference  # noqa: E402
from svdkern.kernels import _common, _gemm, compose, lowrank, orth, sparsity  # noqa: E402
from svdkern.kernels._common import SMEM_BUDGET, bucket  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()),
    reason="launching the Triton kernels needs a CUDA GPU or TRITON_INTERPRET=1",
)

TL = triton.language
# (dtype, precision) of every CUDA launch class: tensor cores and fp32 "ieee" (FMA).
LAUNCHES = [
    pytest.param(torch.bfloat16, "ieee", id="bf16"),
    pytest.param(torch.float16, "ieee", id="fp16"),
    pytest.param(torch.float32, "tf32", id="fp32-tf32"),
    pytest.param(torch.float32, "ieee", id="fp32-ieee"),
]
POW2 = [1, 16, 32, 64, 128, 256, 1024, 4096, 16384]


def _cfgs(space: list[dict]) -> list[dict]:
    """Config dicts as the pruning sees them (num_warps / num_stages defaults filled in)."""
    return [_common._cfg_dict(_common.config(kw)) for kw in space]


def _launch(dtype: torch.dtype, precision: str, first: str, **args) -> dict:
    """The pruning's view of a launch: the first tensor argument, sizes, ACC, PRECISION."""
    return {
        first: torch.empty(0, dtype=dtype),
        **args,
        "ACC": _common.acc_dtype(dtype),
        "PRECISION": precision,
    }


def _kept(keep, space: list[dict], args: dict) -> list[dict]:
    return [c for c in _cfgs(space) if keep(c, args)]


# ------------------------------------------------------------------------ dtypes and precision


def test_fp64_on_cuda_is_rejected_with_a_clear_error():
    fake = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float64)
    with pytest.raises(TypeError, match=r"compose: dtype torch.float64 is not supported on CUDA.*"
                       r"float64 runs on CPU"):  # fmt: skip
        _common.check_device_dtype("compose", fake)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        _common.check_device_dtype(
            "compose", types.SimpleNamespace(device=fake.device, dtype=dtype)
        )


@pytest.fixture
def _restore_tf32():
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(torch.backends, "fp32_precision")
    saved = (torch.backends.fp32_precision, matmul.fp32_precision) if new_api else None
    legacy = None if new_api else matmul.allow_tf32
    yield new_api
    if new_api:
        # "none" everywhere is torch's default; it also makes the legacy getter readable again.
        torch.backends.fp32_precision = saved[0]
        matmul.fp32_precision = saved[1]
    else:
        matmul.allow_tf32 = legacy


def test_tf32_is_read_through_the_new_precision_api(_restore_tf32):
    if not _restore_tf32:
        pytest.skip(f"torch {torch.__version__} has only the legacy allow_tf32 flag")
    matmul = torch.backends.cuda.matmul
    matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        matmul.allow_tf32  # noqa: B018  (what reading the legacy flag now does)
    assert _common.cuda_matmul_tf32()
    assert _common.input_precision(torch.float32) == ("ieee" if INTERPRET else "tf32")
    assert _common.input_precision(torch.bfloat16) == "ieee"
    matmul.fp32_precision = "ieee"
    assert not _common.cuda_matmul_tf32()
    assert _common.input_precision(torch.float32) == "ieee"
    matmul.fp32_precision = "none"
    torch.backends.fp32_precision = "tf32"  # the generic setting, inherited by cuda.matmul
    assert _common.cuda_matmul_tf32()


def test_tf32_follows_the_legacy_flag(_restore_tf32):
    matmul = torch.backends.cuda.matmul
    matmul.allow_tf32 = True
    assert _common.cuda_matmul_tf32()
    matmul.allow_tf32 = False
    assert not _common.cuda_matmul_tf32()


@pytest.mark.interp
@needs_kernels
def test_mma_accumulates_fp64_in_fp64():
    """tl.dot with an fp64 accumulator needs out_dtype=fp64 (triton 3.6 asserts otherwise)."""
    if DEVICE == "cuda":
        pytest.skip("fp64 runs through the interpreter only")
    tl = TL

    @triton.jit
    def _kernel(A, B, C, PRECISION: tl.constexpr):
        offs = tl.arange(0, 16)
        a = tl.load(A + offs[:, None] * 16 + offs[None, :])
        b = tl.load(B + offs[:, None] * 16 + offs[None, :])
        acc = _gemm.mma(a, b, tl.zeros((16, 16), dtype=tl.float64), PRECISION)
        tl.store(C + offs[:, None] * 16 + offs[None, :], acc)

    a, b = torch.randn(16, 16, dtype=torch.float64), torch.randn(16, 16, dtype=torch.float64)
    c = torch.empty_like(a)
    _kernel[(1,)](a, b, c, "ieee")
    torch.testing.assert_close(c, a @ b, rtol=1e-14, atol=1e-14)


# ------------------------------------------------------------------ shared memory and registers


@pytest.mark.parametrize("dtype, precision", LAUNCHES)
def test_every_matmul_launch_keeps_configs_within_smem_and_registers(dtype, precision):
    space = _common.union(_gemm.MMA_SPACE, _gemm.FMA_SPACE)
    fma = precision == "ieee" and dtype == torch.float32
    for m, n, k, ds in itertools.product(POW2, POW2, POW2, (False, True)):
        args = _launch(dtype, precision, "A", M_BUCKET=m, N_BUCKET=n, K_BUCKET=k, HAS_DS=ds)
        kept = _kept(_gemm._keep, space, args)
        assert kept, f"no matmul config for M={m} N={n} K={k} ds={ds}"
        for cfg in kept:
            assert _gemm.gemm_smem(cfg, dtype.itemsize) <= SMEM_BUDGET
            assert _common.member(cfg, _gemm.FMA_SPACE if fma else _gemm.MMA_SPACE)
            if ds:  # the ds epilogue holds a second tile: no 128×256 tiles there
                assert _gemm.acc_per_thread(cfg) <= 64


@pytest.mark.parametrize("dtype, precision", LAUNCHES)
@pytest.mark.parametrize("intermediates", [1, 2], ids=["forward", "backward"])
def test_every_fused_chain_launch_fits_shared_memory(dtype, precision, intermediates):
    """Every R_PAD the fused chain takes for the dtype keeps a config within shared memory
    (all stages and intermediates counted) and registers, the SVDKERN_AUTOTUNE=0 default
    included; larger ranks take the two-GEMM path."""
    keep = lowrank._keep_chain(intermediates)
    space = _common.union(lowrank.CHAIN_MMA, lowrank.CHAIN_FMA)
    r_max = lowrank.r_max(dtype)
    assert r_max == (256 if dtype.itemsize == 2 else 128)
    for r_pad, rows in itertools.product([16, 32, 64, 128, 256], POW2):
        if r_pad > r_max:
            continue
        args = _launch(dtype, precision, "X", ROWS_BUCKET=rows, R_PAD=r_pad)
        kept = _kept(keep, space, args)
        assert kept, f"no chain config for R_PAD={r_pad} rows={rows}"
        assert _kept(keep, lowrank.CHAIN_DEFAULTS, args), "no default config fits"
        for cfg in kept:
            assert lowrank.chain_smem(cfg, r_pad, dtype.itemsize, intermediates) <= SMEM_BUDGET


def _spaces():
    """(kernel, keep, autotune space, defaults, launch args except dtype/precision) for every
    kernel with configs, over sizes from 1 to 16384 (bucketed as the launchers pass them)."""
    grouped = _common.union(
        compose.GROUPED_MMA, compose.GROUPED_FMA, compose.NARROW_MMA, compose.NARROW_FMA
    )
    for a, b in itertools.product(POW2, POW2):
        for ds in (False, True):
            args = dict(A=None, M_BUCKET=a, N_BUCKET=b, K_BUCKET=a, HAS_DS=ds)
            space = _common.union(_gemm.MMA_SPACE, _gemm.FMA_SPACE)
            yield "matmul", _gemm._keep, space, _gemm.DEFAULTS, args
        for backward in (False, True):
            keep = compose._keep_grouped(backward)
            args = dict(F=None, MAX_M=a, MAX_N=b)
            yield "grouped", keep, grouped, compose.GROUPED_DEFAULTS, args
        args = dict(MATS=None, MAX_R=b)
        yield "orth fwd", orth._keep_fwd, orth.FWD_MMA + orth.FWD_FMA, orth.FWD_DEFAULTS, args
        yield "orth bwd", orth._keep_bwd, orth.BWD_MMA + orth.BWD_FMA, orth.BWD_DEFAULTS, args
        if b >= 16:
            args = dict(X=None, R_PAD=b, M_BUCKET=a, N_BUCKET=a)
            space = _common.union(lowrank.WEIGHTS_MMA, lowrank.WEIGHTS_FMA)
            yield "weights", lowrank._keep_weights, space, lowrank.WEIGHTS_DEFAULTS, args


@pytest.mark.parametrize("dtype, precision", LAUNCHES)
def test_every_launch_keeps_a_config_and_a_default(dtype, precision):
    """Autotuning has a config of the launch's class for every size, and SVDKERN_AUTOTUNE=0
    a default (the pruning's fallback, the smallest tile, is never needed)."""
    for name, keep, space, defaults, args in _spaces():
        first = next(iter(args))
        launch = {**args, first: torch.empty(0, dtype=dtype), "ACC": TL.float32}
        launch["PRECISION"] = precision
        assert _kept(keep, space, launch), f"{name}: no config for {args}"
        assert _kept(keep, defaults, launch), f"{name}: no default for {args}"
        assert all(_common.member(d, space) for d in defaults), f"{name}: default not in space"


def test_fp32_ieee_gets_fma_tiles_only():
    """fp32 without TF32 runs on FMA units: the tensor-core tiles would spill there."""
    args = _launch(
        torch.float32, "ieee", "A", M_BUCKET=4096, N_BUCKET=4096, K_BUCKET=4096, HAS_DS=False
    )
    kept = _kept(_gemm._keep, _common.union(_gemm.MMA_SPACE, _gemm.FMA_SPACE), args)
    assert kept and max(_gemm.acc_per_thread(c) for c in kept) <= 64
    assert not any(c["BLOCK_N"] == 256 or c["BLOCK_M"] == 256 for c in kept)
    bf16 = {**args, "A": torch.empty(0, dtype=torch.bfloat16)}
    assert any(c["BLOCK_N"] == 256 for c in _kept(_gemm._keep, _gemm.MMA_SPACE, bf16))


# ---------------------------------------------------------------------------- small-rank tiles


@pytest.mark.parametrize("r, widest", [(1, 16), (13, 16), (16, 16), (17, 32), (32, 32), (33, 64)])
@pytest.mark.parametrize("dtype, precision", LAUNCHES)
def test_small_ranks_get_narrow_tiles(r, widest, dtype, precision):
    """Weight-gradient tiles of the chain no wider than r's power of two (16 or 32 columns at
    r ≤ 32), and the grouped backward (outputs P × r) likewise."""
    args = _launch(dtype, precision, "X", R_PAD=lowrank._r_pad(r), M_BUCKET=4096, N_BUCKET=4096)
    kept = _kept(
        lowrank._keep_weights, _common.union(lowrank.WEIGHTS_MMA, lowrank.WEIGHTS_FMA), args
    )
    assert kept and max(c["BLOCK_N"] for c in kept) == widest
    assert _kept(lowrank._keep_weights, lowrank.WEIGHTS_DEFAULTS, args)[0]["BLOCK_N"] == widest
    grouped = _launch(dtype, precision, "GW", F=args["X"], MAX_M=4096, MAX_N=bucket(r))
    space = _common.union(
        compose.GROUPED_MMA, compose.GROUPED_FMA, compose.NARROW_MMA, compose.NARROW_FMA
    )
    kept = _kept(compose._keep_grouped(True), space, grouped)
    assert kept and max(c["BLOCK_N"] for c in kept) <= max(16, widest)
    assert min(c["BLOCK_N"] for c in kept) == 16 or widest > 32


# ------------------------------------------------------------------------------ autotune keys


class _Recorder:
    """Stands in for a kernel: records each launch's autotune key instead of running."""

    def __init__(self, kernel) -> None:
        self.arg_names, self.keys, self.launches = kernel.arg_names, kernel.keys, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = {**dict(zip(self.arg_names, args)), **kwargs}
            self.launches.append(tuple(named[k] for k in self.keys))

        return launch


@pytest.fixture
def record(monkeypatch):
    def install(module, name):
        recorder = _Recorder(getattr(module, name))
        monkeypatch.setattr(module, name, recorder)
        monkeypatch.setattr(module, "check_device_dtype", lambda op, t: None, raising=False)
        return recorder

    return install


def test_autotune_keys_are_power_of_two_buckets(record):
    """A new batch size or a rank cut inside the same power of two reuses the tuned config."""
    fwd = record(lowrank, "_lowrank_fwd_kernel")
    rows_kernel = record(lowrank, "_lowrank_bwd_rows_kernel")
    weights = record(lowrank, "_lowrank_bwd_weights_kernel")
    gemm = record(_gemm, "_matmul_kernel")
    grouped = record(compose, "_compose_grouped_fwd_kernel")

    def step(rows, r, n=96, m=80):
        x, U, s, V = torch.empty(rows, n), torch.empty(m, r), torch.empty(r), torch.empty(n, r)
        lowrank.lowrank_linear_fwd(x, U, s, V)
        lowrank.lowrank_linear_bwd(torch.empty(rows, m), x, U, s, V, torch.empty(0), True)
        _gemm.matmul(torch.empty(rows, n), torch.empty(n, m))
        compose.compose_grouped_fwd([U], [s], [V])

    step(1000, 40)
    step(1024, 64)  # same buckets: rows 1024, r 64
    step(1025, 40)  # a new rows bucket
    for recorder in (fwd, rows_kernel, weights, gemm):
        a, b, c = recorder.launches
        assert a == b and a != c, recorder.keys
    a, b, c = grouped.launches
    assert a == b == c  # the grouped key has no rows


# ------------------------------------------------------------------------------ problem tables


@pytest.fixture
def tables(monkeypatch):
    monkeypatch.setattr(_common, "_TABLES", type(_common._TABLES)())
    monkeypatch.setattr(_common, "MAX_TABLES", 4)
    return _common._TABLES


def test_problem_tables_are_cached_and_least_recently_used_dropped(tables):
    cpu = torch.device("cpu")
    first = _common.problem_table([(1, 2, 3)], cpu)
    assert first.dtype == torch.int64 and first.tolist() == [[1, 2, 3]]
    assert _common.problem_table([(1, 2, 3)], cpu) is first
    for i in range(4):
        _common.problem_table([(i, 0)], cpu)
    assert len(tables) == 4 and (cpu, ((1, 2, 3),)) not in tables
    assert (cpu, ((0, 0),)) in tables


def test_problem_tables_used_by_a_captured_graph_are_never_dropped(tables, monkeypatch):
    cpu = torch.device("cpu")
    captured = _common.problem_table([(7, 7)], cpu)
    entry = tables[(cpu, ((7, 7),))]
    entry.stream = "capture stream"  # as a CUDA table has; the capture marks it kept for good
    monkeypatch.setattr(_common, "_capturing", lambda device: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "capture stream")
    assert _common.problem_table([(7, 7)], cpu) is captured
    with pytest.raises(RuntimeError, match="run the step once eagerly"):
        _common.problem_table([(8, 8)], cpu)  # a miss while capturing cannot copy
    monkeypatch.setattr(_common, "_capturing", lambda device: False)
    for i in range(10):
        _common.problem_table([(i,)], cpu)
    assert tables[(cpu, ((7, 7),))].tensor is captured
    assert len(tables) == 5  # 4 least recently used plus the captured one


# ------------------------------------------------------------------------ kernels (interpreter)


@pytest.mark.interp
@needs_kernels
@pytest.mark.parametrize("kind", ["hoyer", "hoyer_square"])
def test_sparsity_of_a_subnormal_norm_matches_reference(kind):
    """‖s‖₂² below fp32's smallest normal number: Hoyer is ‖s‖₁/‖s‖₂ ∈ [1, √r] as in the
    reference, not the huge value a flushed-to-zero norm gives (correctly rounded sqrt).
    Subnormal squares carry only ~13 significant bits (fp32's spacing there is 2⁻¹⁴⁹), so
    the fp64 truth is matched to 1e-3; a flushed norm is off by orders of magnitude."""
    s = torch.tensor([3e-21, -1e-21, 2e-21, 5e-22], device=DEVICE)
    assert 0 < float((s.double() ** 2).sum()) < torch.finfo(torch.float32).tiny
    got = sparsity.sparsity_loss_fwd([s], kind)
    want = reference.sparsity_loss([s.cpu()], kind)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=0)
    # ‖s‖₁/‖s‖₂ in fp64 from the definition (not through the reference): a value in [1, √4].
    exact = float(s.double().abs().sum() / s.double().norm())
    hoyer = float(got) if kind == "hoyer" else float(got) ** 0.5
    assert hoyer == pytest.approx(exact, rel=1e-3)
    grad = sparsity.sparsity_loss_bwd(torch.tensor(1.0, device=DEVICE), [s], kind)
    leaf = s.cpu().double().requires_grad_()
    reference.sparsity_loss([leaf], kind).backward()
    # dR/ds = (sign(s) − h·s/‖s‖₂)/‖s‖₂ cancels: compare against its largest term's scale.
    scale = float(leaf.grad.abs().max())
    torch.testing.assert_close(grad.cpu().double(), leaf.grad, rtol=1e-3, atol=1e-3 * scale)


def _half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of `dtype` at |x|: the error of a correctly rounded result."""
    a = x.abs().to(dtype)
    up = torch.nextafter(a, torch.tensor(float("inf"), dtype=dtype))
    return (up.double() - a.double()) / 2


@pytest.mark.interp
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_orth_backward_on_tensor_cores_keeps_fp32_accuracy(dtype):
    """dM = 4/r²·M·R with R split in two TF32 halves: every element is the exact value
    correctly rounded to the output dtype, up to 2⁻¹⁶·Σ|M||R| (fp32 accumulation and the
    split). R rounded to the input dtype once instead breaks that bound on many elements
    (M random, so M·R cancels and the exact value is far below Σ|M||R|)."""
    k, r = 70, 40
    M = (torch.randn(k, r) / k**0.5).to(dtype).to(DEVICE)
    _, res = orth.orth_loss_forward_fwd([M])
    dM = orth.orth_loss_bwd(torch.tensor(1.0, device=DEVICE), [M], res).view(k, r)
    Md, Rd = M.cpu().double(), res.cpu().double().view(r, r)
    exact = 4 / r**2 * Md @ Rd
    # The interpreter casts fp32 to bf16 by truncation (the GPU rounds to nearest): one ulp.
    ulps = 2 if INTERPRET and dtype == torch.bfloat16 else 1
    bound = (ulps + 1e-4) * _half_ulp(exact, dtype) + 2**-16 * (4 / r**2 * Md.abs() @ Rd.abs())
    err = (dM.cpu().double() - exact).abs()
    assert (err <= bound).all(), f"{int((err > bound).sum())} of {err.numel()} elements"
    once = (4 / r**2 * Md @ Rd.to(dtype).double()).to(dtype).double()
    assert ((once - exact).abs() > bound).sum() > err.numel() // 10  # the bound has teeth


@pytest.mark.interp
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("near_orthogonal", [False, True], ids=["random", "near-orthogonal"])
def test_orth_backward_split_product_error_before_rounding(dtype, near_orthogonal):
    """The backward kernel with an fp32 output buffer shows M·R itself: within 2⁻¹⁹·Σ|M||R|
    (measured: about 2e-7, as fp32 FMA), where R rounded to the input dtype errs by 1e-4 (fp16)
    to 1e-3 (bf16)."""
    k, r = 96, 48
    A = torch.randn(k, r, dtype=torch.float64)
    M = (torch.linalg.qr(A)[0] * 1.001 if near_orthogonal else A / k**0.5).to(dtype).to(DEVICE)
    _, res = orth.orth_loss_forward_fwd([M])
    out = torch.empty(k * r, dtype=torch.float32, device=DEVICE)
    table = _common.problem_table([(k, r, 0, 0)], M.device)
    orth._orth_bwd_kernel[lambda meta: (4,)](
        M.reshape(-1), res, out, torch.ones(1, device=DEVICE), table, 1, bucket(r), bucket(k),
        SPLIT_R=True, ACC=TL.float32, PRECISION="tf32",
    )  # fmt: skip
    Md, Rd = M.cpu().double(), res.cpu().double().view(r, r)
    exact = 4 / r**2 * Md @ Rd
    scale = 4 / r**2 * Md.abs() @ Rd.abs()
    err = ((out.cpu().double().view(k, r) - exact).abs() / scale).max()
    once = ((4 / r**2 * Md @ Rd.to(dtype).double() - exact).abs() / scale).max()
    assert err <= 2**-19 and once >= 2**-15, (float(err), float(once))
