"""The compiled CPU kernels (`quant.fused`) and the loop's Adam compute what the ATen forms compute."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from quant import fused
from quant.adam import LoopAdam
from quant.modules import QuantAct, keep_fp_mask, lsq_quant
from quant.quantizers import AdaRoundQuantizer, UniformQuantizer


@pytest.fixture
def aten_only(monkeypatch: pytest.MonkeyPatch):
    """Run a block of code on the ATen path (`DFQ_FUSED=0`)."""

    def switch(on: bool) -> None:
        monkeypatch.setenv("DFQ_FUSED", "1" if on else "0")

    return switch


def test_kernels_build_where_a_compiler_is() -> None:
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the ATen path is what runs here")
    ops = fused.ops()
    assert ops is not None and hasattr(ops, "lsq_forward") and hasattr(ops, "adaround_backward")


def test_switch_off_falls_back_to_aten(aten_only) -> None:
    aten_only(False)
    assert fused.ops() is None
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(lsq_quant(x, torch.tensor(0.5), -4.0, 3.0), (x / 0.5).round().clamp(-4, 3) * 0.5)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("drop", [False, True])
def test_fused_lsq_equals_aten_lsq(aten_only, drop: bool, channels_last: bool, relu: bool) -> None:
    if fused.ops() is None:
        pytest.skip("kernels not built here")
    torch.manual_seed(1)
    x = torch.randn(8, 16, 20, 20) * 3  # 51,200 elements: more than one thread's share
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    keep = keep_fp_mask(x, 0.5, torch.Generator().manual_seed(3)) if drop else None
    g = torch.randn_like(x)
    results = []
    for on in (True, False):
        aten_only(on)
        xr = x.clone().requires_grad_(True)
        s = torch.tensor(0.4, requires_grad=True)
        out = lsq_quant(xr, s, 0.0 if relu else -3.0, 12.0, keep, relu=relu)
        results.append((out, *torch.autograd.grad(out, (xr, s), g)))
    (out_f, gx_f, gs_f), (out_a, gx_a, gs_a) = results
    assert torch.equal(out_f, out_a)  # values bit for bit
    assert torch.equal(gx_f, gx_a)
    assert torch.allclose(gs_f, gs_a, rtol=1e-5)  # a sum: the order differs
    assert out_f.stride() == x.stride() and gx_f.stride() == x.stride()
    if relu:  # the fused ReLU is a ReLU: nothing below zero, no gradient through negatives
        assert out_f.min() >= 0 and torch.all(gx_f[x < 0] == 0)


def test_fused_relu_quantizer_equals_relu_then_quantizer() -> None:
    torch.manual_seed(0)
    q = QuantAct(4)
    x = torch.randn(4, 8, 6, 6)
    q.calibrate(F.relu(x))
    q.enabled = True
    assert torch.equal(q(x, relu=True), q(F.relu(x)))
    q.observing = True  # calibration sees the ReLU's output, fused or not
    q(x, relu=True)
    scale = q.quant.scale.clone()
    q.calibrate(F.relu(x))
    assert torch.equal(q.quant.scale, scale)


@pytest.mark.parametrize("learn_scale", [False, True])
def test_fused_adaround_equals_aten_adaround(learn_scale: bool) -> None:
    if fused.ops() is None:
        pytest.skip("kernels not built here")
    torch.manual_seed(0)
    w = torch.randn(32, 16, 3, 3) * 0.1
    base = UniformQuantizer(3, signed=True, ch_axis=0, symmetric=False, init="mse")
    base.calibrate(w)
    results = []
    for use_fused in (True, False):
        torch.manual_seed(1)
        ada = AdaRoundQuantizer(base, w, learn_scale=learn_scale)
        with torch.no_grad():  # spread h over (0, 1) and both clipped ends
            ada.alpha.add_(torch.randn_like(ada.alpha) * 3)
        if not use_fused:
            ada._fusable = lambda: False
        assert ada._fusable() == use_fused
        out = ada()
        loss = (out * torch.randn_like(out)).sum() + 0.01 * ada.round_loss(6.5)
        params = [ada.alpha, ada.scale] if learn_scale else [ada.alpha]
        results.append((out.detach(), *torch.autograd.grad(loss, params)))
    for got, want in zip(*results):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_round_regulariser_value_and_gradient() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    base = UniformQuantizer(4, signed=True, ch_axis=0, init="mse")
    base.calibrate(w)
    ada = AdaRoundQuantizer(base, w)
    ada._fusable = lambda: False
    for beta in (20.0, 7.5, 2.0):
        reg = ada.round_loss(beta)
        (g,) = torch.autograd.grad(reg, ada.alpha)
        a = ada.alpha.detach().clone().requires_grad_(True)
        h = torch.clamp(torch.sigmoid(a) * 1.2 - 0.1, 0, 1)
        ref = (1 - (2 * h - 1).abs().pow(beta)).sum()
        (g_ref,) = torch.autograd.grad(ref, a)
        assert torch.allclose(reg, ref, rtol=1e-5)
        assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-7)


def test_loop_adam_steps_as_torch_fused_adam() -> None:
    torch.manual_seed(0)
    a, b, c = torch.randn(5, 3), torch.randn(7), torch.randn(())
    mine = [t.clone().requires_grad_(True) for t in (a, b, c)]
    ref = [t.clone().requires_grad_(True) for t in (a, b, c)]
    opt = LoopAdam([(mine[:2], 1e-2), (mine[2:], 3e-3)])
    torch_opt = torch.optim.Adam(
        [{"params": ref[:2], "lr": 1e-2}, {"params": ref[2:], "lr": 3e-3}], fused=True
    )
    for step in range(6):
        scale = 1.0 - step / 6
        for params in (mine, ref):
            loss = (params[0] ** 2).sum() + (params[1].sin()).sum() + params[2] ** 3
            loss.backward()
        opt.step(scale)
        for group, base in zip(torch_opt.param_groups, (1e-2, 3e-3)):
            group["lr"] = base * scale
        torch_opt.step()
        opt.zero_grad()
        torch_opt.zero_grad()
        for p, q in zip(mine, ref):
            assert torch.equal(p, q)
    assert all(p.grad is None for p in mine)
