"""Swap a transformer's layers for their fake-quantized forms, and find the LayerNorm pairs.

Takes timm's ViT / DeiT / Swin and PyTorch's attention (torchvision's ViT, `nn.TransformerEncoder`
models: `torch_attention`). `norm_linear_pairs` names every (LayerNorm, Linear) pair whose Linear's
input may take a per-channel grid that `reparam.fold_input_scales` can later fold into the
LayerNorm: the norm's output must reach only that Linear, through ops that commute with a
per-channel affine map. Everything else (post-norm layers included) gets per-tensor grids.
"""

from __future__ import annotations

from timm.layers import Attention
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torchvision.models import vision_transformer as tv_vit

from .attention import quantized_attention
from .layers import transformer_conv, transformer_linear
from .torch_attention import (
    QuantMultiheadAttention,
    QuantTransformerEncoderLayer,
    encoder_layer_problem,
    mha_problem,
    quantized_torch_module,
)

# Pooling types that commute with a positive per-channel affine map (so a head norm can be folded).
_AFFINE_SAFE_POOLS = ("token", "avg", "max", "avgmax", "")


def _is_linear_like(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Linear)


def _head_pair(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The (LayerNorm, classifier) pair at the end of a ViT or Swin, if folding there is exact."""
    if isinstance(model, tv_vit.VisionTransformer):  # pools the class token: x[:, 0]
        norm, first = model.encoder.ln, model.heads[0] if len(model.heads) else None
        exact = type(model).forward is tv_vit.VisionTransformer.forward and _is_norm(norm)
        return (norm, first) if exact and _is_linear_like(first) else None
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


def _is_norm(m: nn.Module | None) -> bool:
    return isinstance(m, nn.LayerNorm)


def _packed_mha(m: nn.Module | None) -> bool:
    """An `nn.MultiheadAttention` (float, or already explicit) whose q/k/v come from one `in_proj`."""
    if isinstance(m, nn.MultiheadAttention):
        return mha_problem(m) is None and m._qkv_same_embed_dim
    return isinstance(m, QuantMultiheadAttention) and m._qkv_same_embed_dim


def _encoder_layer(m: nn.Module) -> bool:
    """A (convertible) `nn.TransformerEncoderLayer` or its explicit form."""
    if isinstance(m, nn.TransformerEncoderLayer):
        return encoder_layer_problem(m) is None
    return isinstance(m, QuantTransformerEncoderLayer)


def _torch_pairs(m: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """Foldable pairs inside torchvision's `EncoderBlock` and a pre-norm `nn.TransformerEncoderLayer`
    (an attention module stands for its packed `in_proj`, which exists once it is converted)."""
    if type(m) is tv_vit.EncoderBlock:  # ln_1 -> self_attention(x, x, x); ln_2 -> mlp (Linear first)
        attn, norm2, fc1 = m.self_attention, m.ln_2, m.mlp[0] if len(m.mlp) else None
    elif _encoder_layer(m):
        if not m.norm_first:  # post-norm: the norms feed residual sums, not one Linear
            return []
        attn, norm2, fc1 = m.self_attn, m.norm2, m.linear1
    else:
        return []
    norm1 = m.ln_1 if type(m) is tv_vit.EncoderBlock else m.norm1
    pairs: list[tuple[nn.Module, nn.Module]] = []
    if _is_norm(norm1) and _packed_mha(attn):
        pairs.append((norm1, attn))
    if _is_norm(norm2) and _is_linear_like(fc1):
        pairs.append((norm2, fc1))
    return pairs


def _swin_pads(block: SwinTransformerBlock) -> bool:
    """Whether the block zero-pads after norm1 (padding breaks the exactness of folding)."""
    h, w = block.input_resolution
    wh, ww = block.window_size
    return h % wh != 0 or w % ww != 0 or bool(getattr(block, "dynamic_mask", False))


def norm_linear_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Names of every (LayerNorm, next Linear) pair of a float model whose Linear input can be
    quantized per channel and folded into the LayerNorm. The names are those after
    `convert_to_quantized` (an `nn.MultiheadAttention`'s packed projection: `<attention>.in_proj`)."""
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
        else:
            pairs.extend(_torch_pairs(m))
    head = _head_pair(model)
    if head is not None:
        pairs.append(head)
    names = {id(m): name for name, m in model.named_modules()}
    # an attention module stands for its `in_proj` (the Linear its conversion creates)
    return [
        (names[id(norm)], names[id(linear)] + (".in_proj" if _packed_mha(linear) else ""))
        for norm, linear in pairs
    ]


def _still_there(model: nn.Module, name: str, module: nn.Module) -> bool:
    try:
        return model.get_submodule(name) is module
    except AttributeError:
        return False


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def _edge_layers(model: nn.Module) -> tuple[set[int], nn.Module | None]:
    """(ids of the patch-embedding convs, the classifier) of a model whose Linears are not yet swapped.

    The patch embedding: every conv under a `patch_embed` (timm), else the first conv (torchvision's
    `conv_proj`). The classifier: `get_classifier()` (timm), else the model's last Linear
    (torchvision's `heads.head`)."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    patch = {id(m) for name, m in convs if "patch_embed" in name} or {id(m) for _, m in convs[:1]}
    if hasattr(model, "get_classifier"):
        return patch, model.get_classifier()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return patch, (linears[-1] if linears else None)


def convert_to_quantized(
    model: nn.Module,
    wbits: int,
    abits: int,
    patch_bits: tuple[int, int] = (8, 8),
    head_wbits: int = 8,
    per_channel_inputs: frozenset[str] = frozenset(),
    log_sqrt2_only: bool = False,
) -> nn.Module:
    """Replace, in place, every Linear, Conv2d and attention of `model` by a quantized one.

    Bits: weights `wbits` and activations `abits`, except the patch embedding (weight and image
    input bits: `patch_bits`) and the classifier weights (`head_wbits`); the classifier input
    stays at `abits` (RepQ-ViT's setting). Linears named in `per_channel_inputs` get per-channel
    input grids (see `norm_linear_pairs`). Post-softmax grids are log grids, log-sqrt2 if
    `log_sqrt2_only`, else with the base searched at calibration (`LogQuantizer`).
    PyTorch's `nn.TransformerEncoderLayer` / `nn.MultiheadAttention` are made explicit first (their
    fused paths hide the products), so their Linears are swapped below like any other.
    """
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False  # the nested fast path reads nn.MultiheadAttention's weights
        new = quantized_torch_module(m, abits, log_sqrt2_only)
        if new is not None and _still_there(model, name, m):  # not inside a layer replaced already
            _replace(model, name, new)
    patch_convs, head = _edge_layers(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear):
            bits = head_wbits if m is head else wbits
            _replace(
                model, name, transformer_linear(m, bits, abits, per_channel_input=name in per_channel_inputs)
            )
        elif isinstance(m, nn.Conv2d):
            conv_w, conv_a = patch_bits if id(m) in patch_convs else (wbits, abits)
            _replace(model, name, transformer_conv(m, conv_w, conv_a))
    for name, m in list(model.named_modules()):
        new = quantized_attention(m, abits, log_sqrt2_only)
        if new is not None:
            _replace(model, name, new)
    return model
