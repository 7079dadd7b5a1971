"""SVD → plain torch: `compress` replaces every SVD layer by its low-rank pair or one dense
layer, chosen by a policy: the cost model's MAC rule ("flops", `svdkern.costs`), measured
times ("latency", timed by `svdkern.tune` in the runtime the model will be deployed in,
`svdkern.runtimes`), or always one form; optionally batch norm folded into the convs before
it (`svdkern.fold`), and a `CompressReport` of what was deployed and why.

Example::

    deployable = svdkern.compress(model, input_shape=(1, 3, 32, 32))   # plain nn modules
    fast = svdkern.compress(model, "latency", [(1, 3, 32, 32), (256, 3, 32, 32)])
    fast, report = svdkern.compress(
        model.eval(), "latency", [(1, 3, 32, 32)], runtime="compile", fold_bn=True,
        tolerance=0.05, report=True,
    )
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from svdkern import runtimes, tune
from svdkern.costs import CostModel
from svdkern.decompose import move_hooks
from svdkern.examples import Example
from svdkern.fold import fold_batchnorm
from svdkern.nn import SVDLayer, SVDMultiheadAttention, svd_layers
from svdkern.tables import format_table
from svdkern.trace import modes_kept

__all__ = ["POLICIES", "CompressReport", "DeployedLayer", "compress"]

POLICIES = ("flops", "latency", "lowrank", "dense")
# The whole-model candidates of policy "latency", in the order identical ones are dropped:
# a candidate whose forms equal an earlier one's is not timed (nor compiled) again.
CANDIDATES = {
    "dense": "every layer dense",
    "latency": "the pair where that layer alone was faster in the runtime",
    "flops": "the pair where it costs fewer MACs (the MAC rule)",
    "lowrank": "every layer as its pair",
}


@dataclass
class DeployedLayer:
    """One SVD layer of a compressed model: its deployed form ("lowrank" or "dense"), the
    deployed form's parameters and MACs (at the first example; None without one), its rank,
    and, under policy "latency", {input shape: {form: median ms}} of its forms timed alone
    in the runtime."""

    name: str
    form: str
    rank: int
    full_rank: int
    params: int | None
    macs: int | None
    times_ms: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class CompressReport:
    """What `compress` deployed and why.

    chosen: the candidate deployed (a policy name; under "latency" one of `CANDIDATES`);
    why: that choice in words; layers: a DeployedLayer per SVD layer; folded: the (conv,
    batch norm) pairs folded; params: parameters of the deployed model; candidates:
    {name: {"params", "pairs" (layers as low-rank pairs), "ms" (per example, first
    timing), "confirm_ms" (second timing, the winner's and dense's)}}; shapes: the example
    input shapes the times are for (in order).
    """

    policy: str
    runtime: str
    tolerance: float
    fold_bn: bool
    chosen: str
    why: str
    params: int
    shapes: list[str] = field(default_factory=list)
    layers: list[DeployedLayer] = field(default_factory=list)
    folded: list[tuple[str, str]] = field(default_factory=list)
    candidates: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        rows = []
        for lay in self.layers:
            times = "; ".join(
                f"{shape}: dense {t['dense']:.3f} / pair {t['lowrank']:.3f}"
                for shape, t in lay.times_ms.items()
            )
            rows.append(
                (
                    lay.name,
                    f"{lay.rank}/{lay.full_rank}",
                    lay.form,
                    "-" if lay.params is None else f"{lay.params:,}",
                    "-" if lay.macs is None else f"{lay.macs:,}",
                    times or "-",
                )
            )
        header = ("layer", "rank", "form", "params", "MACs", f"alone ms ({self.runtime})")
        text = format_table(header, rows)
        for name, c in self.candidates.items():
            ms = ", ".join(f"{t:.3f}" for t in c.get("ms", [])) or "not timed"
            again = ", ".join(f"{t:.3f}" for t in c.get("confirm_ms", []))
            again = f", again {again} ms" if again else ""
            text += f"\ncandidate {name} ({c['pairs']} pairs, {c['params']:,} params): {ms} ms"
            text += again
        if self.shapes:
            text += f"\ntimes at {', '.join(self.shapes)} in runtime {self.runtime!r}"
        if self.folded:
            bns = ", ".join(bn for _, bn in self.folded)
            text += f"\nbatch norm folded: {len(self.folded)} ({bns})"
        return text + (
            f"\ndeployed: {self.chosen} ({self.why}); {self.params:,} params; {self.seconds:.1f} s"
        )


def _plain_like(twin: nn.Module, plain: nn.Module) -> nn.Module:
    """`plain` with `twin`'s hooks and, for an SVD layer, its frozen flags: a frozen U
    freezes every weight of the plain form, a frozen bias its bias."""
    move_hooks(twin, plain)
    if isinstance(twin, SVDLayer):
        for pname, p in plain.named_parameters():
            source = twin.bias if pname.endswith("bias") else twin.U
            p.requires_grad_(source.requires_grad)
    return plain


def compress(
    model: nn.Module,
    policy: str = "flops",
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
    *,
    example_inputs=None,
    example_kwargs: Mapping | None = None,
    example: Example | None = None,
    runtime: str = "eager",
    fold_bn: bool = False,
    tolerance: float = 0.0,
    report: bool = False,
) -> nn.Module | tuple[nn.Module, CompressReport]:
    """A new model (deep copy) in which every SVD layer is a plain torch module.

    Each SVDLinear becomes nn.Sequential(Linear(in, r, bias=False), Linear(r, out)), each
    SVDConv2d / SVDConv1d the pair of convolutions of its chain (s folded into the first
    factor), or a single dense nn.Linear / nn.Conv2d / nn.Conv1d. An SVDMultiheadAttention
    whose projections all go dense becomes an nn.MultiheadAttention again; otherwise it
    stays, holding plain projections. Without SVDMultiheadAttention the result needs no
    svdkern import to run and works with torch.jit.script / trace and torch.export. Hooks
    of an SVD layer move to its plain form, and a frozen layer's plain form is frozen.
    Hooks svdkern itself registered are not kept, such as the input hook of
    `svdkern.set_memory_format(model, "channels_last")`: weights keep their memory format,
    and the layout of the inputs is the caller's (`x.contiguous(memory_format=
    torch.channels_last)`). The global random state (CPU, and the model's CUDA devices)
    is left as compress found it.

    A layer whose weight its parent reads directly (`F.linear(x, self.qkv.weight, ...)`)
    becomes one dense layer under every policy, so that `.weight` still exists (a pair
    would make the parent fail, and composing the weight saves nothing). Such reads are
    found on the example (input_shape or example_inputs; `svdkern.trace.weight_reads`, the
    list `flops` and `prune` count with), or were found by `decompose` given example inputs
    (`SVDLayer.weight_read`).

    Args:
        model: a model with SVD layers (left unchanged).
        policy: "flops" (low-rank pair where it costs fewer MACs than dense, else dense:
            `svdkern.costs.LayerCost.lowrank`),
            "latency" (measured on the model's device at every input_shape, in `runtime`:
            up to four whole models are timed, the one with the low-rank pair where that
            layer's forward alone was ≥ 5% faster than dense (`svdkern.tune_forms`), the
            one the "flops" rule builds, the all-lowrank and the all-dense one (identical
            ones once); the fastest on average among those not slower than the all-dense
            one at any input_shape (by more than 2%, the resolution of one timing) is
            returned if a second timing against the all-dense one confirms that),
            "lowrank" (always the pair) or "dense" (always one dense layer).
        input_shape: input shape for the MAC comparison of policy "flops" (see
            `svdkern.flops`; a zero float input of the model's dtype); without it, the
            comparison is per output element (exact for Linear and channel convs;
            spatial convs assume W_in = stride·W_out). Policy "latency" needs it (or
            example_inputs) and also takes a list of shapes (e.g. batch 1 and batch 256)
            to be fast at all of them.
        example_inputs: instead of input_shape, a tensor or a tuple of the model's
            positional arguments (any dtype, e.g. Long token ids).
        example_kwargs: keyword arguments of that forward.
        example: an `svdkern.Example` instead of the three.
        runtime: where policy "latency" times the layers and the whole models, the
            runtime the model will be deployed in (`svdkern.runtimes`): "eager",
            "compile" (torch.compile, inductor with freezing, no grad; CUDA graphs on
            CUDA: every layer form and candidate is compiled at every example, so this
            takes minutes for a ResNet on a small CPU) or "onnxruntime" (exported with
            torch.onnx.export and run in ONNX Runtime on the CPU; `pip install
            svdkern[deploy]`). Every form is checked to give the eager outputs within
            `svdkern.runtimes.TOLERANCES`. The returned model is always the plain torch
            module: compile or export it as it was timed.
        fold_bn: fold every eval-mode BatchNorm that follows a conv (or an SVD conv) into
            it: the deployed pair's second conv or the dense conv gets the scaled weight
            and a bias, the BatchNorm becomes nn.Identity (`svdkern.fold`). Off by default:
            the deployed model then keeps the SVD model's modules and state_dict keys,
            and trains like it. Folding needs eval mode (ValueError naming the batch norms
            otherwise); a folded model behaves in train mode as in eval.
        tolerance: policy "latency" only, ≥ 0: trade up to this fraction of speed for
            size. A layer alone takes the pair when it is at most this much slower than
            dense (instead of ≥ 5% faster), and a candidate may be this much slower than
            dense at an example; among the candidates whose mean time is within
            (1 + tolerance) of the fastest, the one with the fewest parameters is
            deployed. 0 (default): the fastest, never slower than dense.
        report: also return a `CompressReport`: per layer its form, parameters, MACs and
            times alone; the candidates' parameters and times; the pairs folded.
    Returns:
        the new model (and, with report=True, the tuple (model, CompressReport)); outputs
        equal the SVD model's up to float rounding.
    Raises:
        ValueError: an unknown policy or runtime, runtime or tolerance without policy
            "latency", a missing example, fold_bn on batch norms in training mode.
        RuntimeError: the runtime is not installed, or the model does not compile /
            export in it, or runs there with other outputs (the cause chained).

    Example::

        deployable = svdkern.compress(model, input_shape=(1, 3, 32, 32))
        torch.jit.script(deployable)
        fast = svdkern.compress(model, "latency", [(1, 3, 32, 32), (256, 3, 32, 32)])
        lm = svdkern.compress(gpt, example_inputs=(ids,), example_kwargs={"use_cache": False})
        onnx_ready, why = svdkern.compress(
            model.eval(), "latency", (1, 3, 32, 32), runtime="onnxruntime", fold_bn=True,
            report=True,
        )
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    runtimes.check_runtime(runtime)
    if runtime != "eager" and policy != "latency":
        raise ValueError(
            f"runtime={runtime!r} is where policy='latency' times the forms; policy "
            f"{policy!r} times nothing (compile or export its result as you deploy it)"
        )
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise TypeError(f"tolerance must be a float, got {type(tolerance).__name__}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite fraction ≥ 0, got {tolerance!r}")
    if tolerance and policy != "latency":
        raise ValueError(
            f"tolerance={tolerance!r} trades measured speed for size: policy 'latency' only, "
            f"got policy {policy!r}"
        )
    example = Example.of(input_shape, example_inputs, example_kwargs, example)
    if policy == "latency" and example is None:
        raise ValueError(
            "policy='latency' needs input_shape (one shape or a list, e.g. [(1, 3, 32, 32), "
            "(256, 3, 32, 32)]) or example_inputs: forms are timed at the inputs the model "
            "will see"
        )
    if policy != "latency" and example is not None:
        example = example.single(f"compress(policy={policy!r})")
    tensors = [*model.parameters(), *model.buffers()]
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    # The plain layers' constructors and the latency policy's inputs draw random numbers.
    start = time.perf_counter()
    with torch.random.fork_rng(devices=cuda):
        deployed, what = _compress(model, policy, example, runtime, fold_bn, float(tolerance))
    deployed = _without_svdkern_hooks(deployed)
    if not report:
        return deployed
    what.seconds = time.perf_counter() - start
    return deployed, what


def _compress(
    model: nn.Module,
    policy: str,
    example: Example | None,
    runtime: str,
    fold_bn: bool,
    tolerance: float,
) -> tuple[nn.Module, CompressReport]:
    """`compress` (arguments checked), svdkern's hooks still in place: the latency policy
    times the candidates as the SVD model runs (channels-last inputs under
    set_memory_format). The MAC rule and the layers read through .weight come from the
    example's first input shape."""
    costs = CostModel.from_model(model, None if example is None else example.first())
    examples = example.calls(model, fill=torch.randn) if policy == "latency" else []
    forms = tune.inference_forms(model, examples, runtime) if policy == "latency" else []
    measured = tune.lowrank_faster(forms, tolerance)

    def lowrank_of(rule: str) -> Callable[[str], bool]:
        def choose(name: str) -> bool:
            if costs.layers[name].weight_read:
                return False
            if rule == "flops":
                return costs.layers[name].lowrank()
            if rule == "latency":
                return measured.get(name, False)
            return rule == "lowrank"

        return choose

    def build(rule: str) -> tuple[nn.Module, list[tuple[str, str]]]:
        deployed = _deployed(model, lowrank_of(rule))
        return deployed, fold_batchnorm(deployed) if fold_bn else []

    names = [name for name, _ in svd_layers(model)]
    candidates: dict[str, tuple[nn.Module, list[tuple[str, str]]]] = {}
    info: dict[str, dict] = {}
    choice = None
    if policy != "latency":
        chosen, why = policy, f"policy {policy!r}"
        candidates[policy] = build(policy)
    elif all(not lowrank_of(rule)(name) for rule in CANDIDATES for name in names):
        chosen, why = "dense", "no layer can be a pair (every weight is read by its parent)"
        candidates["dense"] = build("dense")
    else:
        seen: set[tuple[bool, ...]] = set()
        for rule in CANDIDATES:
            forms_of = tuple(map(lowrank_of(rule), names))
            if forms_of not in seen:
                seen.add(forms_of)
                candidates[rule] = build(rule)
                info[rule] = {"pairs": sum(forms_of)}
        # Layers timed alone do not add up to the model's time (caches, one more op per
        # layer at batch 1, fusion in a compiler): the candidates are timed whole at every
        # example in the runtime, and the fastest that is nowhere slower than dense (by
        # more than 2%) is kept.
        params = {rule: _params(m) for rule, (m, _) in candidates.items()}
        with contextlib.ExitStack() as stack:
            for m, _ in candidates.values():
                stack.enter_context(modes_kept(m))
            running = {
                rule: runtimes.prepare(runtime, m, examples) for rule, (m, _) in candidates.items()
            }
            choice = tune.fastest_not_slower(running, examples, tolerance, params)
            del running
        chosen = choice.chosen
        why = _why(chosen, choice, runtime, tolerance)
    deployed, folded = candidates[chosen]
    what = CompressReport(
        policy=policy,
        runtime=runtime,
        tolerance=tolerance,
        fold_bn=fold_bn,
        chosen=chosen,
        why=why,
        params=_params(deployed),
        shapes=[_shape_of(args) for args, _ in examples],
        layers=_layers(model, deployed, costs, lowrank_of(chosen), forms),
        folded=folded,
    )
    for rule, (m, _) in candidates.items():
        entry = info.setdefault(rule, {"pairs": sum(map(lowrank_of(rule), names))})
        entry["params"] = _params(m)
        if choice is not None:
            entry["ms"] = choice.times_ms.get(rule, [])
            entry["confirm_ms"] = choice.confirm_ms.get(rule, [])
    what.candidates = info
    return deployed, what


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shape_of(args: tuple) -> str:
    x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return "×".join(map(str, x.shape)) if x is not None else "-"


def _why(chosen: str, choice: tune.ModelChoice, runtime: str, tolerance: float) -> str:
    """The choice of policy "latency" in words."""
    if chosen != "dense":
        how = f"within {tolerance:.0%} of the fastest and the smallest" if tolerance else "fastest"
        return (
            f"{CANDIDATES[chosen]}: {how} in {runtime}, nowhere slower than dense, confirmed "
            "by a second timing"
        )
    if choice.confirm_ms:
        return "the first timing's winner was not faster than dense when timed again"
    return f"no candidate with pairs was faster than dense at every example in {runtime}"


def _layers(
    model: nn.Module,
    deployed: nn.Module,
    costs: CostModel,
    lowrank_of: Callable[[str], bool],
    forms: Sequence[tune.LayerForm],
) -> list[DeployedLayer]:
    """A DeployedLayer per SVD layer of `model` as `deployed` holds it."""
    modules = dict(deployed.named_modules())
    out = []
    for name, layer in svd_layers(model):
        lowrank = lowrank_of(name)
        plain = modules.get(name)
        cost = costs.layers.get(name)
        macs = None
        if cost is not None and cost.calls is not None:
            macs = cost.svd() if lowrank else cost.dense()
        out.append(
            DeployedLayer(
                name,
                "lowrank" if lowrank else "dense",
                layer.rank,
                layer.full_rank,
                None if plain is None else _params(plain),
                macs,
                {
                    "×".join(map(str, f.input_shape)): dict(f.times_ms)
                    for f in forms
                    if f.name == name
                },
            )
        )
    return out


def _deployed(model: nn.Module, lowrank_of: Callable[[str], bool]) -> nn.Module:
    """A deep copy of `model` with every SVD layer replaced by its low-rank pair (where
    `lowrank_of(name)`) or its dense layer; see `compress`."""
    new = copy.deepcopy(model)
    plain: dict[int, nn.Module] = {}
    dense_names: set[str] = set()
    for name, twin in svd_layers(new):
        lowrank = lowrank_of(name)
        if not lowrank:
            dense_names.add(name)
        plain[id(twin)] = _plain_like(twin, twin.to_lowrank() if lowrank else twin.to_dense())
    for name, twin in new.named_modules():
        if not isinstance(twin, SVDMultiheadAttention):
            continue
        prefix = f"{name}." if name else ""
        children = [(prefix + n, c) for n, c in twin.named_modules() if c is not twin]
        svd = [(n, c) for n, c in children if isinstance(c, SVDLayer)]
        if all(n in dense_names for n, _ in svd):
            for _, child in svd:
                plain.pop(id(child), None)
            plain[id(twin)] = _plain_like(twin, twin.to_dense())
    if id(new) in plain:
        return plain[id(new)]
    for _, parent in list(new.named_modules()):
        for child_name, child in list(parent._modules.items()):
            if id(child) in plain:
                setattr(parent, child_name, plain[id(child)])
    return new


def _without_svdkern_hooks(model: nn.Module) -> nn.Module:
    """`model` with the hooks whose function svdkern defines (set_memory_format's input
    hook) removed from every module: they would make the deployed model need svdkern
    (pickle) and fail torch.jit.script."""
    tables = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    flags = (
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
    )
    for module in model.modules():
        for attr in tables:
            table = getattr(module, attr)
            for key, hook in list(table.items()):
                if (getattr(hook, "__module__", None) or "").split(".")[0] == "svdkern":
                    del table[key]
                    for flag in flags:
                        getattr(module, flag).pop(key, None)
    return model
