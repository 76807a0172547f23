"""BN folding and block reconstruction on tiny random models (CPU, a few hundred iterations at most)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from quant.blocks import QuantBlock, build_quantized_twin
from quant.capture import capture
from quant.cnn import calibrate_unit
from quant.fold import fold_batchnorm
from quant.modules import set_quant_state
from quant.reconstruct import ReconSettings, reconstruct_unit, reconstruction_loss
from quant.zoo import REGISTRY


def with_bn_stats(model: nn.Module, shape=(3, 32, 32), seed: int = 0) -> nn.Module:
    """Random weights, BN running statistics from a few train-mode batches (not the identity init)."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *shape) * 1.5 + 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    torch.manual_seed(0)  # the weights too: tests must not depend on which tests ran before them
    return with_bn_stats(REGISTRY["cifar_resnet20"][0]())


def test_bn_folding_preserves_outputs(resnet20: nn.Module, tiny_classifier: nn.Module) -> None:
    mbv1 = with_bn_stats(REGISTRY["mobilenetv1_x0.25"][0](), shape=(3, 64, 64))
    for model, shape, n_bn in (
        (resnet20, (3, 32, 32), 19),
        (tiny_classifier, (3, 32, 32), 15),
        (mbv1, (3, 64, 64), 27),
    ):
        x = torch.randn(4, *shape)
        folded = copy.deepcopy(model)
        assert fold_batchnorm(folded, x[:2]) == n_bn
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-4)


def test_bn_not_fed_by_a_conv_is_left_alone() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    model[2].running_mean.fill_(0.3)
    assert fold_batchnorm(model, torch.randn(2, 3, 8, 8)) == 0
    assert isinstance(model[2], nn.BatchNorm2d)


def _unit_data(model: nn.Module, name: str, wbits: int, abits: int, n: int = 128):
    torch.manual_seed(1)
    calib = torch.randn(n, 3, 32, 32)
    twin, _, _ = build_quantized_twin(model, calib[:2], wbits, abits, 8)
    unit = twin.get_submodule(name)
    x_fp, y_fp = capture(twin, unit, calib, outputs=True)
    calibrate_unit(unit, x_fp)
    return unit, x_fp, y_fp


def _settings(iters: int, **kw) -> ReconSettings:
    return ReconSettings(iters=iters, batch_size=32, **kw)


@pytest.mark.parametrize(
    # W4A8 without dropping: the loss is the weights' rounding error, which AdaRound must cut. (At
    # W4A4 on random weights the 4-bit activations dominate the loss and 150 iterations of the
    # activation steps at lr 4e-5 barely move it: no test of the rounding.)
    "wbits,abits,drop,factor",
    [(4, 8, 0.0, 0.9), (2, 4, 0.5, 0.7)],
)
def test_reconstruction_loss_falls(
    resnet20: nn.Module, wbits: int, abits: int, drop: float, factor: float
) -> None:
    unit, x, y = _unit_data(resnet20, "layer3.1", wbits, abits, n=64)
    assert isinstance(unit, QuantBlock)
    with torch.no_grad():
        before = reconstruction_loss(unit(x), y).item()
    res = reconstruct_unit(unit, x, x, y, _settings(150, drop_prob=drop), torch.Generator().manual_seed(0))
    loss = torch.tensor(res.loss)
    assert len(loss) == 150 and torch.isfinite(loss).all()
    assert loss[-15:].mean() < factor * loss[:15].mean()
    with torch.no_grad():
        after = reconstruction_loss(unit(x), y).item()  # hard rounding, no dropping
    assert after < before
    assert res.seconds_per_iter > 0


def test_rtn_at_w2_is_much_worse_than_genie_m(resnet20: nn.Module) -> None:
    """On one block: the loss of the calibrated (RTN) unit against the same unit after reconstruction."""
    unit, x, y = _unit_data(resnet20, "layer3.0", 2, 4, n=64)
    with torch.no_grad():
        rtn_loss = reconstruction_loss(unit(x), y).item()
    reconstruct_unit(unit, x, x, y, _settings(300), torch.Generator().manual_seed(0))
    with torch.no_grad():
        genie_loss = reconstruction_loss(unit(x), y).item()  # hard rounding, no dropping
    assert genie_loss < 0.5 * rtn_loss


def test_hard_rounding_is_in_place_after_reconstruction(resnet20: nn.Module) -> None:
    unit, x, y = _unit_data(resnet20, "layer3.0", 4, 4, n=64)
    reconstruct_unit(unit, x, x, y, _settings(30), torch.Generator().manual_seed(0))
    for layer in unit.body:
        assert layer.ada is not None and not layer.ada.soft
        ada = layer.ada
        offset = ada.integer_weight() - ada.zero_point - ada.w_floor
        clipped = (ada.w_floor + ada.zero_point < ada.qmin) | (ada.w_floor + 1 + ada.zero_point > ada.qmax)
        assert set(offset[~clipped].unique().tolist()) <= {0.0, 1.0}
        w = layer.quantized_weight()
        steps = w / layer.ada.scale
        assert torch.allclose(steps, steps.round(), atol=1e-4)  # weights lie on the grid
    set_quant_state(unit, weights=True, acts=True)
    assert all(q.drop_prob == 0.0 for q in [m for m in unit.modules() if hasattr(m, "drop_prob")])
