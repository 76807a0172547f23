"""The fake-quant primitives: AdaRound's relaxation and hard decision, the fused LSQ/QDrop op, masks."""

from __future__ import annotations

import pytest
import torch

from quant.modules import MaskPool, QuantAct, keep_fp_mask, lsq_quant
from quant.quantizers import GAMMA, ZETA, AdaRoundQuantizer, UniformQuantizer


def _weight_and_grid(bits: int = 4) -> tuple[torch.Tensor, UniformQuantizer]:
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    base = UniformQuantizer(bits, signed=True, ch_axis=0, init="mse")
    base.calibrate(w)
    return w, base


def test_adaround_starts_as_nearest_roundings_soft_relaxation() -> None:
    w, base = _weight_and_grid()
    ada = AdaRoundQuantizer(base, w)
    scale = base.shaped(w)[0]
    frac = w / scale - torch.floor(w / scale)
    # h(alpha) is the fractional part (up to the clamp that keeps the inverse sigmoid finite) ...
    assert torch.allclose(ada.h(), frac.clamp(1e-4, 1 - 1e-4), atol=1e-5)
    # ... so the soft weight is the float weight wherever it is inside the grid's range.
    inside = (torch.floor(w / scale) + 1 + base.zero_point.reshape(-1, 1, 1, 1) <= base.qmax) & (
        torch.floor(w / scale) + base.zero_point.reshape(-1, 1, 1, 1) >= base.qmin
    )
    assert torch.allclose(ada()[inside], w[inside], atol=1e-3)
    # and hard rounding at init is round-to-nearest
    ada.soft = False
    nearest = (torch.round(w / scale) + base.zero_point.reshape(-1, 1, 1, 1)).clamp(base.qmin, base.qmax)
    assert torch.equal(ada.integer_weight(), nearest)
    assert ZETA > 1 and GAMMA < 0


@pytest.mark.parametrize("learn_scale", [False, True])
def test_hard_rounding_after_training_is_floor_or_floor_plus_one(learn_scale: bool) -> None:
    w, base = _weight_and_grid(bits=2)
    ada = AdaRoundQuantizer(base, w, learn_scale=learn_scale)
    nearest = ada.integer_weight()
    opt = torch.optim.Adam(ada.parameters(), lr=1e-2)
    target = torch.randn_like(w)
    for step in range(50):
        loss = (ada() - target).pow(2).sum() + 0.01 * ada.round_loss(beta=20 - step * 0.3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ada.soft = False
    offset = ada.integer_weight() - ada.zero_point - ada.w_floor
    clipped = (ada.w_floor + ada.zero_point < ada.qmin) | (ada.w_floor + 1 + ada.zero_point > ada.qmax)
    assert set(offset[~clipped].unique().tolist()) <= {0.0, 1.0}
    assert torch.all((ada.integer_weight() >= ada.qmin) & (ada.integer_weight() <= ada.qmax))
    # the rounding moved away from nearest for some weights: training did something
    assert not torch.equal(ada.integer_weight(), nearest)


def _lsq_reference(x: torch.Tensor, s: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """LSQ as written in the paper (and Genie): clip x/s, round with a straight-through gradient."""
    t = torch.clamp(x / s, lo, hi)
    return ((t.round() - t).detach() + t) * s


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("drop", [False, True])
def test_fused_lsq_matches_reference_values_and_gradients(drop: bool, channels_last: bool) -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 8, 5, 5) * 3
    if channels_last:  # reconstruction's layout: the step's gradient must not depend on it
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    s = torch.tensor(0.4, requires_grad=True)
    keep = keep_fp_mask(x, 0.5, torch.Generator().manual_seed(3)) if drop else None
    ref = _lsq_reference(x, s, -3.0, 12.0)
    if keep is not None:
        ref = torch.where(keep.bool(), x, ref)
    g = torch.randn_like(ref)
    gx_ref, gs_ref = torch.autograd.grad(ref, (x, s), g)
    out = lsq_quant(x, s, -3.0, 12.0, keep)
    gx, gs = torch.autograd.grad(out, (x, s), g)
    assert torch.equal(out, ref)
    assert torch.allclose(gx, gx_ref, atol=1e-6)
    assert torch.allclose(gs, gs_ref, rtol=1e-4)
    # a unit's input quantizer: no gradient for x is asked for, the step's is the same
    (gs_only,) = torch.autograd.grad(lsq_quant(x.detach(), s, -3.0, 12.0, keep), (s,), g)
    assert torch.allclose(gs_only, gs_ref, rtol=1e-4)


def test_keep_mask_is_a_fair_deterministic_coin_in_the_inputs_layout() -> None:
    like = torch.empty(8, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    a = keep_fp_mask(like, 0.5, torch.Generator().manual_seed(0))
    b = keep_fp_mask(like, 0.5, torch.Generator().manual_seed(0))
    c = keep_fp_mask(like, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert abs(a.mean().item() - 0.5) < 0.02
    assert a.stride() == like.stride()
    p = keep_fp_mask(torch.empty(10000), 0.2, torch.Generator().manual_seed(0))
    assert abs(p.mean().item() - 0.2) < 0.02


def test_mask_pool_draws_fair_varied_deterministic_windows() -> None:
    like = torch.empty(4, 8, 6, 6).contiguous(memory_format=torch.channels_last)

    def draws(seed: int) -> list[torch.Tensor]:
        pool = MaskPool(0.5, torch.Generator().manual_seed(seed), torch.device("cpu"))
        return [pool.draw(like).clone() for _ in range(50)]

    a, b, c = draws(0), draws(0), draws(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # a pure function of the seed
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert len({tuple(m.flatten().tolist()) for m in a}) > 40  # a different mask (almost) every step
    stacked = torch.stack(a)
    assert set(stacked.unique().tolist()) == {0.0, 1.0}
    assert abs(stacked.mean().item() - 0.5) < 0.03
    assert a[0].stride() == like.stride()  # same layout as the activation it blends
    p2 = MaskPool(0.2, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert abs(torch.stack([p2.draw(torch.empty(500)) for _ in range(20)]).mean().item() - 0.2) < 0.03


def test_act_quantizer_refuses_dropping_without_masks() -> None:
    q = QuantAct(4)
    q.calibrate(torch.rand(100))
    q.enabled, q.drop_prob = True, 0.5
    with pytest.raises(RuntimeError, match="MaskPool"):
        q(torch.rand(10))


def test_act_quantizer_grid_is_unsigned_after_relu_and_error_shrinks_with_bits() -> None:
    torch.manual_seed(0)
    x = torch.relu(torch.randn(64, 8, 6, 6))
    errs = []
    for bits in (2, 4, 8):
        q = QuantAct(bits)
        q.observing = True
        q(x)
        q.observing, q.enabled = False, True
        assert q.quant.zero_point.item() == 0  # post-ReLU: no level wasted on negatives
        y = q(x)
        assert len(y.unique()) <= 2**bits
        errs.append((y - x).pow(2).mean().item())
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-4
