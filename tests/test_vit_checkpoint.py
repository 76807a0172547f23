"""benchmarks.vit_checkpoint: the CIFAR-10 ViT checkpoint layout converts into timm exactly.

A random state dict in the checkpoint's own layout (names and shapes as in the file benchmarks/README.md describes) is
converted, loaded strictly, and the timm model's logits are checked against a direct
implementation of the source architecture that reads the source tensors by their own names.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.vit_checkpoint import build_cifar_vit, convert_cifar_vit_state_dict, load_cifar_vit
from quant.errors import QuantError

DIM, DEPTH, HEADS, MLP, PATCH, IMG, CLASSES = 32, 2, 4, 64, 4, 16, 10
EPS = 1e-6


def source_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the checkpoint's names (small sizes, same layout)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=g)

    n_tokens = (IMG // PATCH) ** 2 + 1
    sd = {
        "embedding.cls_token": r(1, 1, DIM),
        "embedding.pos_embeddings": r(1, n_tokens, DIM),
        "embedding.patch_embeddings.conv.weight": r(DIM, 3, PATCH, PATCH),
        "embedding.patch_embeddings.conv.bias": r(DIM),
    }
    for i in range(DEPTH):
        p = f"encoder.layers.{i}."
        for norm in ("norm1", "norm2"):
            sd[p + norm + ".alpha"] = 1 + r(DIM)
            sd[p + norm + ".beta"] = r(DIM)
        for proj in ("query", "key", "value", "out_proj"):
            sd[p + f"attn.{proj}.weight"] = r(DIM, DIM)
            sd[p + f"attn.{proj}.bias"] = r(DIM)
        sd[p + "ffn.fc1.weight"], sd[p + "ffn.fc1.bias"] = r(MLP, DIM), r(MLP)
        sd[p + "ffn.fc2.weight"], sd[p + "ffn.fc2.bias"] = r(DIM, MLP), r(DIM)
    sd["norm.alpha"], sd["norm.beta"] = 1 + r(DIM), r(DIM)
    sd["mlp_head.weight"], sd["mlp_head.bias"] = r(CLASSES, DIM), r(CLASSES)
    return sd


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The source model (pre-norm ViT, separate q/k/v, cls token, GELU MLP), from its own names."""

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, (DIM,), sd[name + ".alpha"], sd[name + ".beta"], EPS)

    def lin(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(t, sd[name + ".weight"], sd[name + ".bias"])

    p = sd["embedding.patch_embeddings.conv.weight"], sd["embedding.patch_embeddings.conv.bias"]
    t = F.conv2d(x, *p, stride=PATCH).flatten(2).transpose(1, 2)
    t = torch.cat([sd["embedding.cls_token"].expand(len(x), -1, -1), t], 1) + sd["embedding.pos_embeddings"]
    b, n, hd = t.shape[0], t.shape[1], DIM // HEADS
    for i in range(DEPTH):
        p = f"encoder.layers.{i}."
        h = ln(t, p + "norm1")
        q, k, v = (
            lin(h, p + f"attn.{w}").view(b, n, HEADS, hd).transpose(1, 2) for w in ("query", "key", "value")
        )
        a = (q @ k.transpose(-2, -1) / math.sqrt(hd)).softmax(-1) @ v
        t = t + lin(a.transpose(1, 2).reshape(b, n, DIM), p + "attn.out_proj")
        t = t + lin(F.gelu(lin(ln(t, p + "norm2"), p + "ffn.fc1")), p + "ffn.fc2")
    return lin(ln(t, "norm")[:, 0], "mlp_head")


def _small_model():
    return build_cifar_vit(
        img_size=IMG, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP / DIM
    ).eval()


def test_converted_model_matches_the_source_architecture() -> None:
    sd = source_state_dict()
    model = _small_model()
    model.load_state_dict(convert_cifar_vit_state_dict(sd), strict=True)
    x = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(sd, x), rtol=1e-4, atol=1e-5)


def test_qkv_is_concatenated_in_query_key_value_order() -> None:
    sd = source_state_dict()
    out = convert_cifar_vit_state_dict(sd)
    qkv = out["blocks.1.attn.qkv.weight"]
    assert qkv.shape == (3 * DIM, DIM)
    for j, part in enumerate(("query", "key", "value")):
        assert torch.equal(qkv[j * DIM : (j + 1) * DIM], sd[f"encoder.layers.1.attn.{part}.weight"])


def test_load_cifar_vit_from_file(tmp_path) -> None:
    """The full-size layout (patch 4, dim 128, depth 4) loads strictly from a saved file."""
    full = build_cifar_vit()
    src = _to_source(full.state_dict())
    path = tmp_path / "vit.pth"
    torch.save(src, path)
    model = load_cifar_vit(path)
    assert not model.training
    for name, t in full.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name


def _to_source(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm names -> checkpoint names (test helper, the inverse of the converter)."""
    out = {
        "embedding.cls_token": sd["cls_token"],
        "embedding.pos_embeddings": sd["pos_embed"],
        "embedding.patch_embeddings.conv.weight": sd["patch_embed.proj.weight"],
        "embedding.patch_embeddings.conv.bias": sd["patch_embed.proj.bias"],
        "norm.alpha": sd["norm.weight"],
        "norm.beta": sd["norm.bias"],
        "mlp_head.weight": sd["head.weight"],
        "mlp_head.bias": sd["head.bias"],
    }
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b, p = f"blocks.{i}.", f"encoder.layers.{i}."
        for norm in ("norm1", "norm2"):
            out[p + norm + ".alpha"], out[p + norm + ".beta"] = (
                sd[b + norm + ".weight"],
                sd[b + norm + ".bias"],
            )
        for kind in ("weight", "bias"):
            q, k, v = sd[b + f"attn.qkv.{kind}"].chunk(3)
            out[p + f"attn.query.{kind}"], out[p + f"attn.key.{kind}"], out[p + f"attn.value.{kind}"] = (
                q,
                k,
                v,
            )
            out[p + f"attn.out_proj.{kind}"] = sd[b + f"attn.proj.{kind}"]
            out[p + f"ffn.fc1.{kind}"], out[p + f"ffn.fc2.{kind}"] = (
                sd[b + f"mlp.fc1.{kind}"],
                sd[b + f"mlp.fc2.{kind}"],
            )
    return out


def test_unknown_or_incomplete_checkpoints_are_rejected() -> None:
    sd = source_state_dict()
    with pytest.raises(QuantError, match="unexpected"):
        convert_cifar_vit_state_dict({**sd, "encoder.layers.0.extra.weight": torch.zeros(1)})
    del sd["encoder.layers.0.attn.key.bias"]
    with pytest.raises(QuantError, match="key"):
        convert_cifar_vit_state_dict(sd)
