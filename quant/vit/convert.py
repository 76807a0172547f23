"""Swap a timm transformer's layers for their fake-quantized forms, and find the LayerNorm pairs.

`norm_linear_pairs` names every (LayerNorm, Linear) pair whose Linear's input may take a
per-channel grid that `reparam.fold_input_scales` can later fold into the LayerNorm: the norm's
output must reach only that Linear, through ops that commute with a per-channel affine map.
Everything else gets per-tensor activation grids.
"""

from __future__ import annotations

from timm.layers import Attention
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .attention import quantized_attention
from .layers import QuantConv2d, QuantLinear

# Pooling types that commute with a positive per-channel affine map (so a head norm can be folded).
_AFFINE_SAFE_POOLS = ("token", "avg", "max", "avgmax", "")


def _is_linear_like(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Linear)


def _head_pair(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The (LayerNorm, classifier) pair at the end of a ViT or Swin, if folding there is exact."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not _is_linear_like(head):
        return None
    if isinstance(model, VisionTransformer):
        if getattr(model, "attn_pool", None) is not None or getattr(model, "head_dist", None) is not None:
            return None
        if isinstance(model.fc_norm, nn.LayerNorm):
            return model.fc_norm, head
        if isinstance(model.fc_norm, nn.Identity) and isinstance(model.norm, nn.LayerNorm):
            return (model.norm, head) if model.global_pool in _AFFINE_SAFE_POOLS else None
        return None
    if isinstance(model, SwinTransformer) and isinstance(model.norm, nn.LayerNorm):
        return (model.norm, head) if model.global_pool in _AFFINE_SAFE_POOLS else None
    return None


def _swin_pads(block: SwinTransformerBlock) -> bool:
    """Whether the block zero-pads after norm1 (padding breaks the exactness of folding)."""
    h, w = block.input_resolution
    wh, ww = block.window_size
    return h % wh != 0 or w % ww != 0 or bool(getattr(block, "dynamic_mask", False))


def norm_linear_pairs(model: nn.Module, include_head: bool = True) -> list[tuple[str, str]]:
    """Names of every (LayerNorm, next Linear) pair of a float model whose Linear input can be
    quantized per channel and folded into the LayerNorm."""
    pairs = []
    for m in model.modules():
        attn = getattr(m, "attn", None)
        mlp = getattr(m, "mlp", None)
        pre_norm_vit = (
            isinstance(m, Block) and type(attn) is Attention and getattr(attn, "gate", None) is None
        )
        pre_norm_swin = isinstance(m, SwinTransformerBlock) and not _swin_pads(m)
        if pre_norm_vit or pre_norm_swin:
            if isinstance(m.norm1, nn.LayerNorm) and _is_linear_like(attn.qkv):
                pairs.append((m.norm1, attn.qkv))
            if isinstance(m.norm2, nn.LayerNorm) and _is_linear_like(getattr(mlp, "fc1", None)):
                pairs.append((m.norm2, mlp.fc1))
        elif isinstance(m, PatchMerging) and isinstance(m.norm, nn.LayerNorm):
            pairs.append((m.norm, m.reduction))
    head = _head_pair(model) if include_head else None
    if head is not None:
        pairs.append(head)
    names = {id(m): name for name, m in model.named_modules()}
    return [(names[id(norm)], names[id(linear)]) for norm, linear in pairs]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def convert_to_quantized(
    model: nn.Module,
    wbits: int,
    abits: int,
    patch_bits: tuple[int, int] = (8, 8),
    head_wbits: int = 8,
    per_channel_inputs: frozenset[str] = frozenset(),
    log_sqrt2_only: bool = False,
) -> nn.Module:
    """Replace, in place, every Linear, Conv2d and timm attention of `model` by a quantized one.

    Bits: weights `wbits` and activations `abits`, except the patch embedding (weight and image
    input bits: `patch_bits`) and the classifier weights (`head_wbits`); the classifier input
    stays at `abits` (RepQ-ViT's setting). Linears named in `per_channel_inputs` get per-channel
    input grids (see `norm_linear_pairs`). Post-softmax grids are log grids, log-sqrt2 if
    `log_sqrt2_only`, else with the base searched at calibration (`LogQuantizer`).
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    patch_convs = {id(m) for name, m in model.named_modules() if "patch_embed" in name}
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear):
            bits = head_wbits if m is head else wbits
            _replace(model, name, QuantLinear(m, bits, abits, per_channel_input=name in per_channel_inputs))
        elif isinstance(m, nn.Conv2d):
            conv_w, conv_a = patch_bits if id(m) in patch_convs else (wbits, abits)
            _replace(model, name, QuantConv2d(m, conv_w, conv_a))
    for name, m in list(model.named_modules()):
        new = quantized_attention(m, abits, log_sqrt2_only)
        if new is not None:
            _replace(model, name, new)
    return model
