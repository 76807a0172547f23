"""Fake-quantized building blocks: an activation quantizer and weight-quantized conv/linear layers.

- `QuantAct`: per-tensor activation quantizer with a learnable step (LSQ). It calibrates its grid
  from the first batch it sees while `observing`, and, while `drop_prob > 0` (QDrop, only during
  reconstruction), keeps each element in float with that probability, so the block learns to be
  robust to the quantization noise of the activations that surround it.
- `QuantConv2d` / `QuantLinear`: the float layer plus a per-channel weight quantizer: nearest
  rounding on an MSE-searched grid (`rtn`) until `start_adaround` attaches an `AdaRoundQuantizer`
  (learned rounding, optionally with a learned step for Genie-M). An optional activation module
  and output quantizer follow the layer (QDrop's "quantized layer": conv -> act -> quant).

Every piece can be switched between float and quantized (`set_quant_state`), so one module tree
serves as both the float teacher and the quantized student during calibration.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .fused import ops as fused_ops
from .fused import usable as fused_usable
from .noise import pseudo_quantize
from .quantizers import AdaRoundQuantizer, UniformQuantizer, fake_quant

# Elements kept when an activation grid is searched: an MSE search over a strided subsample of
# 65k values picks the same clipping range as one over millions, at a fraction of the cost (it was
# a fifth of a ResNet-20 calibration's non-training time at 2^18).
_CALIB_ELEMENTS = 1 << 16


def _memory_flat(t: torch.Tensor) -> torch.Tensor | None:
    """`t`'s elements in memory order as a 1-D view (no copy), or None if it is not dense."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)  # a view: NHWC is contiguous in memory
    return None


def dense_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) without the layout copies `reshape(-1)` makes of channels-last tensors.

    Reconstruction keeps activations channels-last; flattening them in logical order copied two
    full activations per quantizer per iteration (~10% of a ResNet block's iteration on CPU).
    """
    fa, fb = _memory_flat(a), _memory_flat(b)
    if fa is not None and fb is not None and a.stride() == b.stride():
        return torch.dot(fa, fb)
    return (a * b).sum()


class _LsqQuant(torch.autograd.Function):
    """Per-tensor LSQ fake-quant with an optional QDrop blend, in few fast elementwise passes.

    Same values and gradients as `fake_quant` (+ `torch.where(keep_fp, x, xq)`), but much cheaper
    on CPU, where these ops are memory-bound and each full pass over an activation counts: no
    boolean tensors (CPU kernels for them are slow), scalar clamp bounds, masks applied with
    `lerp`/`addcmul`, few allocations, and no input gradient when none is needed
    (a unit's input quantizer). Reconstruction spends most of its elementwise time here.
    `lo`/`hi` are the integer bounds minus the zero point (the grid is `scale * [lo, hi]`).
    """

    @staticmethod
    def forward(ctx, x, scale, keep_fp, lo: float, hi: float):  # type: ignore[override]
        c = (x * scale.reciprocal()).round_().clamp_(lo, hi)
        out = c * scale
        if keep_fp is not None:
            out.lerp_(x, keep_fp)
        ctx.save_for_backward(x, c, scale, keep_fp)
        ctx.lo_hi = (lo, hi)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, c, scale, keep_fp = ctx.saved_tensors
        lo, hi = ctx.lo_hi
        t = x * scale.reciprocal()  # recomputed: one pass, where keeping it costs an allocation
        # 1 where x / scale was clipped, 0 inside [lo, hi] (LSQ's criterion), without boolean tensors.
        outside = t.clamp(lo, hi).sub_(t).abs_().sign_()
        g_q = grad if keep_fp is None else torch.addcmul(grad, grad, keep_fp, value=-1.0)  # quantized part
        grad_x = grad_s = None
        if ctx.needs_input_grad[0]:  # straight through inside the range, zero where clipped
            grad_x = torch.addcmul(grad, g_q, outside, value=-1.0)
        if ctx.needs_input_grad[1]:  # LSQ: round(t) - t inside the range, the bound outside
            term = (c - t).addcmul_(t, outside)
            grad_s = dense_dot(g_q, term).reshape(scale.shape)
        return grad_x, grad_s, None, None, None


class _FusedLsqQuant(torch.autograd.Function):
    """`_LsqQuant` (after an optional ReLU) as one compiled pass forward and one backward (`quant.fused`).

    Saves only the input: the backward recomputes the rounding inside the same pass that forms the
    gradients, which costs nothing extra where the pass is memory-bound.
    """

    @staticmethod
    def forward(ctx, x, scale, keep_fp, lo: float, hi: float, relu: bool):  # type: ignore[override]
        ctx.save_for_backward(x, scale, keep_fp)
        ctx.args = (lo, hi, relu)
        return fused_ops().lsq_forward(x, scale, keep_fp, lo, hi, relu)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, scale, keep_fp = ctx.saved_tensors
        lo, hi, relu = ctx.args
        if not fused_usable(grad, x):  # autograd may hand a gradient in another layout: copy it into x's
            grad = torch.empty_like(x).copy_(grad)
        grad_x, grad_s = fused_ops().lsq_backward(
            grad, x, scale, keep_fp, lo, hi, relu, ctx.needs_input_grad[0]
        )
        return (
            grad_x if ctx.needs_input_grad[0] else None,
            grad_s.reshape(scale.shape) if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
            None,
        )


def lsq_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    lo: float,
    hi: float,
    keep_fp: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """`scale * clamp(round(v / scale), lo, hi)`, with `v` kept where `keep_fp` is 1 (QDrop).

    `v = relu(x)` with `relu=True` (a ReLU fused in front, one pass fewer each way), else `x`.
    Uses the compiled kernels where they are built and take these tensors; the ATen form otherwise.
    """
    if scale.numel() == 1 and fused_usable(x, keep_fp) and fused_ops() is not None:
        return _FusedLsqQuant.apply(x, scale, keep_fp, lo, hi, relu)
    if relu:
        x = F.relu(x)
    return _LsqQuant.apply(x, scale, keep_fp, lo, hi)


def keep_fp_mask(like: torch.Tensor, prob: float, generator: torch.Generator | None) -> torch.Tensor:
    """A float 0/1 tensor shaped like `like`, 1 with probability `prob` (QDrop's dropped elements).

    For the usual p = 0.5 one random 64-bit word gives 64 elements (8x less RNG work than `rand`).
    """
    n = like.numel()
    if prob == 0.5:
        words = torch.randint(
            -(2**63), 2**63 - 1, ((n + 63) // 64,), generator=generator, device=like.device, dtype=torch.int64
        )
        shifts = torch.arange(8, dtype=torch.uint8, device=like.device)
        bits = ((words.view(torch.uint8).unsqueeze(1) >> shifts) & 1).reshape(-1)[:n].to(like.dtype)
    else:
        bits = (torch.rand(n, generator=generator, device=like.device) < prob).to(like.dtype)
    return _shape_like(bits, like)


def _shape_like(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`flat` (numel of `like`) viewed with `like`'s shape and, for channels-last, its memory layout."""
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        b, c, h, w = like.shape  # same memory layout as `like`, so blending it stays vectorised
        return flat.view(b, h, w, c).permute(0, 3, 1, 2)
    return flat.view(like.shape)


class MaskPool:
    """QDrop's keep-in-float masks, drawn as random windows of one pre-drawn buffer of fair coins.

    Drawing a fresh mask costs ~10 elementwise passes per quantizer per iteration; a window at a
    random offset of a buffer twice the largest mask costs none. Every element of a window is
    still an independent coin with probability `prob`; successive windows are shifts of one
    another, so across iterations an element sees coins sampled from the buffer, which serves
    QDrop's purpose (a random half of each activation in float, different every step). Offsets
    come from a Python RNG seeded from `generator`: no device-to-host read inside the loop.
    """

    def __init__(self, prob: float, generator: torch.Generator, device: torch.device) -> None:
        import random

        self.prob = prob
        self.generator = generator
        self.device = torch.device(device)
        self.rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator, device=self.device)))
        self.buffer = torch.empty(0, device=self.device)

    def draw(self, like: torch.Tensor) -> torch.Tensor:
        """A float 0/1 tensor shaped (and laid out) like `like`, 1 with probability `prob`."""
        n = like.numel()
        if self.buffer.numel() < 2 * n:
            self.buffer = keep_fp_mask(torch.empty(2 * n, device=self.device), self.prob, self.generator)
        start = self.rng.randrange(self.buffer.numel() - n + 1)
        return _shape_like(self.buffer[start : start + n].to(like.dtype), like)


class QuantAct(nn.Module):
    """Per-tensor activation fake-quantizer: asymmetric grid (zero point 0 after a ReLU), LSQ step.

    `bits=32` makes it a pass-through that still marks where a tensor would be stored.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.quant = UniformQuantizer(
            bits, signed=False, ch_axis=None, symmetric=False, init="mse", learn_scale=True
        )
        self.enabled = False  # float until calibrated and switched on
        self.observing = False
        self.drop_prob = 0.0
        self.masks: MaskPool | None = None  # QDrop masks, set with drop_prob during reconstruction
        self._bounds: tuple[float, float] | None = None  # (qmin - zp, qmax - zp), read once

    @property
    def bits(self) -> int:
        return self.quant.bits

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Search the clipping range (L2.4 error, as QDrop/Genie) on a subsample of `x`."""
        flat = x.detach().flatten()
        if flat.numel() > _CALIB_ELEMENTS:
            flat = flat[:: flat.numel() // _CALIB_ELEMENTS]
        self.quant.calibrate(flat)
        self._bounds = None

    def bounds(self) -> tuple[float, float]:
        """Integer range relative to the zero point, cached (the zero point is fixed once calibrated)."""
        if self._bounds is None:
            zp = float(self.quant.zero_point)
            self._bounds = (self.quant.qmin - zp, self.quant.qmax - zp)
        return self._bounds

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._bounds = None
        super()._load_from_state_dict(*args, **kwargs)

    def _set_quant(self, weights: bool, acts: bool) -> None:
        self.enabled = acts

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        """Quantize `x` (or `relu(x)` with `relu=True`: the layer's ReLU fused into the quantizer)."""
        active = self.enabled and self.quant.enabled
        if relu and (self.observing or not active):
            x, relu = F.relu(x), False
        if self.observing:
            self.calibrate(x)
        if not active:
            return x
        keep = None
        if self.drop_prob > 0.0:
            if self.masks is None or self.masks.prob != self.drop_prob:
                raise RuntimeError("QuantAct.drop_prob > 0 needs a MaskPool of that probability in .masks")
            keep = self.masks.draw(x)
        if self.quant.noise:  # NIPQ training: pseudo-quantization noise instead of rounding
            q = self.quant
            return pseudo_quantize(F.relu(x) if relu else x, q.scale, q.zero_point, q.qmin, q.qmax)
        lo, hi = self.bounds()
        return lsq_quant(x, self.quant.scale, lo, hi, keep, relu)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def needs_calibration(quantizer: nn.Module) -> bool:
    """Whether the quantizer's next forward would (re)fit its grid."""
    return quantizer.enabled and (quantizer.observing or not bool(quantizer.initialized))


def output_error(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable:
    """Calibration objective: mean squared error of `op(x_quantized)` against `op(x)`."""
    ref = op(x)

    def error(xq: torch.Tensor) -> torch.Tensor:
        diff = op(xq) - ref
        return (diff * diff).mean()

    return error


class _QuantLayer:
    """Mixin: a conv or linear layer with fake-quantized weight (per output channel) and, optionally,
    a quantizer on its input and an activation + output quantizer after it.

    The CNN path quantizes activations where a block stores them (`out_quant`, or a unit's
    `QuantAct`), the transformer path on the input of every layer (`input_quantizer`, whose grid is
    fitted on the first quantized forward to the error of this layer's output, see `output_error`).
    `quant_weight` / `quant_act` switch the two on and off (`set_quant_state`).
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    #: per-tensor input grids of this layer type are fitted to the error of the layer's output
    input_error_objective = True

    def _init_quant(
        self, weight_quantizer: UniformQuantizer, act: nn.Module | None, input_quantizer: nn.Module | None
    ) -> None:
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.ada: AdaRoundQuantizer | None = None
        self.act = act
        self.out_quant: QuantAct | None = None
        self.quant_weight = False
        self.quant_act = False

    @property
    def wbits(self) -> int:
        return self.weight_quantizer.bits

    def calibrate_weight(self, force: bool = False) -> None:
        """Fit the weight grid (MSE search per output channel), unless done already and not `force`d
        (after re-parameterization changed the weight)."""
        wq = self.weight_quantizer
        if wq.enabled and (force or not bool(wq.initialized)):
            wq.calibrate(self.weight)

    def start_adaround(
        self, learn_scale: bool, start: torch.Tensor | None = None
    ) -> AdaRoundQuantizer | None:
        """Attach learned rounding (from the current grid); returns it, or None for float weights.

        `start` (the weight's shape, e.g. GPTQ's compensated weight: `quant.gptq`) sets where the
        rounding starts, h(alpha) = its fractional part on the grid; the float weight, and so the
        reconstruction target, stays the layer's own."""
        if not self.weight_quantizer.enabled:
            return None
        self.calibrate_weight()
        start = self.weight.detach() if start is None else start.detach()
        if start.shape != self.weight.shape:
            raise ValueError(f"start weight shape {tuple(start.shape)} != {tuple(self.weight.shape)}")
        self.ada = AdaRoundQuantizer(self.weight_quantizer, start, learn_scale=learn_scale)
        return self.ada

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the quantized layer sees it (float weight when quantization is off)."""
        wq = self.weight_quantizer
        if not self.quant_weight or not wq.enabled:
            return self.weight
        if self.ada is not None:
            return self.ada()
        self.calibrate_weight()
        scale, zp = wq.shaped(self.weight)
        if wq.noise:  # NIPQ training: pseudo-quantization noise instead of rounding
            return pseudo_quantize(self.weight, scale, zp, wq.qmin, wq.qmax)
        return fake_quant(self.weight, scale, zp, wq.qmin, wq.qmax)

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _quantize_input(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        q = self.input_quantizer
        if q is None or not self.quant_act:
            return x
        if self.input_error_objective and needs_calibration(q):
            q.calibrate(x, output_error(lambda t: self._op(t, weight, None), x))
        return q(x)

    def _set_quant(self, weights: bool, acts: bool) -> None:
        self.quant_weight, self.quant_act = weights, acts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight()
        return self._post(self._op(self._quantize_input(x, weight), weight, self.bias))

    def _post(self, y: torch.Tensor) -> torch.Tensor:
        if type(self.act) is nn.ReLU and isinstance(
            self.out_quant, QuantAct
        ):  # fused: one pass fewer each way
            return self.out_quant(y, relu=True)
        if self.act is not None:
            y = self.act(y)
        if self.out_quant is not None:
            y = self.out_quant(y)
        return y


def cnn_weight_quantizer(bits: int) -> UniformQuantizer:
    """Per-output-channel asymmetric weight grid, range by L_p-error search (QDrop, RepQ-ViT)."""
    return UniformQuantizer(bits, signed=True, ch_axis=0, symmetric=False, init="mse")


class QuantConv2d(_QuantLayer, nn.Conv2d):
    """`nn.Conv2d` with a fake-quantized weight, optional input quantizer, activation and output quantizer."""

    #: a conv's input grid (the patch embedding's image input) is fitted to its own error
    input_error_objective = False

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        wbits: int,
        act: nn.Module | None = None,
        input_quantizer: nn.Module | None = None,
    ) -> QuantConv2d:
        if type(conv).forward is not nn.Conv2d.forward:  # e.g. timm's Conv2dSame pads dynamically
            raise TypeError(f"{type(conv).__name__} has its own forward; cannot wrap it as a plain conv")
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        new.load_state_dict(conv.state_dict())
        new.requires_grad_(conv.weight.requires_grad)  # a frozen float layer stays frozen
        new._init_quant(cnn_weight_quantizer(wbits), act, input_quantizer)
        return new

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)


class QuantLinear(_QuantLayer, nn.Linear):
    """`nn.Linear` with a fake-quantized weight, optional input quantizer, activation and output quantizer."""

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        wbits: int,
        act: nn.Module | None = None,
        input_quantizer: nn.Module | None = None,
    ) -> QuantLinear:
        new = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        new.load_state_dict(linear.state_dict())
        new.requires_grad_(linear.weight.requires_grad)  # a frozen float layer stays frozen
        new._init_quant(cnn_weight_quantizer(wbits), act, input_quantizer)
        return new

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


def quantize_layer(
    layer: nn.Module, wbits: int, act: nn.Module | None = None, input_quantizer: nn.Module | None = None
) -> QuantConv2d | QuantLinear:
    """The quantized twin of a conv or linear layer (weights copied, float until switched on)."""
    if isinstance(layer, nn.Conv2d):
        return QuantConv2d.from_float(layer, wbits, act, input_quantizer)
    if isinstance(layer, nn.Linear):
        return QuantLinear.from_float(layer, wbits, act, input_quantizer)
    raise TypeError(f"cannot quantize {type(layer).__name__}")


def weight_layers(module: nn.Module) -> list[QuantConv2d | QuantLinear]:
    return [m for m in module.modules() if isinstance(m, (QuantConv2d, QuantLinear))]


def act_quantizers(module: nn.Module) -> list[QuantAct]:
    return [m for m in module.modules() if isinstance(m, QuantAct)]


def set_quant_state(module: nn.Module, weights: bool, acts: bool | None = None) -> None:
    """Switch every quantized piece under `module` between fake-quant and float (`acts` defaults to
    `weights`): one module tree then serves as the float teacher and the quantized student.

    Every quantized module of either path takes part through its `_set_quant(weights, acts)`."""
    acts = weights if acts is None else acts
    for m in module.modules():
        setter = getattr(m, "_set_quant", None)
        if setter is not None:
            setter(weights, acts)
