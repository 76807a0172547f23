"""Quantized stand-ins for the Linear, Conv2d (patch embedding) and matmul ops of a transformer.

Each wrapper owns the original parameters under their original names (`weight`, `bias`), so a
quantized model's state dict still reads like the float one, plus an input quantizer and, for
layers with weights, a per-output-channel weight quantizer. `quant_enabled=False` runs the float op
(used to compare against fp32 without rebuilding the model).

Per-tensor activation grids are fitted to minimise the error of the op's output rather than of
its input (`output_error`): what matters is the Linear's or the attention product's result, and
the two disagree most on attention maps, where most entries barely move the product.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizers import AdaRoundQuantizer
from .quantizers import (
    LogQuantizer,
    LogSqrt2Quantizer,
    Objective,
    SearchedUniformQuantizer,
    needs_calibration,
    weight_quantizer,
)


def output_error(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Objective:
    """Objective: mean squared error of `op(x_quantized)` against `op(x)`."""
    ref = op(x)

    def error(xq: torch.Tensor) -> torch.Tensor:
        diff = op(xq) - ref
        return (diff * diff).mean()

    return error


class QuantLinear(nn.Module):
    """`nn.Linear` with fake-quantized input and per-output-channel fake-quantized weight."""

    def __init__(self, linear: nn.Linear, wbits: int, abits: int, per_channel_input: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_quantizer = SearchedUniformQuantizer(abits, ch_axis=-1 if per_channel_input else None)
        self.weight_quantizer = weight_quantizer(wbits)
        self.ada: AdaRoundQuantizer | None = None  # learned rounding, set by block reconstruction
        self.quant_enabled = True
        self.recalibrate_weight()

    @torch.no_grad()
    def recalibrate_weight(self) -> None:
        """Fit the weight grid to the current weight (again after re-parameterization changed it)."""
        self.weight_quantizer.calibrate(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quant_enabled:
            return F.linear(x, self.weight, self.bias)
        weight = self.ada() if self.ada is not None else self.weight_quantizer(self.weight)
        if needs_calibration(self.input_quantizer):
            self.input_quantizer.calibrate(x, output_error(lambda t: F.linear(t, weight), x))
        return F.linear(self.input_quantizer(x), weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class QuantConv2d(nn.Module):
    """`nn.Conv2d` (the patch embedding) with fake-quantized input and per-channel weight."""

    def __init__(self, conv: nn.Conv2d, wbits: int, abits: int) -> None:
        super().__init__()
        self.conv_args = dict(
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups
        )
        if conv.padding_mode != "zeros":
            raise NotImplementedError("only zero-padded convolutions are quantized")
        self.weight = conv.weight
        self.bias = conv.bias
        self.input_quantizer = SearchedUniformQuantizer(abits)
        self.weight_quantizer = weight_quantizer(wbits)
        self.quant_enabled = True
        self.weight_quantizer.calibrate(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quant_enabled:
            return F.conv2d(x, self.weight, self.bias, **self.conv_args)
        return F.conv2d(
            self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias, **self.conv_args
        )


class QuantMatMul(nn.Module):
    """`a @ b` of two activations, both fake-quantized per tensor.

    `log_a=True` puts a log grid on `a` (the post-softmax attention map in attn @ v): log-sqrt2
    with `sqrt2_only`, else the base searched by `LogQuantizer`.
    """

    def __init__(self, abits: int, log_a: bool = False, sqrt2_only: bool = False) -> None:
        super().__init__()
        if log_a:
            self.quantizer_a = LogSqrt2Quantizer(abits) if sqrt2_only else LogQuantizer(abits)
        else:
            self.quantizer_a = SearchedUniformQuantizer(abits)
        self.quantizer_b = SearchedUniformQuantizer(abits)
        self.quant_enabled = True

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.quant_enabled:
            return a @ b
        if needs_calibration(self.quantizer_a):
            self.quantizer_a.calibrate(a, output_error(lambda t: t @ b, a))
        a = self.quantizer_a(a)
        if needs_calibration(self.quantizer_b):
            self.quantizer_b.calibrate(b, output_error(lambda t: a @ t, b))
        return a @ self.quantizer_b(b)


QUANT_LAYERS = (QuantLinear, QuantConv2d, QuantMatMul)


def set_quant_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every quantized layer of `model` between fake-quant and float."""
    for m in model.modules():
        if isinstance(m, QUANT_LAYERS):
            m.quant_enabled = enabled
