"""Post-training quantization of vision transformers (timm ViT, DeiT, Swin), RepQ-ViT style.

Public API: `is_transformer(model)` and `quantize_vit(model, calib, config)`; the pieces
(quantizers, quantized layers, explicit attention, re-parameterization) live in their own modules.
"""

from __future__ import annotations

from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .calibrate import ViTQuantSettings, quantize_vit
from .layers import QuantConv2d, QuantLinear, QuantMatMul, set_quant_enabled
from .quantizers import LogQuantizer, LogSqrt2Quantizer, SearchedUniformQuantizer


def is_transformer(model: nn.Module) -> bool:
    """Whether `model` is a timm transformer this path quantizes (ViT and DeiT, Swin)."""
    return isinstance(model, (VisionTransformer, SwinTransformer))


__all__ = [
    "LogQuantizer",
    "LogSqrt2Quantizer",
    "QuantConv2d",
    "QuantLinear",
    "QuantMatMul",
    "SearchedUniformQuantizer",
    "ViTQuantSettings",
    "is_transformer",
    "quantize_vit",
    "set_quant_enabled",
]
