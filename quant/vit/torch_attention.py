"""Explicit-matmul forms of PyTorch's own attention: `nn.MultiheadAttention` and whole
`nn.TransformerEncoderLayer`s (torchvision's ViT and models built on `nn.TransformerEncoder`).

`nn.MultiheadAttention` keeps q/k/v in one packed parameter and runs a fused kernel, so neither its
projections nor its products can be quantized; `QuantMultiheadAttention` unpacks them into Linears
(`in_proj`, or `q_proj`/`k_proj`/`v_proj`, and `out_proj`) and computes both products with a
`QuantMatMul`, exactly as `QuantAttention` does for timm. `nn.TransformerEncoderLayer`'s eval fast
path bypasses its submodules, so the whole layer is replaced by `QuantTransformerEncoderLayer`,
which keeps its parameter names and runs the same pre- or post-norm forward step by step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QuantError
from .layers import QuantMatMul


def mha_problem(module: nn.MultiheadAttention) -> str | None:
    """Why `module` has no explicit form here (None: it has one)."""
    if type(module) is not nn.MultiheadAttention:
        return "a subclass with its own behaviour"
    if module.bias_k is not None or module.add_zero_attn:
        return "add_bias_kv / add_zero_attn"
    return None


def encoder_layer_problem(module: nn.TransformerEncoderLayer) -> str | None:
    """Why `module` cannot be replaced by `QuantTransformerEncoderLayer` (None: it can)."""
    if type(module).forward is not nn.TransformerEncoderLayer.forward:
        return "a subclass with its own forward"
    return mha_problem(module.self_attn)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A float `nn.Linear` holding copies of `weight` and `bias` (trainable as `weight` was)."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.requires_grad_(weight.requires_grad)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` and `b` are the same tensor (the same object, or views of the same memory)."""
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An `nn.MultiheadAttention` mask as additive logits (bool: True means masked out)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class QuantMultiheadAttention(nn.Module):
    """`nn.MultiheadAttention` with quantized projections, q @ k^T and attn @ v.

    A packed module (the usual case) takes self-attention only (query, key and value one tensor): its one
    `in_proj` Linear has one input grid. Separate q/k/v weights (kdim / vdim != embed_dim) become
    `q_proj`, `k_proj`, `v_proj` and take any query, key and value.
    """

    def __init__(self, mha: nn.MultiheadAttention, abits: int, sqrt2_only: bool = False) -> None:
        super().__init__()
        problem = mha_problem(mha)
        if problem is not None:
            raise ValueError(f"cannot convert nn.MultiheadAttention: {problem}")
        self.embed_dim, self.num_heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.kdim, self.vdim, self.batch_first = mha.kdim, mha.vdim, mha.batch_first
        self.dropout = mha.dropout
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim
        self.scale = self.head_dim**-0.5
        #: whether a forward was called with a mask or `is_causal` (reconstruction cannot replay those)
        self.saw_mask = False
        bias = mha.in_proj_bias
        if self._qkv_same_embed_dim:
            self.in_proj = _linear(mha.in_proj_weight, bias)
        else:
            e = self.embed_dim
            parts = bias.split(e) if bias is not None else (None, None, None)
            self.q_proj = _linear(mha.q_proj_weight, parts[0])
            self.k_proj = _linear(mha.k_proj_weight, parts[1])
            self.v_proj = _linear(mha.v_proj_weight, parts[2])
        self.matmul_qk = QuantMatMul(abits)
        self.matmul_av = QuantMatMul(abits, log_a=True, sqrt2_only=sqrt2_only)
        out = mha.out_proj
        self.out_proj = _linear(out.weight, out.bias)
        self.train(mha.training)  # dropout as the float module had it

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, embed) -> (batch, heads, tokens, head_dim)."""
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, -1).transpose(1, 2)

    def _project(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, self_attention: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self._qkv_same_embed_dim:
            return (
                self._heads(self.q_proj(query)),
                self._heads(self.k_proj(key)),
                self._heads(self.v_proj(value)),
            )
        if not self_attention:
            raise QuantError(
                "nn.MultiheadAttention with a packed in_proj is quantized for self-attention only "
                "(query, key and value one tensor); cross-attention is not supported"
            )
        b, n, _ = query.shape
        qkv = self.in_proj(query).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def _mask(
        self,
        b: int,
        n: int,
        s: int,
        ref: torch.Tensor,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor | None:
        """One additive mask broadcasting to (batch, heads, n, s), or None."""
        mask = None
        if attn_mask is not None:
            m = _float_mask(attn_mask, ref.dtype)
            mask = m.view(b, self.num_heads, n, s) if m.dim() == 3 else m.view(1, 1, n, s)
        elif is_causal:
            mask = ref.new_full((n, s), float("-inf")).triu_(1).view(1, 1, n, s)
        if key_padding_mask is not None:
            pad = _float_mask(key_padding_mask, ref.dtype).view(b, 1, 1, s)
            mask = pad if mask is None else mask + pad
        return mask

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
        """`nn.MultiheadAttention.forward`'s arguments and results (batched or unbatched inputs)."""
        if attn_mask is not None or key_padding_mask is not None or is_causal:
            self.saw_mask = True
        batched = query.dim() == 3
        self_attention = _same(query, key) and _same(key, value)
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._project(query, key, value, self_attention)
        b, n, s = q.shape[0], q.shape[2], k.shape[2]
        attn = self.matmul_qk(q * self.scale, k.transpose(-2, -1))
        mask = self._mask(b, n, s, attn, attn_mask, key_padding_mask, is_causal)
        if mask is not None:
            attn = attn + mask
        attn = F.dropout(attn.softmax(dim=-1), self.dropout, self.training)
        out = self.out_proj(self.matmul_av(attn, v).transpose(1, 2).reshape(b, n, self.embed_dim))
        weights = (attn.mean(dim=1) if average_attn_weights else attn) if need_weights else None
        if not batched:
            return out.squeeze(0), weights.squeeze(0) if weights is not None else None
        return (out if self.batch_first else out.transpose(0, 1)), weights


class QuantTransformerEncoderLayer(nn.Module):
    """`nn.TransformerEncoderLayer` (pre- or post-norm) run step by step on `QuantMultiheadAttention`.

    Submodule names are the float layer's (`self_attn`, `linear1`, `linear2`, `norm1`, `norm2`,
    `dropout*`, `activation`), so the (LayerNorm, Linear) pairs found on the float model name the
    converted layers; only the attention's packed weights move (`self_attn.in_proj.weight`).
    """

    def __init__(self, layer: nn.TransformerEncoderLayer, abits: int, sqrt2_only: bool = False) -> None:
        super().__init__()
        problem = encoder_layer_problem(layer)
        if problem is not None:
            raise ValueError(f"cannot convert nn.TransformerEncoderLayer: {problem}")
        self.self_attn = QuantMultiheadAttention(layer.self_attn, abits, sqrt2_only)
        self.linear1, self.dropout, self.linear2 = layer.linear1, layer.dropout, layer.linear2
        self.norm_first = layer.norm_first
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.dropout1, self.dropout2 = layer.dropout1, layer.dropout2
        self.activation: nn.Module | Callable[[torch.Tensor], torch.Tensor] = layer.activation
        self.train(layer.training)

    def _sa_block(
        self, x: torch.Tensor, mask: torch.Tensor | None, padding: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        out = self.self_attn(
            x, x, x, attn_mask=mask, key_padding_mask=padding, need_weights=False, is_causal=is_causal
        )[0]
        return self.dropout1(out)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))


def quantized_torch_module(module: nn.Module, abits: int, sqrt2_only: bool = False) -> nn.Module | None:
    """The explicit replacement of an `nn.TransformerEncoderLayer` or `nn.MultiheadAttention`, else None."""
    if isinstance(module, nn.TransformerEncoderLayer):
        return QuantTransformerEncoderLayer(module, abits, sqrt2_only)
    if isinstance(module, nn.MultiheadAttention):
        return QuantMultiheadAttention(module, abits, sqrt2_only)
    return None
