"""Drop-in SVD layers: `SVDLinear` and `SVDConv2d`.

A layer keeps its weight, viewed as a matrix W (m × n), as W = U·diag(s)·Vᵀ with
parameters U (m × r), s (r,), V (n × r) and an optional bias (DESIGN.md §1, §4).
`forward` either composes W with `svdkern.ops.compose` and runs the dense layer,
or runs the low-rank chain (x·V, scale by s, ·Uᵀ) without forming W, whichever
costs fewer multiply-accumulates (MACs) for the input at hand:

    compose path:  m·n·r (compose) + rows·m·n (dense layer)
    chain path:    rows·r·(m + n)          (rows = input rows, or output pixels for a conv)

Example::

    layer = SVDLinear.from_dense(nn.Linear(64, 32))   # exact: layer(x) == linear(x)
    layer.prune_(8)                                   # keep the 8 largest |s|
    pair = layer.to_lowrank()                         # Linear(64, 8) → Linear(8, 32)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from svdkern import ops

__all__ = ["SVDConv2d", "SVDLinear", "grouped_compose"]

MODES = ("auto", "compose", "chain")
DECOMPOSITIONS = ("channel", "spatial")

_init_parameters = True


@contextlib.contextmanager
def _uninitialized() -> Iterator[None]:
    """Construct layers without their random init (from_dense overwrites every value)."""
    global _init_parameters
    previous, _init_parameters = _init_parameters, False
    try:
        yield
    finally:
        _init_parameters = previous


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _svd64(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD in float64: W = U·diag(s)·Vᵀ with U (m×k), s (k,), V (n×k), k = min(m, n)."""
    U, s, Vh = torch.linalg.svd(W.detach().to(torch.float64), full_matrices=False)
    return U, s, Vh.mT


class _SVDBase(nn.Module):
    """Shared machinery of the SVD layers: parameters U (m×r), s (r,), V (n×r), bias."""

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

    def _macs(self, input_shape: Sequence[int], rank: int | None = None) -> tuple[int, int]:
        """(dense MACs, chain MACs at `rank`, default the current rank) for one input shape."""
        raise NotImplementedError

    def _geometry(self) -> tuple:
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
                dense, chain_macs = self._macs(input_shape)
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

    def _matrix(self) -> torch.Tensor:
        """W = U·diag(s)·Vᵀ as a matrix: from `grouped_compose` inside its block, else composed."""
        W = self._grouped_matrix
        return ops.compose(self.U, self.s, self.V) if W is None else W

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight U·diag(s)·Vᵀ in the dense layer's shape (differentiable)."""
        return self._weight_from_matrix(self._matrix())

    @torch.no_grad()
    def _init_from_weight(self, weight: torch.Tensor) -> None:
        """Set U, s, V to the top-`rank` factors of an exact float64 SVD of `weight`."""
        U, s, V = _svd64(self._matrix_from_weight(weight))
        r = self.rank
        self.U.copy_(U[:, :r])
        self.s.copy_(s[:r])
        self.V.copy_(V[:, :r])

    @torch.no_grad()
    def _copy_from_dense(self, dense: nn.Module) -> _SVDBase:
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
    def prune_(self, keep, optimizer: torch.optim.Optimizer | None = None) -> _SVDBase:
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
            state = None if optimizer is None else _sliced_state(optimizer, old, idx, dim)
            swaps.append((name, old, new, state))
        for name, old, new, state in swaps:
            if optimizer is not None:
                _swap_param(optimizer, old, new, state)
            setattr(self, name, new)
        self._forms.clear()
        return self

    @torch.no_grad()
    def _resize_(self, rank: int) -> None:
        """Replace U, s, V by uninitialised parameters of rank `rank` (before loading)."""
        for name, shape in (("U", (self._m, rank)), ("s", (rank,)), ("V", (self._n, rank))):
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(old.new_empty(shape), old.requires_grad))
        self._forms.clear()

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


class SVDLinear(_SVDBase):
    """Linear layer y = x·Wᵀ + b with W = U·diag(s)·Vᵀ kept factorized.

    Shapes: x (..., in_features) → y (..., out_features); U (out_features × r),
    s (r,), V (in_features × r), bias (out_features,). r = rank ≤ min(in, out).

    forward runs `ops.compose` + `F.linear` or the fused chain `ops.lowrank_linear`
    (((x·V)·diag(s))·Uᵀ + b), picking the one with fewer MACs: compose costs
    m·n·r + rows·m·n, the chain rows·r·(m + n) (m = out, n = in, rows = x.numel() / n);
    `mode="compose" | "chain"` forces a path.

    A new layer is initialised like `nn.Linear` (Kaiming-uniform weight), then factorized
    by SVD and truncated to `rank`.

    Example::

        layer = SVDLinear.from_dense(nn.Linear(128, 64))   # equal outputs at full rank
        y = layer(torch.randn(10, 128))                     # (10, 64)
        layer.prune_(16)                                    # rank 16
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        rank: int | None = None,
        *,
        mode: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._m, self._n = out_features, in_features
        self.mode = mode
        self._make_parameters(
            rank, out_features if bias else None, {"device": device, "dtype": dtype}
        )
        if _init_parameters:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's initialisation of a dense weight, factorized by SVD and truncated."""
        if self.U.device.type == "meta":
            return
        weight = torch.empty(self._m, self._n, dtype=torch.float64)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self._init_from_weight(weight)
        if self.bias is not None:
            bound = 1 / math.sqrt(self._n) if self._n > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, rank: int | None = None, *, mode: str = "auto"
    ) -> SVDLinear:
        """Exact factorization of `linear` (float64 SVD, cast back), optionally truncated."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        with _uninitialized():
            layer = cls(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                rank=rank,
                mode=mode,
                device=w.device,
                dtype=w.dtype,
            )
        return layer._copy_from_dense(linear)

    def _matrix_from_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def _weight_from_matrix(self, W: torch.Tensor) -> torch.Tensor:
        return W

    def _geometry(self) -> tuple:
        return ("linear", self._m, self._n, self.bias is not None)

    def _macs(self, input_shape: Sequence[int], rank: int | None = None) -> tuple[int, int]:
        r = self.rank if rank is None else rank
        rows = math.prod(input_shape[:-1])
        return rows * self._m * self._n, rows * r * (self._m + self._n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_chain(x.shape):
            return ops.lowrank_linear(x, self.U, self.s, self.V, self.bias)
        return F.linear(x, self._matrix(), self.bias)

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """nn.Linear with weight U·diag(s)·Vᵀ and the same bias."""
        dense = nn.Linear(
            self._n, self._m, self.bias is not None, device=self.U.device, dtype=self.U.dtype
        )
        dense.weight.copy_(self.weight)
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense.train(self.training)

    @torch.no_grad()
    def to_lowrank(self) -> nn.Sequential:
        """nn.Sequential(Linear(in, r, bias=False), Linear(r, out)); s folded into the first."""
        factory = {"device": self.U.device, "dtype": self.U.dtype}
        first = nn.Linear(self._n, self.rank, bias=False, **factory)
        second = nn.Linear(self.rank, self._m, self.bias is not None, **factory)
        first.weight.copy_((self.V * self.s).mT)
        second.weight.copy_(self.U)
        if self.bias is not None:
            second.bias.copy_(self.bias)
        return nn.Sequential(first, second).train(self.training)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self._rank_repr()}, bias={self.bias is not None}"
        )


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


def _swap_param(
    optimizer: torch.optim.Optimizer, old: torch.Tensor, new: torch.Tensor, state: dict | None
) -> None:
    """Put `new` in `old`'s place in `optimizer`: its param-group slots and its state."""
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


def _conv_out(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


class SVDConv2d(_SVDBase):
    """Conv2d whose weight (c_out, c_in, kh, kw) is kept as U·diag(s)·Vᵀ of a matrix view.

    decomposition="channel": W viewed as c_out × (c_in·kh·kw); U (c_out × r),
    V (c_in·kh·kw × r). Chain: conv with r filters of c_in×kh×kw (the layer's stride,
    padding, dilation), scale by s, 1×1 conv with U to c_out (+ bias).

    decomposition="spatial": W viewed as (c_in·kh) × (c_out·kw), row index (c_in, y),
    column index (c_out, x); U (c_in·kh × r), V (c_out·kw × r). Chain: (kh×1) conv
    c_in → r with stride (sh, 1), padding (ph, 0), dilation (dh, 1); scale by s;
    (1×kw) conv r → c_out with stride (1, sw), padding (0, pw), dilation (1, dw) (+ bias).

    Shapes: x (N, c_in, H, W) → y (N, c_out, H_out, W_out) as for nn.Conv2d.
    forward composes W (`ops.compose`) and runs `F.conv2d`, or runs the chain, whichever
    costs fewer MACs: compose m·n·r + P·m·n, chain P·r·(m + n) for channel (P = N·H_out·W_out)
    and N·H_out·W·r·m + P·r·n for spatial. groups must be 1 and padding_mode "zeros";
    padding may be ints, a pair, "valid" or "same" ("same" in spatial mode needs an even
    total padding dilation·(k − 1) per dimension, i.e. odd kernels).

    Example::

        conv = nn.Conv2d(16, 32, 3, padding=1)
        layer = SVDConv2d.from_dense(conv, decomposition="spatial")   # equals conv
        y = layer(torch.randn(2, 16, 8, 8))                           # (2, 32, 8, 8)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        rank: int | None = None,
        decomposition: str = "channel",
        *,
        mode: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if groups != 1:
            raise ValueError(
                f"SVDConv2d supports groups=1 only, got groups={groups}; leave grouped or "
                "depthwise convolutions dense"
            )
        if padding_mode != "zeros":
            raise ValueError(
                f"SVDConv2d supports padding_mode='zeros' only, got padding_mode={padding_mode!r}"
            )
        if decomposition not in DECOMPOSITIONS:
            raise ValueError(
                f"decomposition must be one of {DECOMPOSITIONS}, got {decomposition!r}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        self.groups = 1
        self.padding_mode = "zeros"
        self.decomposition = decomposition
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid' or ints, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride={self.stride}")
            self.padding = padding
        else:
            self.padding = _pair(padding, "padding")
        self._pad = self._explicit_padding()
        kh, kw = self.kernel_size
        if decomposition == "channel":
            self._m, self._n = out_channels, in_channels * kh * kw
        else:
            if self._pad is None:
                raise ValueError(
                    f"padding='same' with kernel_size={self.kernel_size} and "
                    f"dilation={self.dilation} pads asymmetrically, which the spatial "
                    "decomposition cannot split per dimension; use decomposition='channel' "
                    "or explicit padding"
                )
            self._m, self._n = in_channels * kh, out_channels * kw
        self.mode = mode
        self._make_parameters(
            rank, out_channels if bias else None, {"device": device, "dtype": dtype}
        )
        if _init_parameters:
            self.reset_parameters()

    def _explicit_padding(self) -> tuple[int, int] | None:
        """Padding per dimension as ints; None for an asymmetric 'same'."""
        if self.padding == "valid":
            return (0, 0)
        if self.padding == "same":
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size, strict=True)]
            if any(t % 2 for t in totals):
                return None
            return (totals[0] // 2, totals[1] // 2)
        return self.padding

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Conv2d's initialisation of a dense weight, factorized by SVD and truncated."""
        if self.U.device.type == "meta":
            return
        kh, kw = self.kernel_size
        weight = torch.empty(self.out_channels, self.in_channels, kh, kw, dtype=torch.float64)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self._init_from_weight(weight)
        if self.bias is not None:
            fan_in = self.in_channels * kh * kw
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        decomposition: str = "channel",
        rank: int | None = None,
        *,
        mode: str = "auto",
    ) -> SVDConv2d:
        """Exact factorization of `conv` (float64 SVD, cast back), optionally truncated."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        w = conv.weight
        with _uninitialized():
            layer = cls(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                groups=conv.groups,
                bias=conv.bias is not None,
                padding_mode=conv.padding_mode,
                rank=rank,
                decomposition=decomposition,
                mode=mode,
                device=w.device,
                dtype=w.dtype,
            )
        return layer._copy_from_dense(conv)

    def _matrix_from_weight(self, weight: torch.Tensor) -> torch.Tensor:
        c_out, c_in, kh, kw = weight.shape
        if self.decomposition == "channel":
            return weight.reshape(c_out, c_in * kh * kw)
        return weight.permute(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)

    def _weight_from_matrix(self, W: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        c_out, c_in = self.out_channels, self.in_channels
        if self.decomposition == "channel":
            return W.reshape(c_out, c_in, kh, kw)
        return W.reshape(c_in, kh, c_out, kw).permute(2, 0, 1, 3)

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        if self.padding == "same":
            return h, w
        ph, pw = self._pad
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        return _conv_out(h, kh, sh, ph, dh), _conv_out(w, kw, sw, pw, dw)

    def _geometry(self) -> tuple:
        return (
            "conv",
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.decomposition,
            self.bias is not None,
        )

    def _macs(self, input_shape: Sequence[int], rank: int | None = None) -> tuple[int, int]:
        r = self.rank if rank is None else rank
        *batch, _, h, w = input_shape
        n_img = math.prod(batch)
        h_out, w_out = self._out_hw(h, w)
        pixels = n_img * h_out * w_out
        dense = pixels * self._m * self._n
        if self.decomposition == "channel":
            return dense, pixels * r * (self._m + self._n)
        return dense, n_img * h_out * w * r * self._m + pixels * r * self._n

    def _chain_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, second) conv weights of the chain, s folded into the first."""
        r = self.rank
        kh, kw = self.kernel_size
        c_out, c_in = self.out_channels, self.in_channels
        if self.decomposition == "channel":
            first = (self.V * self.s).mT.reshape(r, c_in, kh, kw)
            second = self.U.reshape(c_out, r, 1, 1)
        else:
            first = (self.U * self.s).mT.reshape(r, c_in, kh, 1)
            second = self.V.reshape(c_out, kw, r).permute(0, 2, 1).reshape(c_out, r, 1, kw)
        return first, second

    def _chain_args(self) -> tuple[dict, dict]:
        """nn.Conv2d keyword arguments (stride, padding, dilation) of the chain's two convs."""
        if self.decomposition == "channel":
            first = {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}
            return first, {"stride": 1, "padding": 0, "dilation": 1}
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self._pad, self.dilation
        first = {"stride": (sh, 1), "padding": (ph, 0), "dilation": (dh, 1)}
        return first, {"stride": (1, sw), "padding": (0, pw), "dilation": (1, dw)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_chain(x.shape):
            w1, w2 = self._chain_weights()
            a1, a2 = self._chain_args()
            return F.conv2d(F.conv2d(x, w1, None, **a1), w2, self.bias, **a2)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    @torch.no_grad()
    def to_dense(self) -> nn.Conv2d:
        """nn.Conv2d with weight U·diag(s)·Vᵀ (reshaped) and the same bias and geometry."""
        dense = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias is not None,
            device=self.U.device,
            dtype=self.U.dtype,
        )
        dense.weight.copy_(self.weight)
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense.train(self.training)

    @torch.no_grad()
    def to_lowrank(self) -> nn.Sequential:
        """nn.Sequential of the chain's two nn.Conv2d (s folded into the first conv)."""
        factory = {"device": self.U.device, "dtype": self.U.dtype}
        w1, w2 = self._chain_weights()
        a1, a2 = self._chain_args()
        first = nn.Conv2d(self.in_channels, self.rank, w1.shape[2:], bias=False, **a1, **factory)
        second = nn.Conv2d(
            self.rank, self.out_channels, w2.shape[2:], bias=self.bias is not None, **a2, **factory
        )
        first.weight.copy_(w1)
        second.weight.copy_(w2)
        if self.bias is not None:
            second.bias.copy_(self.bias)
        return nn.Sequential(first, second).train(self.training)

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding != (0, 0):
            text += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        return f"{text}, decomposition={self.decomposition}, {self._rank_repr()}"


def _svd_layers(model: nn.Module) -> list[tuple[str, _SVDBase]]:
    """(qualified name, module) of every SVD layer in `model`, in named_modules order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _SVDBase)]


@contextlib.contextmanager
def grouped_compose(model: nn.Module) -> Iterator[None]:
    """Compose the weights of all of `model`'s SVD layers in one grouped call for the
    forward passes inside the block: one `ops.compose_grouped` (one launch forward and one
    backward on CUDA) instead of one `ops.compose` per layer.

    Layers whose last forward took the low-rank chain are left out (they need no W). The
    weights are those of the parameters at entry: use one block per training step.

    Example::

        with svdkern.grouped_compose(model):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    """
    groups: dict[tuple, list[_SVDBase]] = {}
    for _, layer in _svd_layers(model):
        if not layer._last_chain:
            groups.setdefault((layer.U.device, layer.U.dtype), []).append(layer)
    composed = []
    for layers in groups.values():
        Ws = ops.compose_grouped(
            [m.U for m in layers], [m.s for m in layers], [m.V for m in layers]
        )
        for layer, W in zip(layers, Ws, strict=True):
            layer._grouped_matrix = W
            composed.append(layer)
    try:
        yield
    finally:
        for layer in composed:
            layer._grouped_matrix = None
