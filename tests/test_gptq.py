"""quant.gptq on CNN layers: GPTQ's conv rounding beats nearest on its calibration inputs, and
`CNNSettings.gptq_start` (the default) starts block reconstruction from it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant
from quant import CNNSettings
from quant.errors import QuantError
from quant.gptq import unit_start_weights
from quant.modules import QuantConv2d, set_quant_state
from quant.quantizers import fake_quant
from tests.test_vit import _one_thread  # noqa: F401  (the autouse one-thread fixture)


def _unit(groups: int = 1) -> nn.Sequential:
    torch.manual_seed(0)
    conv1 = QuantConv2d.from_float(nn.Conv2d(8, 16, 3, padding=1), wbits=3)
    conv2 = QuantConv2d.from_float(nn.Conv2d(16, 16, 3, padding=1, groups=groups), wbits=3)
    unit = nn.Sequential(conv1, nn.ReLU(), conv2)
    set_quant_state(unit, weights=True, acts=False)
    return unit


def _inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    # spatially smooth inputs, as images and feature maps are: neighbouring patch entries correlate
    return F.avg_pool2d(torch.randn(64, 8, 12, 12, generator=g), 3, stride=1, padding=1)


def test_conv_gptq_rounding_beats_nearest_on_its_inputs() -> None:
    unit, x = _unit(), _inputs()
    float_out = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    float_out.load_state_dict(
        {k: v for k, v in unit.state_dict().items() if k.split(".")[-1] in ("weight", "bias")}
    )
    with torch.no_grad():
        target = float_out(x)
        nearest = (unit(x) - target).square().mean()
        starts = unit_start_weights(unit, x)
        gptq = (unit(x) - target).square().mean()  # the layers now hold GPTQ's hard rounding
    assert set(starts) == {unit[0], unit[2]}
    assert gptq < 0.8 * nearest, (float(gptq), float(nearest))
    for layer, start in starts.items():
        assert start.shape == layer.weight.shape
        # the compensated weight's nearest rounding is GPTQ's rounding, on the layer's own grid
        wq = layer.weight_quantizer
        scale, zp = wq.shaped(layer.weight)
        torch.testing.assert_close(fake_quant(start, scale, zp, wq.qmin, wq.qmax), layer.ada())


def test_grouped_convs_start_from_their_own_weights() -> None:
    unit = _unit(groups=4)
    starts = unit_start_weights(unit, _inputs())
    assert set(starts) == {unit[0]} and unit[2].ada is None


def test_cnn_settings_gptq_start_changes_the_reconstruction_and_is_deterministic() -> None:
    from tests.test_end_to_end import tiny_bn_cnn

    model, _ = tiny_bn_cnn()
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    base = dict(wbits=4, abits=4, method="genie-m", iters=3, batch_size=8)
    plain = quant.quantize(model, calib, CNNSettings(**base, gptq_start=False)).model
    a = quant.quantize(model, calib, CNNSettings(**base)).model  # the default
    b = quant.quantize(model, calib, CNNSettings(**base, gptq_start=True)).model
    torch.testing.assert_close(a.state_dict(), b.state_dict())
    assert any(not torch.equal(v, plain.state_dict()[k]) for k, v in a.state_dict().items() if "alpha" in k)
    with pytest.raises(QuantError, match="gptq_start must be true or false, got 'yes'"):
        CNNSettings(**base, gptq_start="yes")
