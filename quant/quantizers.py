"""Fake-quantizers: the numeric core shared by the CNN and the ViT paths.

Each quantizer is a small `nn.Module` that maps a float tensor to the float value of its
quantized version (fake quantization), so calibration can run in float and export can read the
integer grid (`scale`, `zero_point`, `qmin`, `qmax`) back out.

- `UniformQuantizer`: affine grid, per-tensor or per-channel, with range initialisation by min/max,
  percentile or MSE search, and an optional learnable step (LSQ) that trains through a
  straight-through rounding estimator.
- `AdaRoundQuantizer`: learned up/down rounding of a fixed weight (AdaRound, rectified sigmoid);
  with `learn_scale=True` the step is learned jointly with the rounding (Genie-M), the integer floor
  staying fixed at its initial value so the step acts as a pure scale of the integer grid.

The regularisers and schedules that drive these during reconstruction live in `reconstruct.py`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import QuantError
from .fused import ops as fused_ops
from .fused import usable as fused_usable
from .noise import pseudo_quantize

# AdaRound's rectified sigmoid stretch parameters (Nagel et al. 2020).
ZETA, GAMMA = 1.1, -0.1


def check_bits(bits: int, what: str = "bit width") -> int:
    """Validate a bit width; 2..8 are the widths this tool calibrates (32 = leave in float)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not (2 <= bits <= 8 or bits == 32):
        raise QuantError(f"{what} must be an integer in 2..8 (or 32 for float), got {bits!r}")
    return bits


def check_device(device: str) -> str:
    """Validate a torch device string (`cpu`, `cuda`, `cuda:1`, ...)."""
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise QuantError(f"bad device {device!r}: {e}") from None
    return device


def check_calibration(calib: object) -> None:
    """Calibration data must be a non-empty N x C x H x W float tensor (preprocessed images)."""
    if not isinstance(calib, torch.Tensor) or calib.dim() != 4 or calib.shape[0] == 0:
        shape = tuple(calib.shape) if isinstance(calib, torch.Tensor) else type(calib).__name__
        raise QuantError(f"calibration data must be a non-empty N x C x H x W image tensor, got {shape}")
    if not calib.is_floating_point():
        raise QuantError("calibration images must be preprocessed float tensors (the model's normalization)")


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a `bits`-bit grid: signed is symmetric-friendly [-2^(b-1), 2^(b-1)-1]."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient (identity backward), as LSQ and QDrop use."""
    return (x.round() - x).detach() + x


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Quantize-dequantize `x` on the grid `scale * (q - zero_point)`, q in [qmin, qmax].

    The gradient w.r.t. `scale` is LSQ's (rounding is straight-through, clipping is not), so the
    same function serves fixed and learned steps.
    """
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def _reduce_dims(x: torch.Tensor, ch_axis: int | None) -> tuple[int, ...]:
    if ch_axis is None:
        return tuple(range(x.dim()))
    ch_axis = ch_axis % x.dim()
    return tuple(d for d in range(x.dim()) if d != ch_axis)


def _broadcast_shape(x: torch.Tensor, ch_axis: int | None) -> tuple[int, ...]:
    if ch_axis is None:
        return ()
    shape = [1] * x.dim()
    shape[ch_axis % x.dim()] = x.shape[ch_axis]
    return tuple(shape)


def grid_from_range(
    lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that cover [lo, hi] (always including 0, so zero is exact)."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        bound = torch.maximum(-lo, hi)
        scale = bound / ((qmax - qmin) / 2)
        scale = scale.clamp_min(1e-8)
        zero_point = torch.full_like(scale, float((qmin + qmax + 1) // 2))
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
        zero_point = (qmin - lo / scale).round().clamp(qmin, qmax)
    return scale, zero_point


class UniformQuantizer(nn.Module):
    """Affine fake-quantizer with range initialisation and an optional learnable step (LSQ).

    Args:
        bits: grid width (2..8; 32 disables quantization).
        signed: use a signed integer range (weights) or unsigned (post-ReLU activations).
        ch_axis: channel axis for per-channel grids, `None` for per-tensor.
        symmetric: zero point fixed at the middle of the range.
        init: `minmax`, `mse` (grid search of the clipping range minimising the L_p error, p=2.4
            as in QDrop/BRECQ) or `percentile` (clip at the 99.99th percentile).
        learn_scale: make the step an `nn.Parameter` after initialisation (LSQ).
    """

    def __init__(
        self,
        bits: int = 8,
        signed: bool = False,
        ch_axis: int | None = None,
        symmetric: bool = False,
        init: str = "mse",
        learn_scale: bool = False,
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.signed = signed
        self.ch_axis = ch_axis
        self.symmetric = symmetric
        if init not in ("minmax", "mse", "percentile"):
            raise QuantError(f"unknown range init {init!r}: use minmax, mse or percentile")
        self.init = init
        self.learn_scale = learn_scale
        self.qmin, self.qmax = qrange(bits, signed) if bits < 32 else (0, 0)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("initialized", torch.tensor(False))
        self.enabled = bits < 32
        self.observing = False
        #: NIPQ's pseudo-quantization noise instead of rounding (training only, `quant.noise`)
        self.noise = False

    # -- calibration -----------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Set the grid from a representative tensor `x` (a weight, or a batch of activations)."""
        if not self.enabled:
            return
        x = x.detach().float()
        if self.init == "percentile":
            lo, hi = self._percentile_range(x)
            scale, zp = grid_from_range(lo, hi, self.qmin, self.qmax, self.symmetric)
        elif self.init == "minmax":
            dims = _reduce_dims(x, self.ch_axis)
            lo, hi = x.amin(dim=dims), x.amax(dim=dims)
            scale, zp = grid_from_range(lo, hi, self.qmin, self.qmax, self.symmetric)
        else:
            scale, zp = self._mse_search(x)
        self.set_grid(scale, zp)

    def set_grid(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Install a grid (kept in the quantizer's state dict, learnable if `learn_scale`)."""
        scale = scale.detach().float().clone()
        zero_point = zero_point.detach().float().clone()
        if self.learn_scale:
            if isinstance(self.scale, nn.Parameter):
                self.scale.data = scale
            else:
                del self.scale
                self.scale = nn.Parameter(scale)
        else:
            self.scale = scale
        self.zero_point = zero_point
        self.initialized.fill_(True)

    def _percentile_range(self, x: torch.Tensor, q: float = 0.9999) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ch_axis is None:
            flat = x.flatten()
            if flat.numel() > 2_000_000:  # torch.quantile's input limit; a strided subsample suffices
                flat = flat[:: math.ceil(flat.numel() / 2_000_000)]
            return torch.quantile(flat, 1 - q), torch.quantile(flat, q)
        flat = x.movedim(self.ch_axis, 0).flatten(1)
        return torch.quantile(flat, 1 - q, dim=1), torch.quantile(flat, q, dim=1)

    def _mse_search(
        self, x: torch.Tensor, steps: int = 80, p: float = 2.4
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shrink the min/max range in `steps` ratios and keep, per channel, the one with least L_p error."""
        dims = _reduce_dims(x, self.ch_axis)
        lo0, hi0 = x.amin(dim=dims), x.amax(dim=dims)
        shape = _broadcast_shape(x, self.ch_axis)
        best_err = torch.full_like(lo0, float("inf"))
        best_scale, best_zp = grid_from_range(lo0, hi0, self.qmin, self.qmax, self.symmetric)
        for i in range(steps):
            ratio = 1.0 - i / (steps + 20)  # down to ~0.2 of the range
            scale, zp = grid_from_range(lo0 * ratio, hi0 * ratio, self.qmin, self.qmax, self.symmetric)
            xq = fake_quant(x, scale.reshape(shape), zp.reshape(shape), self.qmin, self.qmax)
            err = (xq - x).abs().pow(p).mean(dim=dims)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zp = torch.where(better, zp, best_zp)
        return best_scale, best_zp

    # -- forward ---------------------------------------------------------------------
    def shaped(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point reshaped to broadcast against `x`."""
        if self.ch_axis is None or self.scale.dim() == 0:
            return self.scale, self.zero_point
        shape = _broadcast_shape(x, self.ch_axis)
        return self.scale.reshape(shape), self.zero_point.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.observing or not bool(self.initialized):
            self.calibrate(x)
        scale, zp = self.shaped(x)
        if self.noise:
            return pseudo_quantize(x, scale, zp, self.qmin, self.qmax)
        return fake_quant(x, scale, zp, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        ch = "per-tensor" if self.ch_axis is None else f"per-channel(axis={self.ch_axis})"
        return (
            f"bits={self.bits}, signed={self.signed}, {ch}, init={self.init}, learn_scale={self.learn_scale}"
        )


class AdaRoundQuantizer(nn.Module):
    """Learned rounding of a fixed weight tensor on a per-channel grid (AdaRound / Genie-M).

    `alpha` parameterises the rounding offset h(alpha) in [0, 1] by a rectified sigmoid; it is
    initialised so that h(alpha) equals the fractional part of w / s (i.e. it starts as round-to-
    nearest's continuous relaxation). `soft=False` (after reconstruction) uses the hard decision
    h >= 0.5. With `learn_scale=True` the step is a parameter too (Genie-M); the integer floor is
    frozen at initialisation, so the learned step rescales the grid rather than re-rounding it.
    """

    def __init__(self, base: UniformQuantizer, weight: torch.Tensor, learn_scale: bool = False) -> None:
        super().__init__()
        if not bool(base.initialized):
            base.calibrate(weight)
        self.bits, self.qmin, self.qmax, self.ch_axis = base.bits, base.qmin, base.qmax, base.ch_axis
        scale, zp = base.shaped(weight)
        scale, zp = scale.detach().clone(), zp.detach().clone()
        self.learn_scale = learn_scale
        if learn_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zp)
        w_div = weight.detach() / scale
        self.register_buffer("w_floor", torch.floor(w_div))
        rest = (w_div - self.w_floor).clamp(1e-4, 1 - 1e-4)
        # inverse of the rectified sigmoid: sigmoid(alpha) * (ZETA - GAMMA) + GAMMA = rest
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.soft = True
        self._last_h: torch.Tensor | None = None  # h(alpha) of the latest soft forward

    def __getstate__(self) -> dict:
        # the cached h(alpha) belongs to one training step's graph: never copied or pickled
        state = self.__dict__.copy()
        state["_last_h"] = None
        return state

    def h(self) -> torch.Tensor:
        """Rectified sigmoid rounding offset in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def rounding_offset(self) -> torch.Tensor:
        return self.h() if self.soft else (self.alpha >= 0).float()

    def forward(self) -> torch.Tensor:
        """The fake-quantized weight."""
        if self.soft and self._fusable():
            w, self._last_h = _FusedAdaRound.apply(
                self.alpha, self.scale, self.w_floor, self.zero_point, self.qmin, self.qmax
            )
            return w
        if self.soft:
            offset = self._last_h = self.h()
        else:
            offset, self._last_h = (self.alpha >= 0).float(), None
        q = torch.clamp(self.w_floor + offset + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale

    def round_loss(self, beta: float, reuse: bool = True) -> torch.Tensor:
        """AdaRound's regulariser: pushes every h(alpha) to 0 or 1 as beta anneals 20 -> 2.

        Reuses h(alpha) from this step's forward when there is one (same value, one graph node);
        `reuse=False` computes it afresh (a graph of its own, after that step's backward).
        """
        h = self._last_h if reuse and self._last_h is not None and self.alpha.requires_grad else self.h()
        return _RoundReg.apply(h, beta)

    def _fusable(self) -> bool:
        """Whether `quant.fused`'s kernels take this weight (CPU float32, one step per output row)."""
        a = self.alpha
        return (
            self.ch_axis == 0
            and a.dim() >= 1
            and self.scale.numel() == a.shape[0] == self.zero_point.numel()
            and fused_usable(a, self.w_floor)
            and a.is_contiguous()
            and self.scale.is_contiguous()
            and self.zero_point.dtype == a.dtype == self.scale.dtype
            and fused_ops() is not None
        )

    def integer_weight(self) -> torch.Tensor:
        """The final integer weight (hard rounding), for export."""
        with torch.no_grad():
            return torch.clamp(
                self.w_floor + (self.alpha >= 0).float() + self.zero_point, self.qmin, self.qmax
            )


class _RoundReg(torch.autograd.Function):
    """AdaRound's `sum(1 - |2h - 1|^beta)` with one power per step instead of two (forward, backward).

    The forward keeps `|u|^(beta-1)` (u = 2h - 1), from which both the value (`|u| * |u|^(beta-1)`)
    and the gradient (`-2 beta sign(u) |u|^(beta-1)`) follow; a real power was the costliest op on a
    weight-sized tensor (~0.1 ms for a 64x64x3x3 conv on CPU, 4 per layer and iteration).
    """

    @staticmethod
    def forward(ctx, h, beta: float):  # type: ignore[override]
        u = 2.0 * h - 1.0
        a = u.abs()
        t = a.log().mul_(beta - 1.0).exp_()  # |u|^(beta-1): half the time of `pow` on CPU (0 at u = 0)
        ctx.save_for_backward(u, t)
        ctx.beta = beta
        return h.numel() - torch.dot(a.reshape(-1), t.reshape(-1))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        u, t = ctx.saved_tensors
        return t * u.sign() * (grad * (-2.0 * ctx.beta)), None


class _FusedAdaRound(torch.autograd.Function):
    """`AdaRoundQuantizer`'s soft forward as one compiled pass each way (`quant.fused`): returns (w, h).

    Saves h, not the sigmoid: inside (0, 1) the rectified sigmoid's slope is a function of h alone,
    and outside it is 0, so the backward needs no `exp`.
    """

    @staticmethod
    def forward(ctx, alpha, scale, w_floor, zero_point, qmin: int, qmax: int):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        w, h = fused_ops().adaround_forward(
            torch.sigmoid(alpha), w_floor, scale, zero_point, qmin, qmax, ZETA, GAMMA
        )
        ctx.save_for_backward(h, w_floor, scale, zero_point)
        ctx.bounds = (qmin, qmax)
        return w, h

    @staticmethod
    def backward(ctx, grad_w, grad_h):  # type: ignore[override]
        h, w_floor, scale, zero_point = ctx.saved_tensors
        if grad_w is None:
            grad_w = torch.zeros_like(h)
        grad_w = grad_w.contiguous()
        grad_h = grad_h.contiguous() if grad_h is not None else None
        g_alpha, g_scale = fused_ops().adaround_backward(
            grad_w, grad_h, h, w_floor, scale, zero_point, *ctx.bounds, ZETA, GAMMA
        )
        return g_alpha, (g_scale if ctx.needs_input_grad[1] else None), None, None, None, None
