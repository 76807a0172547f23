"""The transformer path on PyTorch's own attention: torchvision's ViT and `nn.TransformerEncoder`
models (pre- and post-norm), tiny and random, CPU only.

What must hold: the explicit attention and encoder layer compute what PyTorch's do; the front door
sends these models to the transformer path (it used to send them to the CNN path, which broke
`nn.MultiheadAttention`); torchvision's ViT quantizes exactly as timm's ViT with the same weights;
W8A8 stays close to fp32 and W4A4 well above chance; reconstruction runs; a saved model reloads to
identical logits; what is still unsupported is refused in one line.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import Attention
from torch import nn

import quant
from quant.errors import QuantError
from quant.modules import set_quant_state
from quant.vit.convert import norm_linear_pairs
from quant.vit.quantizers import SearchedUniformQuantizer
from quant.vit.reconstruct import _feeds, transformer_blocks
from quant.vit.rotate import rotate_heads
from quant.vit.torch_attention import QuantMultiheadAttention, QuantTransformerEncoderLayer
from tests.test_vit import _one_thread  # noqa: F401  (the autouse one-thread fixture)


class EncoderNet(nn.Module):
    """Conv patch embedding, `nn.TransformerEncoder`, mean pool, Linear head (optionally with a
    causal mask, or sequence-first layers)."""

    def __init__(self, norm_first: bool, batch_first: bool = True, causal: bool = False) -> None:
        super().__init__()
        self.batch_first, self.causal = batch_first, causal
        self.patch = nn.Conv2d(3, 32, 8, 8)
        self.pos = nn.Parameter(0.5 * torch.randn(1, 16, 32))
        layer = nn.TransformerEncoderLayer(
            32, 2, 64, dropout=0.1, activation="gelu", batch_first=batch_first, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32), enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1]) if self.causal else None
        if not self.batch_first:
            return self.head(self.encoder(x.transpose(0, 1), mask=mask).mean(0))
        return self.head(self.encoder(x, mask=mask).mean(1))


def _torchvision_vit() -> nn.Module:
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision zero-inits the head
    return model


MODELS = {
    "torchvision": _torchvision_vit,
    "pre_norm": lambda: EncoderNet(norm_first=True),
    "post_norm": lambda: EncoderNet(norm_first=False),
    "seq_first_causal": lambda: EncoderNet(norm_first=True, batch_first=False, causal=True),
}
EXTRA = {"causal": lambda: EncoderNet(norm_first=True, causal=True)}


def _make(name: str) -> nn.Module:
    torch.manual_seed(0)
    return {**MODELS, **EXTRA}[name]().eval()


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 3, 32, 32, generator=g), torch.randn(64, 3, 32, 32, generator=g)


def _compare(q: nn.Module, model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(relative logit error, top-1 agreement) of `q` against the float `model` on `x`."""
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item(), (out.argmax(1) == ref.argmax(1)).float().mean().item()


MASKS = {
    "none": {},
    "causal_float": {"attn_mask": nn.Transformer.generate_square_subsequent_mask(5)},
    "bool_mask": {"attn_mask": torch.ones(5, 5, dtype=torch.bool).triu(1)},
    "is_causal": {"attn_mask": nn.Transformer.generate_square_subsequent_mask(5), "is_causal": True},
    "padding": {"key_padding_mask": torch.tensor([[False] * 4 + [True]] * 5)},
    "head_weights": {"average_attn_weights": False},
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", list(MASKS))
def test_explicit_mha_equals_torch_in_float(batch_first: bool, mask: str) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    q = QuantMultiheadAttention(mha, 8)
    set_quant_state(q, False)
    x = torch.randn(5, 5, 32)
    with torch.no_grad():
        (a, wa), (b, wb) = mha(x, x, x, **MASKS[mask]), q(x, x, x, **MASKS[mask])
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(wb, wa, rtol=1e-5, atol=1e-6)
        assert q(x, x, x, need_weights=False)[1] is None
        torch.testing.assert_close(q(x[0], x[0], x[0])[0], mha(x[0], x[0], x[0])[0])  # unbatched


def test_separate_projections_take_cross_attention_packed_ones_refuse_it() -> None:
    torch.manual_seed(0)
    cross = nn.MultiheadAttention(32, 2, kdim=16, vdim=8, batch_first=True).eval()
    q = QuantMultiheadAttention(cross, 8)
    set_quant_state(q, False)
    x, k, v = torch.randn(2, 5, 32), torch.randn(2, 7, 16), torch.randn(2, 7, 8)
    with torch.no_grad():
        torch.testing.assert_close(q(x, k, v)[0], cross(x, k, v)[0], rtol=1e-5, atol=1e-6)
    packed = QuantMultiheadAttention(nn.MultiheadAttention(32, 2, batch_first=True), 8)
    with pytest.raises(QuantError, match="self-attention only"):
        packed(x, x.clone(), x.clone())


@pytest.mark.parametrize("norm_first", [True, False])
def test_explicit_encoder_layer_equals_torch_in_eval(norm_first: bool) -> None:
    """Equal to the layer's eval fast path (dropout 0.1 is off in eval in both)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True, norm_first=norm_first).eval()
    q = QuantTransformerEncoderLayer(layer, 8)
    set_quant_state(q, False)
    x = torch.randn(3, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(q(x), layer(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_front_door_says_transformer(name: str) -> None:
    assert quant.model_family(_make(name)) == "transformer"


def test_unsupported_attention_is_refused_in_one_line() -> None:
    class RopeLikeAttention(Attention):  # a timm subclass computes something else
        pass

    timm_like = nn.Module()
    timm_like.blocks = nn.Sequential(RopeLikeAttention(8))
    bias_kv = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(8, 2, add_bias_kv=True))
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2), 1)
    cases = [
        ("blocks.0: RopeLikeAttention attention is not supported", timm_like),
        ("1: MultiheadAttention attention is not supported .*add_bias_kv", bias_kv),
        ("1: TransformerDecoder .*cross-attention", nn.Sequential(nn.Linear(4, 4), decoder)),
    ]
    for pattern, model in cases:
        with pytest.raises(QuantError, match=pattern) as err:
            quant.quantize(model, torch.randn(2, 3, 8, 8))
        assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "name,pairs",
    [
        (
            "torchvision",
            [
                (
                    "encoder.layers.encoder_layer_0.ln_1",
                    "encoder.layers.encoder_layer_0.self_attention.in_proj",
                ),
                ("encoder.layers.encoder_layer_0.ln_2", "encoder.layers.encoder_layer_0.mlp.0"),
                (
                    "encoder.layers.encoder_layer_1.ln_1",
                    "encoder.layers.encoder_layer_1.self_attention.in_proj",
                ),
                ("encoder.layers.encoder_layer_1.ln_2", "encoder.layers.encoder_layer_1.mlp.0"),
                ("encoder.ln", "heads.head"),
            ],
        ),
        (
            "pre_norm",
            [
                ("encoder.layers.0.norm1", "encoder.layers.0.self_attn.in_proj"),
                ("encoder.layers.0.norm2", "encoder.layers.0.linear1"),
                ("encoder.layers.1.norm1", "encoder.layers.1.self_attn.in_proj"),
                ("encoder.layers.1.norm2", "encoder.layers.1.linear1"),
            ],
        ),
        ("post_norm", []),
    ],
)
def test_folding_pairs(name: str, pairs: list[tuple[str, str]]) -> None:
    assert norm_linear_pairs(_make(name)) == pairs


@pytest.mark.parametrize("name", ["torchvision", "pre_norm"])
def test_reparameterized_equals_per_channel(name: str, data) -> None:
    """Folding the per-channel grids of those pairs into the LayerNorms leaves the quantized function
    unchanged (float weights, 4-bit activations; no head rotation, whose float rounding in the folded
    in_proj can flip a 4-bit rounding further on)."""
    model = _make(name)
    calib, x = data
    cfg = dict(wbits=32, abits=4, first_last_bits=32, rotate_heads=False)
    per_channel = quant.quantize(model, calib, quant.TransformerSettings(**cfg, reparam=False))
    folded = quant.quantize(model, calib, quant.TransformerSettings(**cfg))
    axes = [
        {q.ch_axis for q in m.modules() if isinstance(q, SearchedUniformQuantizer)}
        for m in (per_channel, folded)
    ]
    assert axes == [{None, -1}, {None}]
    with torch.no_grad():
        ref, out, fp = per_channel(x), folded(x), model(x)
    assert (ref - fp).abs().max() > 1e-2 * fp.abs().max()  # 4-bit activations do change it
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_torchvision_vit_quantizes_exactly_like_timm_with_the_same_weights(data) -> None:
    """Same function, same pairs, bits, rotation and GPTQ: the quantized logits are identical."""
    tv = _make("torchvision")
    tm = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
        num_classes=10,
    ).eval()  # fmt: skip
    state = {
        "patch_embed.proj": tv.conv_proj, "norm": tv.encoder.ln, "head": tv.heads.head,
        "cls_token": tv.class_token, "pos_embed": tv.encoder.pos_embedding,
    }  # fmt: skip
    for i, b in enumerate(tv.encoder.layers):
        attn = b.self_attention
        state.update({
            f"blocks.{i}.norm1": b.ln_1, f"blocks.{i}.norm2": b.ln_2, f"blocks.{i}.attn.proj": attn.out_proj,
            f"blocks.{i}.mlp.fc1": b.mlp[0], f"blocks.{i}.mlp.fc2": b.mlp[3],
            f"blocks.{i}.attn.qkv.weight": attn.in_proj_weight, f"blocks.{i}.attn.qkv.bias": attn.in_proj_bias,
        })  # fmt: skip
    flat = {}
    for key, value in state.items():
        if isinstance(value, nn.Module):
            flat.update({f"{key}.{k}": v for k, v in value.state_dict().items()})
        else:
            flat[key] = value.detach()
    tm.load_state_dict(flat)
    calib, x = data
    with torch.no_grad():
        torch.testing.assert_close(tm(x), tv(x), rtol=1e-4, atol=1e-5)
    settings = quant.TransformerSettings(wbits=4, abits=4)
    q_tv, q_tm = quant.quantize(tv, calib, settings), quant.quantize(tm, calib, settings)
    with torch.no_grad():
        out = q_tv(x)
        torch.testing.assert_close(out, q_tm(x), rtol=1e-4, atol=1e-5)
        assert (out - tv(x)).abs().max() > 1e-2  # it did quantize


@pytest.mark.parametrize("name", list(MODELS))
def test_w8a8_close_to_fp32(name: str, data) -> None:
    model = _make(name)
    calib, x = data
    q = quant.quantize(model, calib, quant.TransformerSettings(wbits=8, abits=8))
    assert q.family == "transformer"
    assert {QuantMultiheadAttention} <= {type(m) for m in q.modules()}
    rel, agree = _compare(q, model, x)
    # W4A4 gives 0.35 / 0.14-0.16 here; torchvision's xavier-initialised random MLPs are harder
    assert 0 < rel < (0.15 if name == "torchvision" else 0.05) and agree >= 0.9, (rel, agree)


@pytest.mark.parametrize("name", ["torchvision", "pre_norm", "post_norm"])
def test_w4a4_runs_finite_and_above_chance(name: str, data) -> None:
    """Chance is 0.1; W4A4 measures 0.81-0.92 top-1 agreement here, W8A2 0.47-0.73."""
    model = _make(name)
    calib, x = data
    rel, agree = _compare(quant.quantize(model, calib, quant.TransformerSettings(wbits=4, abits=4)), model, x)
    assert rel < (0.5 if name == "torchvision" else 0.25) and agree > 0.6, (rel, agree)


@pytest.mark.parametrize(
    "name,blocks,chained",
    [
        ("torchvision", ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"], [False, True]),
        ("pre_norm", ["encoder.layers.0", "encoder.layers.1"], [False, True]),
        # masked or sequence-first: replaying block(x) on batch rows would compute something else
        ("causal", [], []),
        ("seq_first_causal", [], []),
    ],
)
def test_w4a4_reconstruction_runs(name: str, blocks: list[str], chained: list[bool], data) -> None:
    model = _make(name)
    calib, x = data
    q = quant.quantize(model, calib[:16], quant.TransformerSettings(wbits=4, abits=4, iters=3))
    assert list(q.history) == blocks and all(len(h) == 3 for h in q.history.values())
    assert transformer_blocks(q.model) == blocks
    assert [_feeds(q.model, a, b) for a, b in zip([None, *blocks], blocks)] == chained
    assert torch.isfinite(q(x)).all()


@pytest.mark.parametrize("name", ["torchvision", "post_norm"])
def test_save_then_load_gives_identical_logits(name: str, data, tmp_path) -> None:
    model = _make(name)
    calib, x = data
    q = quant.quantize(model, calib, quant.TransformerSettings(wbits=4, abits=4))
    q.save(tmp_path / "q.pt")
    loaded = quant.load(tmp_path / "q.pt", model=copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_head_rotation_covers_the_packed_in_proj() -> None:
    model = _make("torchvision")
    rotated = copy.deepcopy(model)
    assert rotate_heads(rotated, values=True) == 2
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rotated(x), model(x), rtol=1e-4, atol=1e-5)
    a = model.encoder.layers[0].self_attention
    b = rotated.encoder.layers[0].self_attention
    assert not torch.allclose(a.in_proj_weight[:32], b.in_proj_weight[:32])
    assert not torch.allclose(F.normalize(a.out_proj.weight), F.normalize(b.out_proj.weight))
