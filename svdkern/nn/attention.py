"""`SVDMultiheadAttention`: nn.MultiheadAttention whose projections are SVD layers.

The query/key/value projections become `SVDLinear` children, either one per input
(`in_proj="split"`: `q_proj`, `k_proj`, `v_proj`) or one for the three stacked
(`in_proj="fused"`: `in_proj`, W of shape (3·E) × E), plus `out_proj`. Each child picks its
own form (compose + dense GEMM, or the low-rank chain) like any SVD layer; the attention
itself runs in `F.scaled_dot_product_attention` (fused kernels on GPU) unless the attention
weights are asked for.

Example::

    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    layer = SVDMultiheadAttention.from_dense(mha)        # equals mha
    out, _ = layer(x, x, x, need_weights=False)
    layer.q_proj.prune_(16)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from svdkern.nn import _base
from svdkern.nn._base import _uninitialized
from svdkern.nn.linear import SVDLinear

__all__ = ["IN_PROJ", "SVDMultiheadAttention"]

IN_PROJ = ("split", "fused")


def _additive_mask(mask: torch.Tensor | None, name: str, dtype: torch.dtype):
    """A bool mask (True = not attended) as an additive float mask (0 / −inf) of `dtype`;
    float masks are additive already and kept as they are (nn.MultiheadAttention's rule)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask


def _dense_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of the linear map a projection child computes: an SVD layer or a
    Linear (its `.weight`), or the two-Linear nn.Sequential `compress` may put in its place."""
    if isinstance(module, nn.Sequential) and len(module) == 2:
        first, second = module
        weight = second.weight @ first.weight
        bias = second.bias
        if first.bias is not None:
            bias = second.weight @ first.bias + (0 if bias is None else bias)
        return weight, bias
    return module.weight, module.bias


def _mha_config(module: nn.Module, bias: bool, like: torch.Tensor) -> dict:
    """The constructor arguments nn.MultiheadAttention and SVDMultiheadAttention share, read
    from either; `bias` and the device and dtype (of `like`) are the caller's."""
    return {
        "embed_dim": module.embed_dim,
        "num_heads": module.num_heads,
        "dropout": module.dropout,
        "bias": bias,
        "add_bias_kv": module.bias_k is not None,
        "add_zero_attn": module.add_zero_attn,
        "kdim": module.kdim,
        "vdim": module.vdim,
        "batch_first": module.batch_first,
        "device": like.device,
        "dtype": like.dtype,
    }


class SVDMultiheadAttention(nn.Module):
    """Multi-head attention as nn.MultiheadAttention computes it, with its projections
    kept as SVD layers.

    With E = embed_dim, H = num_heads, D = E / H:

        q = q_proj(query), k = k_proj(key), v = v_proj(value)       (split)
        [q | k | v] = in_proj(·), each part taken from its own input  (fused)
        head_i = softmax(q_i·k_iᵀ / √D + mask)·v_i,   y = out_proj([head_1 … head_H])

    Shapes as for nn.MultiheadAttention: query (L, N, E), key (S, N, kdim), value
    (S, N, vdim) ((N, L, E) … with batch_first=True; (L, E) … unbatched); returns
    (y (L, N, E), weights (N, L, S) averaged over heads, (N, H, L, S) if not, or None).
    `forward` takes the same arguments with the same semantics: key_padding_mask (N, S)
    and attn_mask (L, S) or (N·H, L, S), bool (True = not attended) or additive float;
    bias_k/bias_v and add_zero_attn append one key/value position each; dropout on the
    attention weights in training; is_causal is a hint that attn_mask is the causal mask.
    With need_weights=False the attention runs in `F.scaled_dot_product_attention`.

    The projections are children called as modules (`q_proj`, `k_proj`, `v_proj` or
    `in_proj`, and `out_proj`; `svd_layers(model)` finds them), so `prune_` acts on each of
    them and `compress` may replace them by plain Linear modules. "fused" (only when kdim =
    vdim = E) is one GEMM for self-attention (query is key is value); for other inputs it
    projects their concatenation once and keeps each input's third, so it costs 3× the
    MACs there: use "split" for cross-attention. The attributes of nn.MultiheadAttention
    (embed_dim, num_heads, head_dim, kdim, vdim, batch_first, dropout, bias_k, bias_v,
    add_zero_attn, _qkv_same_embed_dim) are mirrored, and in_proj_weight, in_proj_bias,
    q/k/v_proj_weight are read-only dense weights composed from the children (for code
    such as nn.TransformerEncoderLayer's inference fast path, which reads them).

    A new layer is initialised like nn.MultiheadAttention (Xavier-uniform projections,
    zero biases, Xavier-normal bias_k/bias_v), with the projections factorized by SVD.

    Example::

        mha = nn.MultiheadAttention(64, 4, batch_first=True)
        layer = SVDMultiheadAttention.from_dense(mha, in_proj="fused")
        out, weights = layer(x, x, x)                  # equals mha(x, x, x)
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        in_proj: str = "split",
        mode: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, "
                f"num_heads={num_heads}"
            )
        if in_proj not in IN_PROJ:
            raise ValueError(f"in_proj must be one of {IN_PROJ}, got {in_proj!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        if in_proj == "fused" and not self._qkv_same_embed_dim:
            raise ValueError(
                f"in_proj='fused' needs kdim = vdim = embed_dim, got kdim={self.kdim}, "
                f"vdim={self.vdim}, embed_dim={embed_dim}; use in_proj='split'"
            )
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        self.fused = in_proj == "fused"
        factory = {"device": device, "dtype": dtype}
        initialize = _base._init_parameters
        # The children are initialised below from nn.MultiheadAttention's dense init.
        with _uninitialized():
            if self.fused:
                self.in_proj = SVDLinear(embed_dim, 3 * embed_dim, bias, mode=mode, **factory)
            else:
                self.q_proj = SVDLinear(embed_dim, embed_dim, bias, mode=mode, **factory)
                self.k_proj = SVDLinear(self.kdim, embed_dim, bias, mode=mode, **factory)
                self.v_proj = SVDLinear(self.vdim, embed_dim, bias, mode=mode, **factory)
            self.out_proj = SVDLinear(embed_dim, embed_dim, bias, mode=mode, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        if initialize:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialisation, the projections factorized by SVD."""
        if self.out_proj.U.device.type == "meta":
            return
        E = self.embed_dim
        if self._qkv_same_embed_dim:
            packed = nn.init.xavier_uniform_(torch.empty(3 * E, E, dtype=torch.float64))
            weights = packed.chunk(3)
        else:
            weights = [
                nn.init.xavier_uniform_(torch.empty(E, n, dtype=torch.float64))
                for n in (E, self.kdim, self.vdim)
            ]
        if self.fused:
            self.in_proj._init_from_weight(packed)
        else:
            for proj, weight in zip(self._qkv_projections(), weights, strict=True):
                proj._init_from_weight(weight)
        # out_proj keeps nn.Linear's init, as in nn.MultiheadAttention; biases start at 0.
        self.out_proj.reset_parameters()
        for proj in (*self._qkv_projections(), self.out_proj):
            if proj.bias is not None:
                proj.bias.zero_()
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def _qkv_projections(self) -> tuple[nn.Module, ...]:
        return (self.in_proj,) if self.fused else (self.q_proj, self.k_proj, self.v_proj)

    @classmethod
    def from_dense(
        cls, mha: nn.MultiheadAttention, in_proj: str = "split", *, mode: str = "auto"
    ) -> SVDMultiheadAttention:
        """Exact factorization of `mha`'s projections (float64 SVD, cast back).

        in_proj="split": q_proj, k_proj, v_proj from the three blocks of in_proj_weight
        (or q/k/v_proj_weight); "fused": one `in_proj` of the stacked (3·E) × E weight.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        if in_proj == "fused" and not mha._qkv_same_embed_dim:
            raise ValueError(
                f"in_proj='fused' needs kdim = vdim = embed_dim, got kdim={mha.kdim}, "
                f"vdim={mha.vdim}, embed_dim={mha.embed_dim}; use in_proj='split'"
            )
        out_weight = mha.out_proj.weight
        with _uninitialized():
            layer = cls(
                **_mha_config(mha, mha.in_proj_bias is not None, out_weight),
                in_proj=in_proj,
                mode=mode,
            )
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                weights = [mha.in_proj_weight] if layer.fused else mha.in_proj_weight.chunk(3)
            else:
                weights = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
            biases = [None] * len(weights)
            if mha.in_proj_bias is not None:
                biases = [mha.in_proj_bias] if layer.fused else mha.in_proj_bias.chunk(3)
            projections = (*layer._qkv_projections(), layer.out_proj)
            weights = [*weights, out_weight]
            biases = [*biases, mha.out_proj.bias]
            for proj, weight, bias in zip(projections, weights, biases, strict=True):
                proj._init_from_weight(weight)
                if bias is not None:
                    proj.bias.copy_(bias)
            if mha.bias_k is not None:
                layer.bias_k.copy_(mha.bias_k)
                layer.bias_v.copy_(mha.bias_v)
        return layer.train(mha.training)

    @torch.no_grad()
    def to_dense(self) -> nn.MultiheadAttention:
        """An nn.MultiheadAttention computing the same function (weights composed)."""
        out_weight, out_bias = _dense_parts(self.out_proj)
        mha = nn.MultiheadAttention(**_mha_config(self, out_bias is not None, out_weight))
        if self._qkv_same_embed_dim:
            mha.in_proj_weight.copy_(self.in_proj_weight)
        else:
            mha.q_proj_weight.copy_(self.q_proj_weight)
            mha.k_proj_weight.copy_(self.k_proj_weight)
            mha.v_proj_weight.copy_(self.v_proj_weight)
        if out_bias is not None:
            mha.in_proj_bias.copy_(self.in_proj_bias)
            mha.out_proj.bias.copy_(out_bias)
        mha.out_proj.weight.copy_(out_weight)
        if self.bias_k is not None:
            mha.bias_k.copy_(self.bias_k)
            mha.bias_v.copy_(self.bias_v)
        return mha.train(self.training)

    # --- nn.MultiheadAttention's weight attributes, composed from the children -------

    def _qkv_parts(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        if self.fused:
            weight, bias = _dense_parts(self.in_proj)
            biases = [None] * 3 if bias is None else bias.chunk(3)
            return list(zip(weight.chunk(3), biases, strict=True))
        return [_dense_parts(p) for p in self._qkv_projections()]

    @property
    def in_proj_weight(self) -> torch.Tensor | None:
        """The stacked (3·E) × E weight [W_q; W_k; W_v] (None when kdim or vdim ≠ E)."""
        if not self._qkv_same_embed_dim:
            return None
        if self.fused:
            return _dense_parts(self.in_proj)[0]
        return torch.cat([w for w, _ in self._qkv_parts()])

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        """The stacked (3·E,) bias [b_q; b_k; b_v] (None without biases)."""
        biases = [b for _, b in self._qkv_parts()]
        return None if biases[0] is None else torch.cat(biases)

    def _separate_weight(self, i: int) -> torch.Tensor | None:
        return None if self._qkv_same_embed_dim else self._qkv_parts()[i][0]

    q_proj_weight = property(lambda self: self._separate_weight(0), doc="W_q when kdim/vdim ≠ E")
    k_proj_weight = property(lambda self: self._separate_weight(1), doc="W_k when kdim/vdim ≠ E")
    v_proj_weight = property(lambda self: self._separate_weight(2), doc="W_v when kdim/vdim ≠ E")

    # nn.TransformerEncoderLayer's inference fast path calls self_attn.merge_masks
    merge_masks = nn.MultiheadAttention.merge_masks

    # --- forward -------------------------------------------------------------------------

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """Checks shapes as nn.MultiheadAttention does; returns whether inputs are batched."""
        if query.dim() not in (2, 3):
            raise ValueError(
                "query must be a batched 3-D or unbatched 2-D tensor, got shape "
                f"{list(query.shape)}"
            )
        batched = query.dim() == 3
        for name, t, dim in (("key", key, self.kdim), ("value", value, self.vdim)):
            if t.dim() != query.dim():
                raise ValueError(
                    f"{name} must be {query.dim()}-D like query {list(query.shape)}, got "
                    f"shape {list(t.shape)}"
                )
            if t.shape[-1] != dim:
                raise ValueError(f"{name} must have {dim} features, got shape {list(t.shape)}")
        if query.shape[-1] != self.embed_dim:
            raise ValueError(
                f"query must have embed_dim={self.embed_dim} features, got shape "
                f"{list(query.shape)}"
            )
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                f"key and value must agree in sequence and batch size, got {list(key.shape)} "
                f"and {list(value.shape)}"
            )
        seq = 1 if batched and self.batch_first else 0
        if batched and query.shape[1 - seq] != key.shape[1 - seq]:
            raise ValueError(
                f"query and key must have the same batch size, got {list(query.shape)} and "
                f"{list(key.shape)} (batch_first={self.batch_first})"
            )
        L, S = query.shape[seq], key.shape[seq]
        N = query.shape[1 - seq] if batched else None
        if key_padding_mask is not None:
            expected = (N, S) if batched else (S,)
            if tuple(key_padding_mask.shape) != expected:
                raise ValueError(
                    f"key_padding_mask must have shape {list(expected)} (batch, source "
                    f"length), got {list(key_padding_mask.shape)}"
                )
        if attn_mask is not None:
            heads = self.num_heads * (N if batched else 1)
            if tuple(attn_mask.shape) not in ((L, S), (heads, L, S)):
                raise ValueError(
                    f"attn_mask must have shape {[L, S]} or {[heads, L, S]} (batch·heads, "
                    f"target length, source length), got {list(attn_mask.shape)}"
                )
        return batched

    def _project(self, query, key, value, batched: bool):
        """q, k, v in the inputs' own layout (…, E): projections act on rows."""
        if not self.fused:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if query is key and key is value:
            return self.in_proj(query).chunk(3, dim=-1)
        # One call on the distinct inputs stacked along the sequence, each keeping its third.
        seq = 1 if batched and self.batch_first else 0
        inputs = [query, key] if key is value else [query, key, value]
        outs = self.in_proj(torch.cat(inputs, seq)).split([t.shape[seq] for t in inputs], seq)
        E = self.embed_dim
        return outs[0][..., :E], outs[1][..., E : 2 * E], outs[-1][..., 2 * E :]

    def _heads(self, x: torch.Tensor, batched: bool) -> torch.Tensor:
        """(…, E) in the input layout → (N, H, length, D) (a view)."""
        x = x.unflatten(-1, (self.num_heads, self.head_dim))
        if not batched:
            return x.transpose(0, 1).unsqueeze(0)
        return x.transpose(1, 2) if self.batch_first else x.permute(1, 2, 0, 3)

    def _merge(self, x: torch.Tensor, batched: bool) -> torch.Tensor:
        """(N, H, L, D) → (…, E) in the input layout (contiguous)."""
        N, _, L, _ = x.shape
        if not batched:
            return x[0].transpose(0, 1).reshape(L, self.embed_dim)
        if self.batch_first:
            return x.transpose(1, 2).reshape(N, L, self.embed_dim)
        return x.permute(2, 0, 1, 3).reshape(L, N, self.embed_dim)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "is_causal=True is a hint that attn_mask is the causal mask and needs "
                "attn_mask; pass e.g. nn.Transformer.generate_square_subsequent_mask(L)"
            )
        # As in nn.MultiheadAttention: with the hint, no padding mask and no weights asked
        # for, the kernel's own causal masking replaces attn_mask.
        causal = is_causal and key_padding_mask is None and not need_weights

        q, k, v = (self._heads(t, batched) for t in self._project(query, key, value, batched))
        N, H, L, D = q.shape
        # Bool masks become additive in the projections' dtype (the query's, unless autocast).
        padding = _additive_mask(key_padding_mask, "key_padding_mask", q.dtype)
        mask = None if causal else _additive_mask(attn_mask, "attn_mask", q.dtype)
        if mask is not None:
            mask = mask.view(1, 1, L, -1) if mask.dim() == 2 else mask.reshape(N, H, L, -1)
        if padding is not None:
            padding = padding.reshape(N, 1, 1, -1)
        appended = []
        if self.bias_k is not None:
            appended.append((self.bias_k.view(1, H, 1, D), self.bias_v.view(1, H, 1, D)))
        if self.add_zero_attn:
            zeros = q.new_zeros(1, H, 1, D)
            appended.append((zeros, zeros))
        for k_extra, v_extra in appended:
            # one more key/value position that every query attends (mask 0 there)
            k = torch.cat([k, k_extra.expand(N, -1, -1, -1).to(k.dtype)], dim=2)
            v = torch.cat([v, v_extra.expand(N, -1, -1, -1).to(v.dtype)], dim=2)
        if appended:
            mask = None if mask is None else F.pad(mask, (0, len(appended)))
            padding = None if padding is None else F.pad(padding, (0, len(appended)))
        if padding is not None:
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / D)) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if dropout > 0.0:
                # nn.MultiheadAttention returns the weights after dropout, as applied
                weights = F.dropout(weights, dropout)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=causal)
        return self.out_proj(self._merge(out, batched)), weights

    def extra_repr(self) -> str:
        text = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if not self._qkv_same_embed_dim:
            text += f", kdim={self.kdim}, vdim={self.vdim}"
        text += f", in_proj={'fused' if self.fused else 'split'}"
        if self.dropout:
            text += f", dropout={self.dropout}"
        if self.batch_first:
            text += ", batch_first=True"
        if self.bias_k is not None:
            text += ", add_bias_kv=True"
        if self.add_zero_attn:
            text += ", add_zero_attn=True"
        return text
