"""Explicit-matmul attention so both attention products and their inputs can be quantized.

timm's `Attention` and Swin's `WindowAttention` may call `F.scaled_dot_product_attention`, which
hides q @ k^T, the softmax output and attn @ v inside one kernel. The modules here compute the
same function step by step, with a `QuantMatMul` at each product: q and k on uniform grids, the
softmax output on the log-sqrt2 grid, v on a uniform grid. Parameters keep their timm names.
PyTorch's own `nn.MultiheadAttention` / `nn.TransformerEncoderLayer` get theirs in `torch_attention`.
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention
from torch import nn

from .layers import QuantMatMul
from .torch_attention import encoder_layer_problem, mha_problem


def _additive_mask(attn: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """Apply an SDPA-style mask (bool keep-mask, additive float mask, or causal) to logits."""
    n = attn.shape[-1]
    if is_causal:
        return attn + attn.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is None:
        return attn
    if attn_mask.dtype == torch.bool:
        return attn.masked_fill(~attn_mask, float("-inf"))
    return attn + attn_mask


class QuantAttention(nn.Module):
    """timm `Attention` (ViT/DeiT) with quantized q @ k^T and attn @ v."""

    def __init__(self, attn: Attention, abits: int, sqrt2_only: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.qkv, self.proj = attn.qkv, attn.proj
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.norm = getattr(attn, "norm", nn.Identity())
        self.gate = getattr(attn, "gate", None)
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.matmul_qk = QuantMatMul(abits)
        self.matmul_av = QuantMatMul(abits, log_a=True, sqrt2_only=sqrt2_only)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.matmul_qk(q * self.scale, k.transpose(-2, -1))
        attn = _additive_mask(attn, attn_mask, is_causal).softmax(dim=-1)
        x = self.matmul_av(self.attn_drop(attn), v)
        x = self.norm(x.transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class QuantWindowAttention(nn.Module):
    """timm Swin `WindowAttention` with quantized q @ k^T and attn @ v.

    The relative position bias and the shifted-window mask are added to the (dequantized) logits
    in float, as RepQ-ViT does: they are constants, not activations.
    """

    def __init__(self, attn: WindowAttention, abits: int, sqrt2_only: bool = False) -> None:
        super().__init__()
        self.dim, self.num_heads, self.scale = attn.dim, attn.num_heads, attn.scale
        self.window_size, self.window_area = attn.window_size, attn.window_area
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.qkv, self.proj = attn.qkv, attn.proj
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.matmul_qk = QuantMatMul(abits)
        self.matmul_av = QuantMatMul(abits, log_a=True, sqrt2_only=sqrt2_only)

    def _rel_pos_bias(self) -> torch.Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.matmul_qk(q * self.scale, k.transpose(-2, -1)) + self._rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        x = self.matmul_av(self.attn_drop(attn.softmax(dim=-1)), v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, -1)))


def supported_attention(module: nn.Module) -> bool:
    """Whether there is an explicit-matmul form of `module` (here or in `torch_attention`)."""
    if isinstance(module, nn.MultiheadAttention):
        return mha_problem(module) is None
    return isinstance(module, WindowAttention) or type(module) is Attention


def attention_problem(module: nn.Module) -> str | None:
    """What the transformer path cannot take about `module`, as the end of one line (None: nothing)."""
    if isinstance(module, (nn.TransformerDecoderLayer, nn.TransformerDecoder)):
        return "(decoder cross-attention) is not supported by the transformer path"
    if isinstance(module, nn.TransformerEncoderLayer) and encoder_layer_problem(module) is not None:
        return f"is not supported by the transformer path ({encoder_layer_problem(module)})"
    if is_attention(module) and not supported_attention(module):
        reason = mha_problem(module) if isinstance(module, nn.MultiheadAttention) else None
        return "attention is not supported by the transformer path" + (f" ({reason})" if reason else "")
    return None


def is_attention(module: nn.Module) -> bool:
    """Whether `module` computes multi-head attention (supported here or not)."""
    if isinstance(module, (nn.MultiheadAttention, Attention, WindowAttention)):
        return True
    heads = getattr(module, "num_heads", getattr(module, "n_heads", None))  # e.g. torchvision's MaxViT
    return isinstance(heads, int) and any(isinstance(c, nn.Linear) for c in module.children())


def quantized_attention(module: nn.Module, abits: int, sqrt2_only: bool = False) -> nn.Module | None:
    """The explicit-matmul replacement for a timm attention module, or None if it is not one.

    `sqrt2_only` pins the post-softmax grid to log-sqrt2 (RepQ-ViT) instead of searching the base.
    """
    if isinstance(module, WindowAttention):
        return QuantWindowAttention(module, abits, sqrt2_only)
    if type(module) is Attention:  # subclasses (rope, etc.) compute something else
        return QuantAttention(module, abits, sqrt2_only)
    return None
