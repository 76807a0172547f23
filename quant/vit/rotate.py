"""Per-head Hadamard rotation of the attention's q, k (and v), folded into its weights.

For any orthogonal R, (q R)(k R)^T = q k^T, so rotating each head's queries and keys by the same
R changes nothing in float. It changes what the 4-bit q and k grids see: a few head dimensions
carry most of the range of q and k (the per-tensor grid is sized by them, so the bulk of the
channels gets a handful of levels), and a Hadamard matrix spreads every channel over all of them,
which evens out the ranges and shrinks the grid's step. Folded into the rows of the qkv Linear
(and its bias), it costs nothing at inference: the quantized model still runs one static
per-tensor grid per matmul input, as RepQ-ViT's. On the CIFAR-10 ViT (real calibration, GPTQ, means
of 5 draws, lossless slice / JPEG set) it moved W4A4 from 70.76 / 68.98 to 70.68 / 69.11 (a narrower
spread across draws: 69.00-69.33 on the JPEG set), W8A8 from 71.48 / 69.54 to 71.64 / 69.55 and
W3A3 from 62.99 / 62.49 to 63.70 / 62.58; calibrated on the ResNet-distilled data-free pool it cost
W4A4 0.4 / 0.2 points (3 draws), so it is a default measured on real images.

The same holds for v with the inverse on the other side: attn @ (v R) = (attn @ v) R, undone by
the output projection's columns (W R). That rotates the v grid's input and the projection's input;
it is optional (`values=True`): on that ViT it gave 70.46 / 69.09 against q/k alone's 70.68 / 69.11
(lossless slice / JPEG set, W4A4, 5 draws), so `quantize_vit` rotates q and k only.
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


def _rotatable(module: nn.Module) -> tuple[int, int] | None:
    """(heads, head dim) of an attention whose q/k rotation is exact, else None."""
    if type(module) is Attention:  # subclasses (rope, etc.) compute something else
        if not (isinstance(module.q_norm, nn.Identity) and isinstance(module.k_norm, nn.Identity)):
            return None  # a norm over the head dim does not commute with a rotation
    elif not isinstance(module, WindowAttention):
        return None
    if not isinstance(getattr(module, "qkv", None), nn.Linear):
        return None
    heads = module.num_heads
    head_dim = module.qkv.out_features // (3 * heads)
    if head_dim < 2 or head_dim & (head_dim - 1):
        return None
    return heads, head_dim


def _values_rotatable(module: nn.Module) -> bool:
    """Whether the attention output reaches `proj` unchanged per channel (so v's rotation folds there)."""
    norm = getattr(module, "norm", None)
    return (
        (norm is None or isinstance(norm, nn.Identity))
        and getattr(module, "gate", None) is None
        and isinstance(getattr(module, "proj", None), nn.Linear)
    )


@torch.no_grad()
def rotate_heads(model: nn.Module, values: bool = False) -> int:
    """Fold a per-head Hadamard rotation into every eligible attention of `model`, in place.

    q and k of each head are rotated by the same matrix (rows of the qkv weight and bias); with
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
        qkv = module.qkv
        weight = qkv.weight.double()
        bias = qkv.bias.double() if qkv.bias is not None else None
        parts = [0, 1] + ([2] if values and _values_rotatable(module) else [])
        for part in parts:
            for h in range(heads):
                rows = slice(part * dim + h * head_dim, part * dim + (h + 1) * head_dim)
                weight[rows] = rot.t() @ weight[rows]
                if bias is not None:
                    bias[rows] = rot.t() @ bias[rows]
        qkv.weight.copy_(weight)
        if bias is not None:
            qkv.bias.copy_(bias)
        if 2 in parts:
            proj = module.proj.weight.double()
            for h in range(heads):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                proj[:, cols] = proj[:, cols] @ rot
            module.proj.weight.copy_(proj)
        done += 1
    return done


__all__ = ["hadamard", "rotate_heads"]
