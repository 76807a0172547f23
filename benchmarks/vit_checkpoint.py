"""Load the CIFAR-10 ViT checkpoint of benchmarks/README.md (a from-scratch pre-norm ViT) into timm.

The checkpoint's layout (`embedding.*`, `encoder.layers.<i>.*`, separate query/key/value
projections, LayerNorm `alpha`/`beta`, `mlp_head`) maps one-to-one onto timm's
`VisionTransformer(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2)`,
so the quantizer (which knows timm models) can take it unchanged.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from quant.errors import QuantError

# CIFAR-10 preprocessing of this checkpoint: /255, then these (benchmarks/README.md).
CIFAR_VIT_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_VIT_STD = (0.2470, 0.2435, 0.2616)

# Source name -> timm name, for every tensor that is renamed one-to-one.
_RENAMES = (
    (r"embedding\.cls_token", "cls_token"),
    (r"embedding\.pos_embeddings", "pos_embed"),
    (r"embedding\.patch_embeddings\.conv\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layers\.(\d+)\.norm([12])\.alpha", r"blocks.\1.norm\2.weight"),
    (r"encoder\.layers\.(\d+)\.norm([12])\.beta", r"blocks.\1.norm\2.bias"),
    (r"encoder\.layers\.(\d+)\.attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.(\d+)\.ffn\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"norm\.alpha", "norm.weight"),
    (r"norm\.beta", "norm.bias"),
    (r"mlp_head\.(weight|bias)", r"head.\1"),
)
_QKV = re.compile(r"encoder\.layers\.(\d+)\.attn\.(query|key|value)\.(weight|bias)")


def build_cifar_vit(**overrides: object) -> VisionTransformer:
    """The timm model the checkpoint loads into (random weights); `overrides` resize it for tests."""
    kwargs = dict(
        img_size=32,
        patch_size=4,
        embed_dim=128,
        depth=4,
        num_heads=4,
        mlp_ratio=2,
        num_classes=10,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    kwargs.update(overrides)
    return VisionTransformer(**kwargs)


def convert_cifar_vit_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the checkpoint's tensors to timm's, concatenating query/key/value into `qkv`."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in sd.items():
        match = _QKV.fullmatch(name)
        if match:
            layer, part, kind = match.groups()
            qkv.setdefault((int(layer), kind), {})[part] = tensor
            continue
        for pattern, target in _RENAMES:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, target, name)] = tensor
                break
        else:
            raise QuantError(f"unexpected tensor {name!r} in the CIFAR ViT checkpoint")
    for (layer, kind), parts in sorted(qkv.items()):
        missing = {"query", "key", "value"} - parts.keys()
        if missing:
            raise QuantError(f"layer {layer} {kind}: missing {sorted(missing)} projection(s)")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0
        )
    return out


def load_cifar_vit(path: str | Path) -> VisionTransformer:
    """The checkpoint at `path` as an eval-mode timm `VisionTransformer` (loaded strictly)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    model = build_cifar_vit()
    model.load_state_dict(convert_cifar_vit_state_dict(sd), strict=True)
    return model.eval()


def cifar_vit() -> tuple[VisionTransformer, dict]:
    """Model spec `benchmarks.vit_checkpoint:cifar_vit` (random weights, with the checkpoint's data
    config): what the engine's classifier-based generators load, with a `convert_for_timm` checkpoint."""
    config = {"input_size": (3, 32, 32), "mean": CIFAR_VIT_MEAN, "std": CIFAR_VIT_STD, "crop_pct": 1.0,
              "interpolation": "bilinear", "num_classes": 10}  # fmt: skip
    return build_cifar_vit().eval(), config


def convert_for_timm(src: str | Path, dst: str | Path) -> None:
    """Save the checkpoint at `src` under timm's tensor names at `dst` (loadable with --checkpoint)."""
    model = load_cifar_vit(src)
    torch.save(model.state_dict(), dst)
