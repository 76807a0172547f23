"""The transformer path's quantized ops: its Linear and patch-embedding conv, and the matmul.

Linears and convs are the shared wrappers of `quant.modules` (one `QuantLinear` / `QuantConv2d` for
both paths), here given the transformer's quantizers: an input grid searched per tensor (or per
channel before re-parameterization) and switched on from the start. `QuantMatMul` is the one op only
transformers have: `a @ b` of two activations (the attention products).
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules import QuantConv2d, QuantLinear, needs_calibration, output_error
from .quantizers import LogQuantizer, LogSqrt2Quantizer, SearchedUniformQuantizer


def transformer_linear(
    linear: nn.Linear, wbits: int, abits: int, per_channel_input: bool = False
) -> QuantLinear:
    """`linear` with a per-channel weight grid and a searched input grid, quantization on."""
    layer = QuantLinear.from_float(
        linear,
        wbits,
        input_quantizer=SearchedUniformQuantizer(abits, ch_axis=-1 if per_channel_input else None),
    )
    layer.calibrate_weight()
    layer._set_quant(True, True)
    return layer


def transformer_conv(conv: nn.Conv2d, wbits: int, abits: int) -> QuantConv2d:
    """The patch embedding's conv with per-channel weight and per-tensor input grids, quantization on."""
    if conv.padding_mode != "zeros":
        raise NotImplementedError("only zero-padded convolutions are quantized")
    layer = QuantConv2d.from_float(conv, wbits, input_quantizer=SearchedUniformQuantizer(abits))
    layer.calibrate_weight()
    layer._set_quant(True, True)
    return layer


class QuantMatMul(nn.Module):
    """`a @ b` of two activations, both fake-quantized per tensor.

    `log_a=True` puts a log grid on `a` (the post-softmax attention map in attn @ v): log-sqrt2
    with `sqrt2_only`, else the base searched by `LogQuantizer`. Each grid is fitted on the first
    quantized forward to the error of the product.
    """

    def __init__(self, abits: int, log_a: bool = False, sqrt2_only: bool = False) -> None:
        super().__init__()
        if log_a:
            self.quantizer_a = LogSqrt2Quantizer(abits) if sqrt2_only else LogQuantizer(abits)
        else:
            self.quantizer_a = SearchedUniformQuantizer(abits)
        self.quantizer_b = SearchedUniformQuantizer(abits)
        self.quant_act = True

    def _set_quant(self, weights: bool, acts: bool) -> None:
        self.quant_act = acts

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.quant_act:
            return a @ b
        if needs_calibration(self.quantizer_a):
            self.quantizer_a.calibrate(a, output_error(lambda t: t @ b, a))
        a = self.quantizer_a(a)
        if needs_calibration(self.quantizer_b):
            self.quantizer_b.calibrate(b, output_error(lambda t: a @ t, b))
        return a @ self.quantizer_b(b)
