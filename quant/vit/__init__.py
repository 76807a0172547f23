"""The transformer path: RepQ-ViT-style calibration of vision transformers (`quantize_transformer`).

It takes timm's ViT / DeiT / Swin attention; `transformer_problem` says whether a model is a
transformer this path quantizes, or names the attention it cannot take. The pieces (quantizers, the
matmul op, explicit attention, re-parameterization, rotation, GPTQ, reconstruction) are modules here.
"""

from __future__ import annotations

from torch import nn

from .attention import attention_problem, supported_attention
from .calibrate import TransformerSettings, quantize_transformer, rebuild_transformer


def transformer_problem(model: nn.Module) -> tuple[bool, str | None]:
    """(whether `model` has attention, or one line naming the module path and type of the first
    attention-like module this path cannot quantize). Supported: timm `Attention` / Swin
    `WindowAttention`, `nn.MultiheadAttention`, `nn.TransformerEncoderLayer` (`torch_attention`)."""
    found = False
    for name, module in model.named_modules():
        problem = attention_problem(module)
        if problem is not None:
            return True, f"{name or 'the model'}: {type(module).__name__} {problem}"
        found = found or supported_attention(module)
    return found, None


__all__ = ["TransformerSettings", "quantize_transformer", "rebuild_transformer", "transformer_problem"]
