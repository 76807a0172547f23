"""RepQ-ViT scale re-parameterization: per-channel post-LayerNorm grids folded to per-tensor.

Post-LayerNorm activations have a few channels with ranges 10-100x the rest, so one per-tensor
grid wastes most levels; per-channel grids fit them but an integer matmul needs one input scale.
The per-channel grid (s_c, z_c) is made per-tensor (s, z) by changing the LayerNorm affine and the
next Linear so that the quantized model computes exactly the same function:

    Q_c(x) = s_c * (clamp(round(x / s_c) + z_c) - z_c)           (per-channel, channel c)
    r_c = s_c / s,  d_c = s * (z_c - z)                           (s = mean s_c, z = round(mean z_c))
    x'_c = x_c / r_c + d_c          => LayerNorm: gamma' = gamma / r,  beta' = beta / r + d
    Q(x'_c) = s * (clamp(round(x_c / s_c + z_c - z) + z) - z) = Q_c(x_c) / r_c + d_c
                                    (z_c - z is an integer, so it passes through the rounding)
    W Q_c(x) + b = W diag(r) (Q(x') - d) + b
                                    => Linear: W' = W diag(r),  b' = b - W' d

Any op between the two that acts on tokens and commutes with a positive per-channel affine map
(token selection, mean/max pooling, window partitioning without padding) keeps this exact. The new
weight W' gets its own per-channel weight grid (`QuantLinear.calibrate_weight`), as RepQ-ViT does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules import QuantLinear


@torch.no_grad()
def fold_input_scales(norm: nn.LayerNorm, linear: QuantLinear) -> None:
    """Move `linear`'s per-channel input grid into `norm`'s affine and `linear`'s weight and bias."""
    quantizer = linear.input_quantizer
    if quantizer.ch_axis is None or quantizer.scale.dim() == 0:
        raise ValueError("the input grid is already per-tensor; nothing to fold")
    s_c, z_c = quantizer.scale.float(), quantizer.zero_point.float()
    s = s_c.mean()
    z = z_c.mean().round().clamp(quantizer.qmin, quantizer.qmax)
    r = s_c / s
    d = s * (z_c - z)

    if norm.weight is None:  # LayerNorm without affine: give it one, starting at identity
        norm.weight = nn.Parameter(torch.ones_like(s_c))
        norm.bias = nn.Parameter(torch.zeros_like(s_c))
    elif norm.bias is None:
        norm.bias = nn.Parameter(torch.zeros_like(norm.weight))
    norm.weight.copy_(norm.weight / r)
    norm.bias.copy_(norm.bias / r + d)

    linear.weight.copy_(linear.weight * r)
    shift = linear.weight @ d
    if linear.bias is None:
        linear.bias = nn.Parameter(-shift)
    else:
        linear.bias.copy_(linear.bias - shift)

    quantizer.to_per_tensor(s, z)
    linear.calibrate_weight(force=True)
