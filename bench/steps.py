"""Training-step scenarios shared by the CPU and GPU benchmarks, and their FLOP model.

A scenario is a model, a batch and a dtype; a provider is how one optimizer step
(forward, backward, regularizers, update) is taken on it:

    dense               the model as it is
    svdkern             decompose → SVD layers (auto path), one grouped compose for the
                        model (svdkern.grouped_compose) + SVDRegularizer (grouped ops)
    reference           the same SVD model in plain PyTorch: every layer composes
                        W = U·diag(s)·Vᵀ, losses per layer (svdkern.ops.reference_mode)
    compiled-reference  the reference step's forward + losses under torch.compile
    trp                 dense weights, SVD of every layer every step (nuclear-norm
                        gradient, energy-rule truncation), as trained rank pruning does
    dense-compiled      the dense step's forward + loss under torch.compile
    dense-channels-last the dense model run channels-last (`svdkern.set_memory_format`):
                        the baseline for what the layout alone buys, since tuned svdkern
                        steps may choose that layout
    svdkern-compiled    the svdkern step's forward + losses under torch.compile (each layer
                        composes its own W inside the graph: no grouped compose)

With rho < 1 every SVD layer is cut to rank max(1, round(rho·full rank)) before the step
is built (svdkern providers: forms and memory format tuned by `svdkern.tune_forms(...,
memory_format="auto")` unless tune=False; the reference keeps compose-then-dense and the
contiguous layout, the plain PyTorch way).

`step_macs` gives the multiply-accumulates one step must do for each provider, so a
measured time ratio can be set against the ideal ratio.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import svdkern
from svdkern import ops
from svdkern.tune import set_memory_format

PROVIDERS = ("dense", "svdkern", "reference", "compiled-reference", "trp")
# The rank-cut training-step benchmark: dense (eager, compiled) and, per rho, these three.
RANK_PROVIDERS = ("svdkern", "svdkern-compiled", "compiled-reference")
DENSE_PROVIDERS = ("dense", "dense-compiled", "dense-channels-last")
ALL_PROVIDERS = (*PROVIDERS, "dense-compiled", "dense-channels-last", "svdkern-compiled")
LAMBDA_ORTH, LAMBDA_SPARSITY, TRP_NUCLEAR, TRP_ENERGY = 1.0, 0.07, 1e-4, 1e-3


def mlp_stack(width: int, depth: int, classes: int = 10) -> nn.Module:
    """`depth` Linear(width, width) + ReLU layers, then a classifier `fc`."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers)
    model.add_module("fc", nn.Linear(width, classes))
    return model


@dataclass(frozen=True)
class Scenario:
    """One benchmarked training step: a model, its input shape (with batch) and dtype."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    classes: int = 10
    dtype: torch.dtype = torch.float32  # bf16 means torch.autocast(bf16), params stay fp32

    @property
    def batch(self) -> int:
        return self.input_shape[0]


def scenario(name: str, batch: int, dtype: torch.dtype = torch.float32) -> Scenario:
    """The named scenarios of the benchmarks: resnet20, digits-mlp, mlp-stack[-W-D]."""
    from svdkern.train.models import build_model

    if name == "resnet20":
        return Scenario(
            name, lambda: build_model("resnet20", (3, 32, 32), 10), (batch, 3, 32, 32), dtype=dtype
        )
    if name == "digits-mlp":
        return Scenario(
            name, lambda: build_model("mlp", (1, 8, 8), 10), (batch, 1, 8, 8), dtype=dtype
        )
    if name.startswith("mlp-stack"):
        width, depth = (int(v) for v in name.split("-")[2:4]) if name != "mlp-stack" else (4096, 12)
        return Scenario(name, lambda: mlp_stack(width, depth), (batch, width), dtype=dtype)
    raise ValueError(f"unknown scenario {name!r}; expected resnet20, digits-mlp or mlp-stack[-W-D]")


def _skip_fc(name: str, module: nn.Module) -> bool:
    return name == "fc" or name.endswith(".fc")


def _decomposed(model: nn.Module, mode: str) -> nn.Module:
    svdkern.decompose(model, skip=_skip_fc)
    for module in model.modules():
        if isinstance(module, (svdkern.SVDLinear, svdkern.SVDConv2d)):
            module.mode = mode
    return model


def _dense_layers(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not _skip_fc(name, m)
    ]


@torch.no_grad()
def _trp_update(layers: list[nn.Module]) -> None:
    """Per layer: add λ·U·Vᵀ (the nuclear norm's gradient) to the weight's gradient and
    replace the weight by its energy-rule truncated SVD."""
    for layer in layers:
        W = layer.weight.flatten(1)
        U, s, Vh = torch.linalg.svd(W.float(), full_matrices=False)
        if layer.weight.grad is not None:
            layer.weight.grad += TRP_NUCLEAR * (U @ Vh).view_as(layer.weight).to(W.dtype)
        energy = torch.cumsum(s**2, 0) / (s**2).sum().clamp_min(1e-30)
        k = int(torch.searchsorted(energy, torch.tensor(1 - TRP_ENERGY, device=s.device))) + 1
        layer.weight.copy_(((U[:, :k] * s[:k]) @ Vh[:k]).view_as(layer.weight))


def cut_ranks(model: nn.Module, rho: float) -> None:
    """Cut every SVD layer to rank max(1, round(rho · full rank)), keeping the largest |s|."""
    for module in model.modules():
        if isinstance(module, (svdkern.SVDLinear, svdkern.SVDConv2d)):
            module.prune_(max(1, min(module.rank, round(rho * module.full_rank))))


def make_step(
    sc: Scenario,
    provider: str,
    device: str | torch.device = "cpu",
    compile_backend: str = "inductor",
    rho: float = 1.0,
    tune: bool = False,
) -> Callable[[], None]:
    """A zero-argument callable taking one Adam step of `provider` on scenario `sc`, with
    SVD layers at rank fraction `rho` and (svdkern providers, `tune`) measured forms."""
    if provider not in ALL_PROVIDERS:
        raise ValueError(f"provider must be one of {ALL_PROVIDERS}, got {provider!r}")
    device = torch.device(device)
    torch.manual_seed(0)
    model = sc.build().to(device)
    x = torch.randn(sc.input_shape, device=device)
    y = torch.randint(0, sc.classes, (sc.batch,), device=device)

    reference = provider in ("reference", "compiled-reference")
    ours = provider in ("svdkern", "svdkern-compiled")
    reg = None
    if ours or reference:
        _decomposed(model, "compose" if reference else "auto")
        if rho < 1.0:
            cut_ranks(model, rho)
        if ours and tune:
            svdkern.tune_forms(model, x, training=True, memory_format="auto")
        reg = svdkern.SVDRegularizer(
            model, orth=LAMBDA_ORTH, sparsity="hoyer", strength=LAMBDA_SPARSITY
        )
    if provider == "dense-channels-last":
        set_memory_format(model, "channels_last")
    trp_layers = _dense_layers(model) if provider == "trp" else []
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    autocast = sc.dtype in (torch.bfloat16, torch.float16)

    grouped = (
        svdkern.grouped_compose if provider == "svdkern" else lambda model: contextlib.nullcontext()
    )

    def loss_fn() -> torch.Tensor:
        with torch.autocast(device.type, dtype=sc.dtype, enabled=autocast), grouped(model):
            loss = F.cross_entropy(model(x), y)
        return loss if reg is None else loss + reg(model)["total"]

    if provider in ("compiled-reference", "dense-compiled", "svdkern-compiled"):
        loss_fn = torch.compile(loss_fn, backend=compile_backend)

    def step() -> None:
        ctx = ops.reference_mode() if reference else contextlib.nullcontext()
        with ctx:
            loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        _trp_update(trp_layers)
        opt.step()

    return step


# ---------------------------------------------------------------- FLOP model


def _layer_shapes(sc: Scenario) -> list[tuple[int, int, int]]:
    """(rows, m, n) of every decomposable layer: a conv is a GEMM of (N·H_out·W_out) rows
    by c_out × (c_in·kh·kw). Shapes are read from one forward of a single sample."""
    model = sc.build()
    shapes: list[tuple[int, int, int]] = []

    def record(module, args, out):
        rows = out[0, 0].numel() if out.dim() == 4 else 1
        shapes.append((rows * sc.batch, module.weight.shape[0], module.weight[0].numel()))

    hooks = [layer.register_forward_hook(record) for layer in _dense_layers(model)]
    with torch.no_grad():
        model(torch.zeros(1, *sc.input_shape[1:]))
    for hook in hooks:
        hook.remove()
    return shapes


def step_macs(sc: Scenario, rho: float = 1.0) -> dict[str, float]:
    """Multiply-accumulates of one training step of the decomposable layers, per provider.

    dense:    3·B·m·n per layer (forward, grad input, grad weight).
    svdkern:  full-rank layer (r = min(m, n)) in its cheaper form, plus the regularizer:
              compose form: 3·B·m·n + 3·m·n·r (compose forward and backward);
              chain form:   3·B·r·(m + n);
              orth:         per factor M (k×r) a symmetric Gram k·r²/2 and its backward
                            k·r² (M·(MᵀM − I)), i.e. 1.5·(m + n)·r² per layer.
    reference: compose form always, orth as autograd does it: Gram k·r² + backward 2·k·r².
    At rank fraction rho, r = max(1, round(rho·min(m, n))).
    The ideal ratio of svdkern to dense is svdkern / dense. Other layers (the classifier,
    batch norm, activations) are left out on both sides.
    """
    dense = svd = ref = 0.0
    for rows, m, n in _layer_shapes(sc):
        r = max(1, round(rho * min(m, n)))
        dense += 3 * rows * m * n
        compose_form = 3 * rows * m * n + 3 * m * n * r
        chain_form = 3 * rows * r * (m + n)
        svd += min(compose_form, chain_form) + 1.5 * (m + n) * r * r
        ref += compose_form + 3 * (m + n) * r * r
    return {
        "dense": dense,
        "dense-compiled": dense,
        "dense-channels-last": dense,
        "svdkern": svd,
        "svdkern-compiled": svd,
        "reference": ref,
        "compiled-reference": ref,
    }
