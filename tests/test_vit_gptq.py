"""GPTQ weight rounding of the ViT path (quant.vit.gptq).

What must hold: GPTQ's weights lie on the layer's calibrated grid and give a smaller output error on
the calibration inputs than nearest rounding on the same grid; in `quant.quantize` it is the default,
stored as a hard rounding that leaves the float weights (and so the float model) untouched.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import quant
from quant import TransformerSettings
from quant.errors import QuantError
from quant.modules import QuantLinear, set_quant_state
from quant.quantizers import UniformQuantizer, fake_quant
from quant.vit.gptq import gptq_quantize_weight
from tests.test_vit import _one_thread  # noqa: F401  (the autouse one-thread fixture)


def _grid(weight: torch.Tensor, bits: int) -> UniformQuantizer:
    q = UniformQuantizer(bits=bits, signed=True, ch_axis=0, symmetric=False, init="mse")
    q.calibrate(weight)
    return q


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_gptq_lies_on_the_grid_and_beats_nearest(bits: int) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g)
    # correlated inputs, as activations are: this is where compensating errors pays
    x = torch.randn(512, 16, generator=g) @ torch.randn(16, 64, generator=g) + 0.1 * torch.randn(
        512, 64, generator=g
    )
    grid = _grid(w, bits)
    scale, zp = grid.shaped(w)
    q, _ = gptq_quantize_weight(
        w, x.t() @ x, scale, zp, grid.qmin, grid.qmax, block=16
    )  # several lazy blocks
    codes = q / scale + zp
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
    assert codes.min() >= grid.qmin - 1e-3 and codes.max() <= grid.qmax + 1e-3
    nearest = fake_quant(w, scale, zp, grid.qmin, grid.qmax)
    err_gptq = ((q - w) @ x.t()).pow(2).sum()
    err_nearest = ((nearest - w) @ x.t()).pow(2).sum()
    assert err_gptq < 0.7 * err_nearest


def test_inputs_that_never_fire_do_not_break_it() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 16, generator=g)
    x = torch.randn(64, 16, generator=g)
    x[:, 3] = 0
    grid = _grid(w, 4)
    scale, zp = grid.shaped(w)
    q, _ = gptq_quantize_weight(w, x.t() @ x, scale, zp, grid.qmin, grid.qmax)
    assert torch.isfinite(q).all()
    assert (q[:, 3] == 0).all()  # a dead input's weight is free: it takes the exact zero


def test_compensated_weight_rounds_to_the_gptq_result() -> None:
    """The compensated weight (each column as GPTQ rounded it) is where reconstruction starts: its
    nearest rounding must be GPTQ's result, and it must differ from the original weight."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 48, generator=g, dtype=torch.float64)
    x = torch.randn(256, 8, generator=g, dtype=torch.float64) @ torch.randn(
        8, 48, generator=g, dtype=torch.float64
    )
    grid = _grid(w, 3)
    scale, zp = grid.shaped(w)
    q, compensated = gptq_quantize_weight(w, x.t() @ x, scale, zp, grid.qmin, grid.qmax, block=16)
    assert compensated.dtype == w.dtype and compensated.shape == w.shape
    torch.testing.assert_close(fake_quant(compensated, scale, zp, grid.qmin, grid.qmax), q, rtol=0, atol=1e-9)
    torch.testing.assert_close(compensated[:, 0], w[:, 0])  # the first column is rounded as it is
    assert not torch.allclose(compensated, w)


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10
    ).eval()


def test_quantize_rounds_a_vit_by_gptq_by_default() -> None:
    model = _vit()
    g = torch.Generator().manual_seed(2)
    calib, x = torch.randn(32, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)
    cfg = dict(wbits=3, abits=32, first_last_bits=8)  # weights only: isolate the rounding
    q = quant.quantize(model, calib, TransformerSettings(**cfg))
    nearest = quant.quantize(model, calib, TransformerSettings(**cfg, gptq=False))
    linears = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.ada is not None and not m.ada.soft for m in linears)
    assert not any(p.requires_grad for p in q.parameters())
    assert all(m.ada is None for m in nearest.modules() if isinstance(m, QuantLinear))
    for m in linears:  # same grid as nearest rounding would use, other grid points chosen
        scale, zp = m.weight_quantizer.shaped(m.weight)
        codes = m.ada() / scale + zp
        torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
    with torch.no_grad():
        ref = model(calib)
        err_gptq = (q(calib) - ref).pow(2).mean()
        err_nearest = (nearest(calib) - ref).pow(2).mean()
        assert err_gptq < err_nearest
        set_quant_state(q, False)  # the float weights were left alone
        torch.testing.assert_close(q(x), model(x), rtol=1e-4, atol=1e-5)


def _codes(layer: QuantLinear) -> torch.Tensor:
    scale, zp = layer.ada.scale, layer.ada.zero_point
    return (layer.ada() / scale + zp).round()


@pytest.mark.parametrize("start", ["gptq", "weights"])
def test_reconstruction_starts_from_gptq_rounding(start: str) -> None:
    """Reconstruction with nothing to learn (zero learning rates) ends where it starts: on GPTQ's
    rounding when given GPTQ's compensated weights, on nearest rounding when not."""
    from quant.reconstruct import ReconSettings
    from quant.vit.gptq import gptq_round
    from quant.vit.reconstruct import reconstruct_vit

    model = _vit()
    calib = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    q = quant.quantize(model, calib, TransformerSettings(wbits=3, abits=4, gptq=False)).model
    compensated = gptq_round(q, calib)
    block_linears = {
        n: m for n, m in q.named_modules() if isinstance(m, QuantLinear) and n.startswith("blocks.")
    }
    assert set(block_linears) < set(compensated)  # the head is rounded too
    gptq_codes = {n: _codes(m) for n, m in block_linears.items()}
    frozen = ReconSettings(iters=1, lr_alpha=0.0, lr_act=0.0, lr_wscale=0.0, drop_prob=0.0)
    starts = compensated if start == "gptq" else None
    reconstruct_vit(q, calib, frozen, torch.Generator().manual_seed(0), start_weights=starts)
    differs = 0
    for name, layer in block_linears.items():
        assert layer.ada is not None and not layer.ada.soft
        if start == "gptq":
            torch.testing.assert_close(_codes(layer), gptq_codes[name], rtol=0, atol=0)
        else:
            nearest = (layer.weight / layer.ada.scale).round() + layer.ada.zero_point
            nearest = nearest.clamp(layer.ada.qmin, layer.ada.qmax)
            torch.testing.assert_close(_codes(layer), nearest, rtol=0, atol=0)
            differs += int((nearest != gptq_codes[name]).sum())
    assert start == "gptq" or differs > 0


def test_vit_reconstruction_rounds_the_head_by_gptq() -> None:
    """The head lies outside every block: with reconstruction on it keeps GPTQ's rounding."""
    model = _vit()
    calib = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    q = quant.quantize(model, calib, TransformerSettings(wbits=4, abits=4, iters=2)).model  # all 32 images
    block_linears = [m for m in q.blocks.modules() if isinstance(m, QuantLinear)]
    assert block_linears and all(m.ada is not None and not m.ada.soft for m in block_linears)
    assert q.get_classifier().ada is not None
    plain = quant.quantize(model, calib, TransformerSettings(wbits=4, abits=4, iters=2, gptq=False)).model
    assert plain.get_classifier().ada is None


def test_gptq_flag_must_be_a_bool() -> None:
    with pytest.raises(QuantError, match="gptq"):
        TransformerSettings(wbits=8, abits=8, gptq="yes")
