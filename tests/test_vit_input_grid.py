"""The patch-embedding input grid from the preprocessing's range (`input_range`).

What must hold: with `input_range`, the model-input grid spans exactly that range whatever the
calibration images cover, so inputs the calibration set never reached are not clipped (the failure
a dark, BN-distilled pool caused on the real CIFAR-10 ViT); without it the grid is fitted as before.
"""

from __future__ import annotations

import pytest
import timm
import torch

import quant
from quant import TransformerSettings
from quant.data import input_range
from quant.errors import QuantError
from tests.test_vit import _one_thread  # noqa: F401  (the autouse one-thread fixture)


def test_input_range_of_a_normalization() -> None:
    # the lowest value is black in the channel with the largest mean/std, the highest white in the
    # channel with the largest (1 - mean)/std: not the same channel
    lo, hi = input_range({"mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)})
    assert lo == pytest.approx(-0.4914 / 0.2470) and hi == pytest.approx((1 - 0.4822) / 0.2435)
    lo, hi = input_range({})  # timm's ImageNet default
    assert lo == pytest.approx(-0.485 / 0.229) and hi == pytest.approx((1 - 0.406) / 0.225)


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=10
    ).eval()


def _span(quantizer) -> tuple[float, float]:
    scale, zp = float(quantizer.scale), float(quantizer.zero_point)
    return (quantizer.qmin - zp) * scale, (quantizer.qmax - zp) * scale


def test_grid_spans_the_range_not_the_calibration_images() -> None:
    model = _vit()
    g = torch.Generator().manual_seed(0)
    dark = torch.rand(32, 3, 32, 32, generator=g) * 1.5 - 2.0  # a pool that never gets bright: [-2, -0.5]
    bright = torch.rand(16, 3, 32, 32, generator=g) * 4.0 - 2.0  # real inputs span [-2, 2]
    cfg = dict(wbits=8, abits=8)
    fitted = quant.quantize(model, dark, TransformerSettings(**cfg)).model
    fixed = quant.quantize(model, dark, TransformerSettings(**cfg, input_range=(-2.0, 2.0))).model
    lo, hi = _span(fixed.patch_embed.proj.input_quantizer)
    step = 4.0 / 255
    assert lo == pytest.approx(-2.0, abs=step) and hi == pytest.approx(2.0, abs=step)
    assert _span(fitted.patch_embed.proj.input_quantizer)[1] < step  # fitted to the dark pool (and 0): clips
    with torch.no_grad():  # the patch embedding of bright inputs: clipped by the fitted grid only
        ref = model.patch_embed(bright)
        err_fixed = (fixed.patch_embed(bright) - ref).pow(2).mean()
        assert err_fixed < 0.01 * (fitted.patch_embed(bright) - ref).pow(2).mean()


@pytest.mark.parametrize("bad", [(1.0, 0.0), (0.0,), ("a", "b"), 3.0, (True, 2.0)])
def test_bad_input_range_is_refused(bad) -> None:
    with pytest.raises(QuantError, match="input_range"):
        TransformerSettings(wbits=8, abits=8, input_range=bad)
