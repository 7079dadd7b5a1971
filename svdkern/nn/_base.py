"""The machinery every SVD layer shares (`SVDLayer`) and optimizer-state surgery for
rank cuts.

A layer keeps its weight, viewed as a matrix W (m × n), as W = U·diag(s)·Vᵀ with
parameters U (m × r), s (r,), V (n × r) and an optional bias (docs/ARCHITECTURE.md §1, §4).
`forward` either composes W with `svdkern.ops.compose` and runs the dense layer,
or runs the low-rank chain (x·V, scale by s, ·Uᵀ) without forming W, whichever
costs fewer multiply-accumulates (MACs) for the input at hand, unless a form measured
by `svdkern.tune_forms` is fixed for that input shape:

    compose path:  m·n·r (compose) + rows·m·n (dense layer)
    chain path:    rows·r·(m + n)          (rows = input rows, or output pixels for a conv)

A subclass gives the matrix view of its weight (`_matrix_from_weight`,
`_weight_from_matrix`), its costs (`macs`), its cache key (`geometry`) and `forward`.

What the modules above `nn` use of a layer is its public protocol: `rank`, `full_rank`,
`matrix_shape` (m, n), `macs`, `geometry`, `forms` / `set_form` / `clear_forms`, `prune_`,
`resize_` and `weight_read`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from svdkern import ops

MODES = ("auto", "compose", "chain")

_init_parameters = True
# The instance-dict key of `SVDLayer.weight_read` (kept as it was, so pickled models keep it).
_READ_KEY = "_svdkern_weight_read"


@contextlib.contextmanager
def _uninitialized() -> Iterator[None]:
    """Construct layers without their random init (from_dense overwrites every value)."""
    global _init_parameters
    previous, _init_parameters = _init_parameters, False
    try:
        yield
    finally:
        _init_parameters = previous


def _ntuple(value, n: int, name: str) -> tuple[int, ...]:
    """`value` (an int, or a sequence of n ints) as an n-tuple of ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    if isinstance(value, Sequence) and len(value) == n and all(isinstance(v, int) for v in value):
        return tuple(int(v) for v in value)
    what = "a 1-tuple" if n == 1 else "a pair of ints" if n == 2 else f"{n} ints"
    raise ValueError(f"{name} must be an int or {what}, got {value!r}")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _svd64(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD in float64: W = U·diag(s)·Vᵀ with U (m×k), s (k,), V (n×k), k = min(m, n)."""
    U, s, Vh = torch.linalg.svd(W.detach().to(torch.float64), full_matrices=False)
    return U, s, Vh.mT


def _check_finite_weight(weight: torch.Tensor) -> None:
    """Raise for a weight with NaN or inf entries (the SVD fails or returns NaN factors)."""
    weight = weight.detach()
    if weight.device.type == "meta" or bool(torch.isfinite(weight).all()):
        return
    nan, inf = int(weight.isnan().sum()), int(weight.isinf().sum())
    raise ValueError(
        f"weight of shape {list(weight.shape)} is not finite ({nan} NaN, {inf} inf of "
        f"{weight.numel()} entries), so it has no SVD; fix or reinitialize it (e.g. reload a "
        "checkpoint saved before training diverged)"
    )


class SVDLayer(nn.Module):
    """Base of the SVD layers: parameters U (m×r), s (r,), V (n×r), bias; the forward
    path choice, rank cuts and rank-aware state-dict loading."""

    _m: int
    _n: int
    # The path the last forward took; `grouped_compose` composes the layers that did not
    # take the chain.
    _last_chain: bool = False
    # Inside a `grouped_compose` block: this layer's W from the model's one grouped call.
    _grouped_matrix: torch.Tensor | None = None

    def _make_parameters(self, rank: int | None, bias_size: int | None, factory) -> None:
        self._forms: dict[tuple[bool, tuple[int, ...]], bool] = {}
        full = min(self._m, self._n)
        if rank is None:
            rank = full
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
            raise ValueError(
                f"rank must be an int in [1, {full}] (min of the weight's {self._m}×{self._n} "
                f"matrix) or None for full rank, got {rank!r}"
            )
        self.U = nn.Parameter(torch.empty(self._m, rank, **factory))
        self.s = nn.Parameter(torch.empty(rank, **factory))
        self.V = nn.Parameter(torch.empty(self._n, rank, **factory))
        if bias_size is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(torch.empty(bias_size, **factory))

    @property
    def rank(self) -> int:
        """Current rank r (number of singular values kept)."""
        return self.s.shape[0]

    @property
    def full_rank(self) -> int:
        """min(m, n) of the weight matrix: the rank of an unpruned layer."""
        return min(self._m, self._n)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(m, n) of the matrix view W = U·diag(s)·Vᵀ: U is m × r, V is n × r."""
        return (self._m, self._n)

    @property
    def weight_read(self) -> str | None:
        """Why this layer's parent reads its `.weight` instead of calling it (set by
        `svdkern.decompose` given example inputs), or None: `svdkern.compress` keeps such a
        layer dense and the cost model counts it dense (`svdkern.costs`)."""
        return self.__dict__.get(_READ_KEY)

    @weight_read.setter
    def weight_read(self, reason: str | None) -> None:
        if reason is None:
            self.__dict__.pop(_READ_KEY, None)
        else:
            self.__dict__[_READ_KEY] = str(reason)

    @property
    def mode(self) -> str:
        """Forward path: "auto" (the form fixed by `set_form` / `svdkern.tune_forms` for
        the input shape, else the cheaper by the MAC cost model), "compose" or "chain"."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = _check_mode(value)

    # --- the weight as a matrix ----------------------------------------------------------

    def _matrix_from_weight(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _weight_from_matrix(self, W: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def macs(self, input_shape: Sequence[int], rank: int | None = None) -> tuple[int, int]:
        """(dense MACs, chain MACs at `rank`, default the current rank) of one call on an
        input of `input_shape`; the chain's MACs are linear in the rank."""
        raise NotImplementedError

    @property
    def geometry(self) -> tuple:
        """Everything but the rank that fixes the cost of a forward (the tuning cache key)."""
        raise NotImplementedError

    def _use_chain(self, input_shape: Sequence[int]) -> bool:
        if self._mode != "auto":
            chain = self._mode == "chain"
        else:
            # A form measured by `svdkern.tune_forms` for this rank, input shape and
            # train/eval state wins; otherwise the MAC rule.
            chain = self._forms.get((self.training, tuple(input_shape)))
            if chain is None:
                dense, chain_macs = self.macs(input_shape)
                chain = chain_macs <= self._m * self._n * self.rank + dense
        self._last_chain = chain
        return chain

    def set_form(self, input_shape: Sequence[int], chain: bool, training: bool = True) -> None:
        """Fix the path `mode="auto"` takes for inputs of `input_shape` at the current rank
        (in training or eval mode); `svdkern.tune_forms` sets it from measured times.
        A rank change forgets every fixed form."""
        self._forms[(bool(training), tuple(int(d) for d in input_shape))] = bool(chain)

    @property
    def forms(self) -> dict[tuple[bool, tuple[int, ...]], bool]:
        """Fixed forms: {(training, input_shape): chain?} (empty: the MAC rule decides)."""
        return dict(self._forms)

    def clear_forms(self) -> None:
        """Forget every fixed form: `mode="auto"` follows the MAC rule again."""
        self._forms.clear()

    def _matrix(self) -> torch.Tensor:
        """W = U·diag(s)·Vᵀ as a matrix: from `grouped_compose` inside its block, else composed."""
        W = self._grouped_matrix
        return ops.compose(self.U, self.s, self.V) if W is None else W

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight U·diag(s)·Vᵀ in the dense layer's shape (differentiable)."""
        return self._weight_from_matrix(self._matrix())

    @torch.no_grad()
    def _filled(self, dense: nn.Module) -> nn.Module:
        """`dense` (a new module of the dense layer's kind) given this layer's weight
        U·diag(s)·Vᵀ, bias and train/eval mode."""
        dense.weight.copy_(self.weight)
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense.train(self.training)

    @torch.no_grad()
    def _init_from_weight(self, weight: torch.Tensor) -> None:
        """Set U, s, V to the top-`rank` factors of an exact float64 SVD of `weight`."""
        _check_finite_weight(weight)
        U, s, V = _svd64(self._matrix_from_weight(weight))
        r = self.rank
        self.U.copy_(U[:, :r])
        self.s.copy_(s[:r])
        self.V.copy_(V[:, :r])

    @torch.no_grad()
    def _copy_from_dense(self, dense: nn.Module) -> SVDLayer:
        """Factors from `dense.weight`, its bias and its train/eval mode; returns self."""
        self._init_from_weight(dense.weight)
        if dense.bias is not None:
            self.bias.copy_(dense.bias)
        return self.train(dense.training)

    # --- rank changes ----------------------------------------------------------------

    def _keep_indices(self, keep) -> torch.Tensor:
        r = self.rank
        if isinstance(keep, bool):
            raise TypeError(f"keep must be an int, an index tensor or a bool mask, got {keep!r}")
        if isinstance(keep, int):
            if not 1 <= keep <= r:
                raise ValueError(f"keep must be an int in [1, {r}] (the current rank), got {keep}")
            idx = torch.topk(self.s.detach().abs(), keep, sorted=False).indices
            return torch.sort(idx).values
        if not isinstance(keep, torch.Tensor):
            keep = torch.as_tensor(keep)
        keep = keep.to(self.s.device)
        if keep.dtype == torch.bool:
            if keep.shape != (r,):
                raise ValueError(
                    f"keep as a bool mask must have shape ({r},), got {list(keep.shape)}"
                )
            idx = keep.nonzero().flatten()
        elif not keep.dtype.is_floating_point and not keep.dtype.is_complex:
            idx = keep.flatten().long()
            if idx.numel() and (idx.min() < 0 or idx.max() >= r):
                raise ValueError(f"keep indices must lie in [0, {r}), got {idx.tolist()}")
            if idx.unique().numel() != idx.numel():
                raise ValueError(f"keep indices must be distinct, got {idx.tolist()}")
        else:
            raise TypeError(f"keep must be an int, an index tensor or a bool mask, got {keep!r}")
        if idx.numel() == 0:
            raise ValueError("keep must select at least one singular value, got none")
        return idx

    @torch.no_grad()
    def prune_(self, keep, optimizer: torch.optim.Optimizer | None = None) -> SVDLayer:
        """Keep some singular triplets and drop the rest physically (U, s, V sliced).

        Args:
            keep: int k (keep the k largest |s|, in their current order), a 1-D index
                tensor, or a bool mask of shape (rank,).
            optimizer: an optimizer holding U, s, V: its per-parameter state (Adam's
                exp_avg / exp_avg_sq / max_exp_avg_sq, SGD's momentum_buffer, ...) is
                sliced to the kept columns and moved, with scalar entries such as
                Adam's step, to the new parameters, which replace the old ones in its
                param groups. Training then goes on exactly as if the model had been
                built at the new rank with that state.
        Gradients (`.grad`) are sliced with the parameters, so a cut between
        `backward()` and `optimizer.step()` loses no step.
        Returns:
            self. U, s, V are new Parameters: without `optimizer`, rebuild optimizers.
        """
        idx = self._keep_indices(keep)
        # Everything is sliced and checked first, then committed: an optimizer whose state
        # cannot be sliced raises with the layer and the optimizer untouched.
        swaps = []
        for name, dim in (("U", 1), ("s", 0), ("V", 1)):
            old = getattr(self, name)
            new = nn.Parameter(old.index_select(dim, idx), old.requires_grad)
            if old.grad is not None:
                # A cut between backward() and step(): the step still sees this gradient.
                new.grad = old.grad.index_select(dim, idx.to(old.grad.device))
            state = None if optimizer is None else _sliced_state(optimizer, old, idx, dim)
            swaps.append((name, old, new, state))
        for name, old, new, state in swaps:
            if optimizer is not None:
                swap_param(optimizer, old, new, state)
            setattr(self, name, new)
        self.clear_forms()
        return self

    @torch.no_grad()
    def resize_(self, rank: int) -> SVDLayer:
        """Replace U, s, V by uninitialised parameters of rank `rank`, each keeping its
        requires_grad, dtype and device, before a checkpoint of that rank is loaded into
        them (`svdkern.load_state_dict`); fixed forms are forgotten. Returns self."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.full_rank:
            raise ValueError(f"rank must be an int in [1, {self.full_rank}], got {rank!r}")
        for name, shape in (("U", (self._m, rank)), ("s", (rank,)), ("V", (self._n, rank))):
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(old.new_empty(shape), old.requires_grad))
        self.clear_forms()
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        s = state_dict.get(prefix + "s")
        if isinstance(s, torch.Tensor) and s.dim() == 1 and s.shape[0] != self.rank:
            error_msgs.append(
                f"rank mismatch for {prefix[:-1] or 'the SVD layer'}: the checkpoint has rank "
                f"{s.shape[0]} but the module has rank {self.rank}; load pruned checkpoints "
                "with svdkern.load_state_dict(model, state_dict), which resizes SVD layers "
                "to the checkpoint's ranks"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _rank_repr(self) -> str:
        text = f"rank={self.rank}/{self.full_rank}"
        return text if self._mode == "auto" else f"{text}, mode={self._mode}"


def _sliced_state(
    optimizer: torch.optim.Optimizer, old: torch.Tensor, idx: torch.Tensor, dim: int
) -> dict | None:
    """`old`'s optimizer state with every tensor of `old`'s shape sliced by `idx` along
    `dim` (0-dim entries such as a step count kept as they are); None if it has none.
    Raises (changing nothing) for state that is neither per-element nor scalar."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    state = optimizer.state.get(old)
    if not state:
        return None
    moved = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == old.shape:
            value = value.index_select(dim, idx.to(value.device))
        elif isinstance(value, torch.Tensor) and value.dim() > 0:
            raise ValueError(
                f"optimizer state {key!r} of a parameter of shape {list(old.shape)} has "
                f"shape {list(value.shape)}; only per-element state (same shape) and "
                "scalars can be sliced to a new rank: rebuild this optimizer after pruning"
            )
        moved[key] = value
    return moved


def swap_param(
    optimizer: torch.optim.Optimizer, old: torch.Tensor, new: torch.Tensor, state: dict | None
) -> None:
    """Put `new` in `old`'s place in `optimizer`: its param-group slots and its state (a
    rank cut's sliced parameter, or under FSDP its gathered or resharded form)."""
    slots = [
        (group, i)
        for group in optimizer.param_groups
        for i, p in enumerate(group["params"])
        if p is old
    ]
    if not slots:
        return
    optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = state
    for group, i in slots:
        group["params"][i] = new


def svd_layers(model: nn.Module) -> list[tuple[str, SVDLayer]]:
    """(qualified name, module) of every SVD layer in `model`, in named_modules order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SVDLayer)]
