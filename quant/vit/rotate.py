"""Per-head Hadamard rotation of the attention's q, k (and v), folded into its weights.

For any orthogonal R, (q R)(k R)^T = q k^T, so rotating each head's queries and keys by the same
R changes nothing in float. It changes what the 4-bit q and k grids see: a few head dimensions
carry most of the range of q and k (the per-tensor grid is sized by them, so the bulk of the
channels gets a handful of levels), and a Hadamard matrix spreads every channel over all of them,
which evens out the ranges and shrinks the grid's step. Folded into the rows of the qkv Linear
(and its bias), it costs nothing at inference: the quantized model still runs one static
per-tensor grid per matmul input, as RepQ-ViT's. It is on by default, as measured on real images
(docs/notes.md).

The same holds for v with the inverse on the other side: attn @ (v R) = (attn @ v) R, undone by
the output projection's columns (W R). That rotates the v grid's input and the projection's input;
it is optional (`values=True`; it measured no better, so `quantize_transformer` rotates q and k only).
This is the offline part of QuaRot/SpinQuant-style rotations, applied where a transformer block
needs no online transform (no RoPE here, and the LayerNorms are left alone).
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention
from torch import nn


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of size `n` (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester-Hadamard matrix needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def _packed(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, nn.Linear] | None:
    """(packed q/k/v weight, its bias, output projection) of a timm attention or of a packed
    `nn.MultiheadAttention` (same layout: rows q, k, v, each heads x head dim), else None."""
    if isinstance(module, nn.MultiheadAttention):
        if type(module) is not nn.MultiheadAttention or not module._qkv_same_embed_dim:
            return None  # separate q/k/v weights (cross-attention) are left alone
        if module.bias_k is not None:  # its extra key would need the rotation too
            return None
        return module.in_proj_weight, module.in_proj_bias, module.out_proj
    qkv = getattr(module, "qkv", None)
    if not isinstance(qkv, nn.Linear):
        return None
    return qkv.weight, qkv.bias, getattr(module, "proj", None)


def _rotatable(module: nn.Module) -> tuple[int, int] | None:
    """(heads, head dim) of an attention whose q/k rotation is exact, else None."""
    if type(module) is Attention:  # subclasses (rope, etc.) compute something else
        if not (isinstance(module.q_norm, nn.Identity) and isinstance(module.k_norm, nn.Identity)):
            return None  # a norm over the head dim does not commute with a rotation
    elif not isinstance(module, (WindowAttention, nn.MultiheadAttention)):
        return None
    packed = _packed(module)
    if packed is None:
        return None
    heads = module.num_heads
    head_dim = packed[0].shape[0] // (3 * heads)
    if head_dim < 2 or head_dim & (head_dim - 1):
        return None
    return heads, head_dim


def _values_rotatable(module: nn.Module) -> bool:
    """Whether the attention output reaches `proj` unchanged per channel (so v's rotation folds there)."""
    norm = getattr(module, "norm", None)
    return (
        (norm is None or isinstance(norm, nn.Identity))
        and getattr(module, "gate", None) is None
        and isinstance(_packed(module)[2], nn.Linear)
    )


@torch.no_grad()
def rotate_heads(model: nn.Module, values: bool = False) -> int:
    """Fold a per-head Hadamard rotation into every eligible attention of `model`, in place.

    q and k of each head are rotated by the same matrix (rows of the qkv weight and bias, or of a
    packed `nn.MultiheadAttention`'s `in_proj_weight` / `in_proj_bias`); with
    `values`, v too, its inverse folded into the output projection's columns. The model computes
    the same function (up to float rounding). Attentions that would not stay exact (a norm on q/k
    or on the output, a gate, a head size that is not a power of two) are left alone.
    Returns how many attention modules were rotated.
    """
    done = 0
    for module in model.modules():
        shape = _rotatable(module)
        if shape is None:
            continue
        heads, head_dim = shape
        dim = heads * head_dim
        rot = hadamard(head_dim)
        qkv_weight, qkv_bias, proj_layer = _packed(module)
        weight = qkv_weight.double()
        bias = qkv_bias.double() if qkv_bias is not None else None
        parts = [0, 1] + ([2] if values and _values_rotatable(module) else [])
        for part in parts:
            for h in range(heads):
                rows = slice(part * dim + h * head_dim, part * dim + (h + 1) * head_dim)
                weight[rows] = rot.t() @ weight[rows]
                if bias is not None:
                    bias[rows] = rot.t() @ bias[rows]
        qkv_weight.copy_(weight)
        if bias is not None:
            qkv_bias.copy_(bias)
        if 2 in parts:
            proj = proj_layer.weight.double()
            for h in range(heads):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                proj[:, cols] = proj[:, cols] @ rot
            proj_layer.weight.copy_(proj)
        done += 1
    return done


__all__ = ["hadamard", "rotate_heads"]
