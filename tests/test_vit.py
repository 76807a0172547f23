"""The ViT path (quant.vit): tiny random timm ViT / DeiT / Swin models, CPU only.

What must hold: W8A8 stays close to fp32; the re-parameterized (per-tensor) model computes what the
per-channel model computes; W4A4 runs end to end; the explicit-matmul attention equals timm's.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import quant
from quant import CNNSettings, TransformerSettings
from quant.errors import QuantError
from quant.modules import set_quant_state
from quant.vit import transformer_problem
from quant.vit.attention import QuantAttention, QuantWindowAttention
from quant.vit.calibrate import quantize_transformer
from quant.vit.layers import transformer_linear
from quant.vit.quantizers import LogQuantizer, LogSqrt2Quantizer, SearchedUniformQuantizer
from quant.vit.reparam import fold_input_scales

MODELS = {
    "vit": lambda: timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10
    ),
    "deit": lambda: timm.create_model(
        "deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10
    ),
    "swin": lambda: timm.create_model(
        "swin_tiny_patch4_window7_224",
        img_size=32,
        window_size=4,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(1, 2),
        num_classes=10,
    ),
}


def _make(name: str) -> nn.Module:
    """A tiny model with non-trivial LayerNorm affines (a few outlier channels, like trained ViTs)."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.weight[:2] *= 6
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))
    return model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Calibration is many small ops; on a loaded 2-core box one thread is far faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(32, 3, 32, 32, generator=g), torch.randn(16, 3, 32, 32, generator=g)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean().item()


@pytest.mark.parametrize("name", list(MODELS))
def test_is_transformer(name: str) -> None:
    assert quant.model_family(MODELS[name]()) == "transformer"
    assert transformer_problem(MODELS[name]()) == (True, None)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(10))
    assert quant.model_family(cnn) == "cnn"
    assert transformer_problem(cnn) == (False, None)


@pytest.mark.parametrize("name", list(MODELS))
def test_explicit_attention_equals_timm_in_float(name: str, data) -> None:
    """With quantization off, the rewritten model (incl. Swin's bias and shift mask) is timm's."""
    model = _make(name)
    calib, x = data
    q = quant.quantize(model, calib, TransformerSettings(wbits=8, abits=8))
    assert q.family == "transformer" and q.method == "repq-vit"
    attn_types = {type(m) for m in q.modules()} & {QuantAttention, QuantWindowAttention}
    assert attn_types == {QuantWindowAttention if name == "swin" else QuantAttention}
    set_quant_state(q, False)
    # re-parameterization changed the affines, not the float function
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_w8a8_close_to_fp32(name: str, data) -> None:
    model = _make(name)
    calib, x = data
    q = quant.quantize(model, calib, TransformerSettings(wbits=8, abits=8))
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert not torch.equal(ref, out)  # it did quantize
    assert _cosine(out, ref) > 0.99


@pytest.mark.parametrize("name", list(MODELS))
def test_reparameterized_equals_per_channel(name: str, data) -> None:
    """Folding the per-channel post-LayerNorm grids leaves the quantized function unchanged.

    Weights stay float here (the folded Linears' weight grids are refitted after folding, which
    is the one intended difference); every activation is quantized at 4 bits.
    """
    model = _make(name)
    calib, x = data
    cfg = dict(wbits=32, abits=4, first_last_bits=32)
    per_channel = quant.quantize(model, calib, TransformerSettings(**cfg, reparam=False))
    folded = quant.quantize(model, calib, TransformerSettings(**cfg))

    def act_axes(m: nn.Module) -> set:
        return {q.ch_axis for q in m.modules() if isinstance(q, SearchedUniformQuantizer)}

    assert act_axes(per_channel) == {None, -1}  # the test is not vacuous
    assert act_axes(folded) == {None}  # deployable: per-tensor activations only
    with torch.no_grad():
        ref, out, fp = per_channel(x), folded(x), model(x)
    assert (ref - fp).abs().max() > 1e-2 * fp.abs().max()  # 4-bit activations do change it
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("name", list(MODELS))
def test_w4a4_end_to_end(name: str, data) -> None:
    model = _make(name)
    calib, x = data
    q = quant.quantize(model, calib, TransformerSettings(wbits=4, abits=4, seed=0, device="cpu"))
    with torch.no_grad():
        out, ref = q(x), model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert _cosine(out, ref) > 0.5
    assert q.calibration_seconds > 0
    # the input model is untouched (an exact type check: the quantized Linear subclasses nn.Linear)
    assert type(model.get_classifier()) is nn.Linear


def test_first_last_bits_none_quantizes_the_edges_like_the_rest(data) -> None:
    """`first_last_bits=None`: the patch embedding (weights and image input) and the classifier take
    `wbits`/`abits` too. The CNN path's settings are not taken for a transformer (they were once
    read duck-typed): they are refused in one line."""
    q = quant.quantize(_make("vit"), data[0], TransformerSettings(wbits=6, abits=6, first_last_bits=None))
    patch = q.model.patch_embed.proj
    assert patch.weight_quantizer.bits == 6 and patch.input_quantizer.bits == 6
    assert q.model.get_classifier().weight_quantizer.bits == 6
    with pytest.raises(QuantError, match="TransformerSettings, got CNNSettings") as info:
        quant.quantize(
            _make("vit"), data[0], CNNSettings(wbits=6, abits=6, method="rtn", first_last_bits=None)
        )
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(wbits=1, abits=8),
        dict(wbits=8, abits=9),
        dict(wbits=8, abits=8, first_last_bits=0),
        dict(wbits=8, abits=8, calib_size=0),
        dict(wbits=8, abits=8, iters=-1),
        dict(wbits=8, abits=8, method="rtn"),  # a CNN method
    ],
)
def test_bad_config_is_a_quant_error(cfg) -> None:
    """Refused when the settings are made, before any model is touched."""
    with pytest.raises(QuantError):
        TransformerSettings(**cfg)


def test_unknown_setting_is_a_quant_error() -> None:
    """A field this path does not have (the settings are no longer read duck-typed from any object,
    where a missing or misnamed field was the error) is refused by name."""
    with pytest.raises(QuantError, match="TransformerSettings has no setting 'recon_images'"):
        quant.settings_for("transformer", wbits=8, abits=8, recon_images=16)


def test_bad_calibration_is_a_quant_error() -> None:
    settings = TransformerSettings(wbits=8, abits=8)
    with pytest.raises(QuantError):
        quant.quantize(_make("vit"), torch.randn(0, 3, 32, 32), settings)
    with pytest.raises(QuantError):
        quant.quantize(_make("vit"), torch.zeros(2, 3, 32, 32, dtype=torch.uint8), settings)
    with pytest.raises(QuantError):  # the path's own entry point checks too
        quantize_transformer(_make("vit"), torch.zeros(2, 3, 32, 32, dtype=torch.uint8), settings)


def test_calib_size_limits_the_batch(data) -> None:
    """Only the first `calib_size` images set the grids."""
    calib = data[0]
    cfg = TransformerSettings(wbits=8, abits=8, calib_size=8)
    a = quant.quantize(_make("vit"), calib, cfg)
    b = quant.quantize(_make("vit"), torch.cat([calib[:8], 100 * calib[8:]]), cfg)
    torch.testing.assert_close(a.state_dict(), b.state_dict())


def test_cli_calibration_size_is_the_paths_calib_size(data) -> None:
    """`dfq quantize --calib-size` (alias `--vit-calib-size`) is the transformer path's `calib_size`,
    which the front door passes on unchanged; a size below 1 is refused by name."""
    from launch.cli import build_parser
    from launch.cmd_quantize import _settings

    for flag in ("--calib-size", "--vit-calib-size"):
        args = build_parser().parse_args(
            [
                "quantize",
                "--model",
                "m",
                "--calib",
                "noise",
                "--out",
                "o",
                "--wbits",
                "8",
                "--abits",
                "8",
                flag,
                "8",
            ]
        )
        assert _settings(args, "transformer", None) == TransformerSettings(wbits=8, abits=8, calib_size=8)
    calib = data[0]
    ours = quant.quantize(
        _make("vit"), calib, quant.settings_for("transformer", wbits=8, abits=8, calib_size=8)
    )
    direct, _, _ = quantize_transformer(
        _make("vit"), calib, TransformerSettings(wbits=8, abits=8, calib_size=8)
    )
    torch.testing.assert_close(ours.model.state_dict(), direct.state_dict())
    wide = quant.quantize(_make("vit"), calib, TransformerSettings(wbits=8, abits=8, calib_size=len(calib)))
    assert any(not torch.equal(v, wide.model.state_dict()[k]) for k, v in ours.model.state_dict().items())
    with pytest.raises(QuantError, match="calib_size must be an integer >= 1, got 0"):
        TransformerSettings(wbits=8, abits=8, calib_size=0)


# -- the pieces --------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_fold_input_scales_is_exact(bias: bool) -> None:
    """LayerNorm -> per-channel 4-bit grid -> Linear equals the folded per-tensor version."""
    torch.manual_seed(0)
    norm = nn.LayerNorm(24)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24) * 3)
        norm.bias.copy_(torch.randn(24))
    linear = transformer_linear(nn.Linear(24, 12, bias=bias), wbits=32, abits=4, per_channel_input=True)
    x = torch.randn(8, 5, 24)
    with torch.no_grad():
        ref = linear(norm(x))  # calibrates the per-channel input grid
        assert linear.input_quantizer.scale.shape == (24,)
        norm2, linear2 = copy.deepcopy(norm), copy.deepcopy(linear)
        fold_input_scales(norm2, linear2)
        assert linear2.input_quantizer.scale.dim() == 0
        assert not torch.allclose(norm2.weight, norm.weight)
        torch.testing.assert_close(linear2(norm2(x)), ref, rtol=1e-5, atol=1e-5)
        x2 = 3 * torch.randn(8, 5, 24)  # also off the calibration data, clipping included
        torch.testing.assert_close(linear2(norm2(x2)), linear(norm(x2)), rtol=1e-5, atol=1e-5)


def test_log_sqrt2_quantizer_grid() -> None:
    torch.manual_seed(0)
    attn = torch.randn(4, 2, 16, 16).softmax(-1)
    q = LogSqrt2Quantizer(bits=4)
    assert q.octave_steps == (2,)
    out = q(attn)
    delta = q.delta
    assert 0 < delta <= attn.max()
    levels = delta * 2.0 ** (-torch.arange(16) / 2)
    on_grid = (out[..., None] - levels).abs().min(-1).values < 1e-6 * delta
    assert (on_grid | (out == 0)).all()
    assert q(torch.zeros(3)).eq(0).all()  # exact zero
    # values below the last level underflow to zero; large ones clip at delta
    assert q(torch.tensor([delta * 2.0**-9, 2 * delta])).tolist() == pytest.approx([0.0, delta.item()])
    # the log2 integer form reproduces the fake-quant values
    shift, mantissa = q.integer_codes(attn)  # log2 form: a shift, and sqrt2 for odd codes
    rebuilt = torch.where(
        shift < 0, 0.0, delta * 2.0 ** (-shift.float()) * torch.where(mantissa == 1, 2**0.5, 1.0)
    )
    torch.testing.assert_close(rebuilt, out)
    # relative error of a log grid is bounded where it does not underflow
    kept = (out > 0) & (attn < delta)
    assert ((out[kept] - attn[kept]).abs() / attn[kept]).max() < 0.2


def test_searched_quantizer_beats_minmax_on_outliers() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 20, 8)
    x[0, 0, 3] = 60.0  # one outlier in channel 3
    per_tensor = SearchedUniformQuantizer(4)
    per_tensor.calibrate(x)
    err_search = (per_tensor(x) - x).pow(2).mean()
    from quant.quantizers import UniformQuantizer

    minmax = UniformQuantizer(4, init="minmax")
    minmax.calibrate(x)
    assert err_search < (minmax(x) - x).pow(2).mean()
    per_channel = SearchedUniformQuantizer(4, ch_axis=-1)
    per_channel.calibrate(x)
    assert per_channel.scale.shape == (8,)
    assert per_channel.scale[3] > per_channel.scale[torch.arange(8) != 3].max()
    assert (per_channel(x) - x).pow(2).mean() < err_search


def test_log_quantizer_picks_a_finer_base_when_bits_allow() -> None:
    """At 8 bits log-sqrt2's 19% step wastes levels; the searched base is finer and more accurate."""
    torch.manual_seed(0)
    attn = (3 * torch.randn(4, 2, 16, 16)).softmax(-1)
    fine, sqrt2 = LogQuantizer(bits=8), LogSqrt2Quantizer(bits=8)
    fine.calibrate(attn)
    sqrt2.calibrate(attn)
    assert int(fine.steps_per_octave) > 2
    assert (fine(attn) - attn).pow(2).mean() < (sqrt2(attn) - attn).pow(2).mean()
    shift, mantissa = fine.integer_codes(attn)
    m = int(fine.steps_per_octave)
    rebuilt = torch.where(shift < 0, 0.0, fine.delta * 2.0 ** (-shift.float() + mantissa.float() / m))
    torch.testing.assert_close(rebuilt, fine(attn))
    assert LogQuantizer(bits=4).octave_steps == (2,)  # 4 bits: only log-sqrt2 spans 8 octaves


def test_log_sqrt2_only_pins_every_post_softmax_grid_to_log_sqrt2(data) -> None:
    """`TransformerSettings.log_sqrt2_only` is RepQ-ViT's grid (for a like-for-like comparison); the
    default lets the 8-bit grid take a finer base."""
    calib, _ = data
    model = _make("vit")
    grids = {}
    for pinned in (False, True):
        q = quant.quantize(
            model, calib, TransformerSettings(wbits=8, abits=8, log_sqrt2_only=pinned, gptq=False)
        )
        grids[pinned] = [m for m in q.modules() if isinstance(m, LogQuantizer)]
    assert grids[True] and all(type(g) is LogSqrt2Quantizer for g in grids[True])
    assert all(int(g.steps_per_octave) == 2 for g in grids[True])
    assert grids[False] and all(type(g) is LogQuantizer for g in grids[False])
    assert any(int(g.steps_per_octave) > 2 for g in grids[False])
