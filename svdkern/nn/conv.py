"""`SVDConv2d`: nn.Conv2d with its weight kept as U·diag(s)·Vᵀ of a matrix view
(channel or spatial decomposition).

Example::

    conv = nn.Conv2d(16, 32, 3, padding=1)
    layer = SVDConv2d.from_dense(conv, decomposition="spatial")   # equals conv
    layer.prune_(8)
    pair = layer.to_lowrank()                                     # two nn.Conv2d
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from svdkern.nn import _base
from svdkern.nn._base import SVDLayer, _pair, _uninitialized

__all__ = ["DECOMPOSITIONS", "SVDConv2d"]

DECOMPOSITIONS = ("channel", "spatial")


def _conv_out(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


class SVDConv2d(SVDLayer):
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
        if _base._init_parameters:
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
