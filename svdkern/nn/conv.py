"""Convolutions with the weight kept as U·diag(s)·Vᵀ of a matrix view: `SVDConv1d`
(channel decomposition) and `SVDConv2d` (channel or spatial), one N-d implementation.

Example::

    conv = nn.Conv2d(16, 32, 3, padding=1)
    layer = SVDConv2d.from_dense(conv, decomposition="spatial")   # equals conv
    layer.prune_(8)
    pair = layer.to_lowrank()                                     # two nn.Conv2d

    audio = SVDConv1d.from_dense(nn.Conv1d(40, 64, 5, padding=2))  # equals the Conv1d
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from svdkern.nn import _base
from svdkern.nn._base import SVDLayer, _ntuple, _uninitialized

__all__ = ["DECOMPOSITIONS", "SVDConv1d", "SVDConv2d"]

DECOMPOSITIONS = ("channel", "spatial")


def _conv_out(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


class _SVDConvNd(SVDLayer):
    """An N-d convolution (N = `_dims`) whose weight (c_out, c_in, *k) is kept as
    U·diag(s)·Vᵀ of a matrix view; `SVDConv1d` and `SVDConv2d` only name the dense class
    and the functional conv they stand for.

    decomposition="channel" (any N): W viewed as c_out × (c_in·∏k); U (c_out × r),
    V (c_in·∏k × r). Chain: conv with r filters of c_in×k (the layer's stride, padding,
    dilation), scale by s, 1×…×1 conv with U to c_out (+ bias).

    decomposition="spatial" (N = 2 only): see `SVDConv2d`.
    """

    _dims: int
    _dense_type: type[nn.Module]

    # F.conv1d / F.conv2d, as a staticmethod
    _conv_fn: staticmethod

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride,
        padding,
        dilation,
        groups: int,
        bias: bool,
        padding_mode: str,
        rank: int | None,
        decomposition: str,
        *,
        mode: str,
        device,
        dtype,
    ) -> None:
        super().__init__()
        name, d = type(self).__name__, self._dims
        if groups != 1:
            raise ValueError(
                f"{name} supports groups=1 only, got groups={groups}; leave grouped or "
                "depthwise convolutions dense"
            )
        if padding_mode != "zeros":
            raise ValueError(
                f"{name} supports padding_mode='zeros' only, got padding_mode={padding_mode!r}"
            )
        if decomposition not in DECOMPOSITIONS:
            raise ValueError(
                f"decomposition must be one of {DECOMPOSITIONS}, got {decomposition!r}"
            )
        if decomposition == "spatial" and d != 2:
            raise ValueError(f"{name} supports decomposition='channel' only")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _ntuple(kernel_size, d, "kernel_size")
        self.stride = _ntuple(stride, d, "stride")
        self.dilation = _ntuple(dilation, d, "dilation")
        self.groups = 1
        self.padding_mode = "zeros"
        self.decomposition = decomposition
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid' or ints, got {padding!r}")
            if padding == "same" and self.stride != (1,) * d:
                raise ValueError(f"padding='same' needs stride 1, got stride={self.stride}")
            self.padding = padding
        else:
            self.padding = _ntuple(padding, d, "padding")
        self._pad = self._explicit_padding()
        if decomposition == "channel":
            self._m, self._n = out_channels, in_channels * math.prod(self.kernel_size)
        else:
            if self._pad is None:
                raise ValueError(
                    f"padding='same' with kernel_size={self.kernel_size} and "
                    f"dilation={self.dilation} pads asymmetrically, which the spatial "
                    "decomposition cannot split per dimension; use decomposition='channel' "
                    "or explicit padding"
                )
            kh, kw = self.kernel_size
            self._m, self._n = in_channels * kh, out_channels * kw
        self.mode = mode
        self._make_parameters(
            rank, out_channels if bias else None, {"device": device, "dtype": dtype}
        )
        if _base._init_parameters:
            self.reset_parameters()

    def _explicit_padding(self) -> tuple[int, ...] | None:
        """Padding per dimension as ints; None for an asymmetric 'same'."""
        if self.padding == "valid":
            return (0,) * self._dims
        if self.padding == "same":
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size, strict=True)]
            if any(t % 2 for t in totals):
                return None
            return tuple(t // 2 for t in totals)
        return self.padding

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The dense conv's initialisation of a weight, factorized by SVD and truncated."""
        if self.U.device.type == "meta":
            return
        shape = (self.out_channels, self.in_channels, *self.kernel_size)
        weight = torch.empty(shape, dtype=torch.float64)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self._init_from_weight(weight)
        if self.bias is not None:
            fan_in = self.in_channels * math.prod(self.kernel_size)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def _from_conv(cls, conv: nn.Module, rank: int | None, mode: str, **kwargs) -> _SVDConvNd:
        """Exact factorization of the dense `conv`; `kwargs` are the subclass's own
        constructor arguments (SVDConv2d's decomposition)."""
        if not isinstance(conv, cls._dense_type):
            raise TypeError(
                f"conv must be an nn.{cls._dense_type.__name__}, got {type(conv).__name__}"
            )
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
                mode=mode,
                device=w.device,
                dtype=w.dtype,
                **kwargs,
            )
        return layer._copy_from_dense(conv)

    def _matrix_from_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.decomposition == "channel":
            return weight.reshape(weight.shape[0], -1)
        c_out, c_in, kh, kw = weight.shape
        return weight.permute(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)

    def _weight_from_matrix(self, W: torch.Tensor) -> torch.Tensor:
        c_out, c_in = self.out_channels, self.in_channels
        if self.decomposition == "channel":
            return W.reshape(c_out, c_in, *self.kernel_size)
        kh, kw = self.kernel_size
        return W.reshape(c_in, kh, c_out, kw).permute(2, 0, 1, 3)

    def _out_size(self, size: Sequence[int]) -> tuple[int, ...]:
        """Output spatial size for an input of spatial size `size` (one entry per dim)."""
        if self.padding == "same":
            return tuple(size)
        return tuple(
            _conv_out(*args)
            for args in zip(
                size, self.kernel_size, self.stride, self._pad, self.dilation, strict=True
            )
        )

    @property
    def geometry(self) -> tuple:
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

    def macs(self, input_shape: Sequence[int], rank: int | None = None) -> tuple[int, int]:
        r = self.rank if rank is None else rank
        d = self._dims
        n_img = math.prod(input_shape[: -(d + 1)])
        size = tuple(input_shape[-d:])
        out = self._out_size(size)
        positions = n_img * math.prod(out)
        dense = positions * self._m * self._n
        if self.decomposition == "channel":
            return dense, positions * r * (self._m + self._n)
        # spatial: the first (kh×1) conv runs at H_out × W_in, the second at H_out × W_out
        return dense, n_img * out[0] * size[1] * r * self._m + positions * r * self._n

    def _chain_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, second) conv weights of the chain, s folded into the first."""
        r = self.rank
        c_out, c_in = self.out_channels, self.in_channels
        if self.decomposition == "channel":
            first = (self.V * self.s).mT.reshape(r, c_in, *self.kernel_size)
            second = self.U.reshape(c_out, r, *(1,) * self._dims)
        else:
            kh, kw = self.kernel_size
            first = (self.U * self.s).mT.reshape(r, c_in, kh, 1)
            second = self.V.reshape(c_out, kw, r).permute(0, 2, 1).reshape(c_out, r, 1, kw)
        return first, second

    def _chain_args(self) -> tuple[dict, dict]:
        """Keyword arguments (stride, padding, dilation) of the chain's two convs."""
        if self.decomposition == "channel":
            first = {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}
            ones = (1,) * self._dims
            return first, {"stride": ones, "padding": (0,) * self._dims, "dilation": ones}
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self._pad, self.dilation
        first = {"stride": (sh, 1), "padding": (ph, 0), "dilation": (dh, 1)}
        return first, {"stride": (1, sw), "padding": (0, pw), "dilation": (1, dw)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self._conv_fn
        if self._use_chain(x.shape):
            w1, w2 = self._chain_weights()
            a1, a2 = self._chain_args()
            return conv(conv(x, w1, None, **a1), w2, self.bias, **a2)
        return conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """The dense conv with weight U·diag(s)·Vᵀ (reshaped), same bias and geometry."""
        return self._filled(
            self._dense_type(
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
        )

    @torch.no_grad()
    def to_lowrank(self) -> nn.Sequential:
        """nn.Sequential of the chain's two dense convs (s folded into the first)."""
        factory = {"device": self.U.device, "dtype": self.U.dtype}
        w1, w2 = self._chain_weights()
        a1, a2 = self._chain_args()
        first = self._dense_type(
            self.in_channels, self.rank, w1.shape[2:], bias=False, **a1, **factory
        )
        second = self._dense_type(
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
        if self.padding != (0,) * self._dims:
            text += f", padding={self.padding!r}"
        if self.dilation != (1,) * self._dims:
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        if self._dims == 1:
            return f"{text}, {self._rank_repr()}"
        return f"{text}, decomposition={self.decomposition}, {self._rank_repr()}"


class SVDConv1d(_SVDConvNd):
    """Conv1d whose weight (c_out, c_in, k) is kept as U·diag(s)·Vᵀ of its c_out × (c_in·k)
    view (channel decomposition); U (c_out × r), V (c_in·k × r).

    Shapes: x (N, c_in, L) or (c_in, L) → y (N, c_out, L_out) as for nn.Conv1d.
    forward composes W (`ops.compose`) and runs `F.conv1d`, or runs the chain (conv with r
    filters of c_in×k at the layer's stride, padding and dilation, scale by s, 1-wide conv
    with U to c_out, + bias), whichever costs fewer MACs: compose m·n·r + P·m·n, chain
    P·r·(m + n) with m = c_out, n = c_in·k, P = N·L_out. groups must be 1 and padding_mode
    "zeros"; padding may be an int, a 1-tuple, "valid" or "same".

    Example::

        conv = nn.Conv1d(40, 64, 5, padding=2)
        layer = SVDConv1d.from_dense(conv)          # equals conv
        y = layer(torch.randn(8, 40, 100))          # (8, 64, 100)
        layer.prune_(16)
    """

    _dims = 1
    _dense_type = nn.Conv1d
    _conv_fn = staticmethod(F.conv1d)

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
        *,
        mode: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            rank,
            "channel",
            mode=mode,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def from_dense(
        cls, conv: nn.Conv1d, rank: int | None = None, *, mode: str = "auto"
    ) -> SVDConv1d:
        """Exact factorization of `conv` (float64 SVD, cast back), optionally truncated."""
        return cls._from_conv(conv, rank, mode)


class SVDConv2d(_SVDConvNd):
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

    _dims = 2
    _dense_type = nn.Conv2d
    _conv_fn = staticmethod(F.conv2d)

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
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            rank,
            decomposition,
            mode=mode,
            device=device,
            dtype=dtype,
        )

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
        return cls._from_conv(conv, rank, mode, decomposition=decomposition)
