"""Per-head Hadamard rotation of q, k, v (`quant.vit.rotate`).

What must hold: the rotated model computes the same function (ViT, DeiT and Swin attention); it
is what the 4-bit q and k grids see that changes, and for heads with outlier dimensions the
per-tensor 4-bit error of q @ k^T falls; attentions where a rotation would not be exact are left
alone; `quant.quantize` rotates a transformer by default and not with `rotate_heads=False`.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import Attention

import quant
from quant import TransformerSettings
from quant.errors import QuantError
from quant.quantizers import fake_quant, grid_from_range
from quant.vit.rotate import hadamard, rotate_heads
from tests.test_vit import _make, _one_thread  # noqa: F401  (the autouse one-thread fixture)


@pytest.mark.parametrize("n", [1, 2, 16, 64])
def test_hadamard_is_orthonormal(n: int) -> None:
    h = hadamard(n)
    assert torch.allclose(h @ h.t(), torch.eye(n, dtype=h.dtype), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))  # every entry spreads equally


@pytest.mark.parametrize("n", [0, 3, 48])
def test_hadamard_needs_a_power_of_two(n: int) -> None:
    with pytest.raises(ValueError, match=str(n)):
        hadamard(n)


@pytest.mark.parametrize("name,attentions", [("vit", 2), ("deit", 2), ("swin", 4)])
def test_rotation_keeps_the_function(name: str, attentions: int) -> None:
    model = _make(name)
    rotated = copy.deepcopy(model)
    assert rotate_heads(rotated, values=True) == attentions
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(rotated(x), model(x), atol=1e-4, rtol=1e-4)
    # the weights did change: q, k and v rows of qkv, and the projection's columns
    a, b = (
        next(m for m in model.modules() if hasattr(m, "qkv")),
        next(m for m in rotated.modules() if hasattr(m, "qkv")),
    )
    dim = a.qkv.in_features
    for part in range(3):
        rows = slice(part * dim, (part + 1) * dim)
        assert not torch.allclose(a.qkv.weight[rows], b.qkv.weight[rows])
    assert not torch.allclose(a.proj.weight, b.proj.weight)


def _qk(attn: Attention, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, _ = tokens.shape
    qkv = attn.qkv(tokens).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1]


def _qk_error_4bit(q: torch.Tensor, k: torch.Tensor) -> float:
    """Relative error of q @ k^T with q and k each on one per-tensor 4-bit min/max grid."""

    def fq(t: torch.Tensor) -> torch.Tensor:
        scale, zp = grid_from_range(t.min(), t.max(), 0, 15, symmetric=False)
        return fake_quant(t, scale, zp, 0, 15)

    ref = q @ k.transpose(-2, -1)
    return float((fq(q) @ fq(k).transpose(-2, -1) - ref).norm() / ref.norm())


@torch.no_grad()
def test_rotation_shrinks_the_qk_error_of_outlier_dimensions() -> None:
    torch.manual_seed(0)
    attn = Attention(dim=64, num_heads=2, qkv_bias=True).eval()
    attn.qkv.weight[[0, 5, 64, 69]] *= 12  # a few q and k dimensions carry most of the range
    tokens = torch.randn(8, 17, 64)
    before = _qk_error_4bit(*_qk(attn, tokens))
    rotated = copy.deepcopy(attn)
    assert rotate_heads(rotated) == 1
    q, k = _qk(rotated, tokens)
    q0, k0 = _qk(attn, tokens)
    assert torch.allclose(q @ k.transpose(-2, -1), q0 @ k0.transpose(-2, -1), atol=1e-3)
    after = _qk_error_4bit(q, k)
    assert after < 0.6 * before, (before, after)


def test_attentions_where_rotation_is_not_exact_are_left_alone() -> None:
    torch.manual_seed(0)
    normed = Attention(
        dim=64, num_heads=2, qk_norm=True, norm_layer=torch.nn.LayerNorm
    ).eval()  # over the head dim
    odd = Attention(dim=48, num_heads=2).eval()  # head dim 24: no Sylvester-Hadamard matrix
    for attn in (normed, odd):
        before = copy.deepcopy(attn.state_dict())
        assert rotate_heads(attn) == 0
        assert all(torch.equal(before[k], v) for k, v in attn.state_dict().items())


def test_by_default_only_q_and_k_rotate() -> None:
    torch.manual_seed(0)
    attn = Attention(dim=64, num_heads=2).eval()
    ref = copy.deepcopy(attn)
    assert rotate_heads(attn) == 1
    assert torch.equal(attn.qkv.weight[128:], ref.qkv.weight[128:])
    assert torch.equal(attn.proj.weight, ref.proj.weight)
    assert not torch.equal(attn.qkv.weight[:128], ref.qkv.weight[:128])


def test_quantize_rotates_a_vit_by_default_and_can_be_told_not_to() -> None:
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10
    ).eval()
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cfg = dict(wbits=8, abits=8, calib_size=8, gptq=False)
    # reparam=False: the weights as calibrated, before the LayerNorm scales are folded into them
    rotated = quant.quantize(model, calib, TransformerSettings(**cfg, reparam=False)).model
    plain = quant.quantize(model, calib, TransformerSettings(**cfg, rotate_heads=False, reparam=False)).model
    w0 = model.blocks[0].attn.qkv.weight
    assert torch.equal(plain.blocks[0].attn.qkv.weight, w0)
    h = hadamard(16).float()
    for head in range(2):  # q of each head
        rows = slice(16 * head, 16 * (head + 1))
        assert torch.allclose(rotated.blocks[0].attn.qkv.weight[rows], h.t() @ w0[rows], atol=1e-6)
    with pytest.raises(QuantError, match="rotate_heads"):
        TransformerSettings(**cfg, rotate_heads="yes")
