"""GPTQ weight rounding for the ViT path (Frantar et al., ICLR 2023), on the calibrated grids.

The column-by-column rounding itself is shared with the CNN path (`quant.gptq`).

Round-to-nearest rounds every weight on its own. GPTQ rounds the input columns of a Linear one at a
time and, after each, moves the not-yet-rounded columns to cancel that column's rounding error on
the layer's calibration inputs X: it minimises ||(W - Q) X^T||^2 greedily, using the inverse of
H = X^T X. The grid is not touched (the per-channel scale and zero point RepQ-style calibration
chose, after re-parameterization); only which grid point each weight takes changes.

Why here: a ViT's 4-bit weights rounded to nearest already cost accuracy, and its small Linears make
H tiny, so GPTQ costs a fraction of a second per layer and calibrates from the same images
(`calib_size`). Layers are done in execution order, each on inputs from the
already-rounded layers before it (its input quantizer applied), so later layers also absorb earlier
layers' errors.

The result is stored as a hard `AdaRoundQuantizer` on the layer (`layer.ada`, `soft=False`): the
float weight stays as it was (float mode and reconstruction targets are unchanged), and export
already reads integer weights from it.

GPTQ also yields, per layer, the *compensated* float weight: each column as it stood (after the
updates from the columns before it) when it was rounded. Its round-to-nearest is exactly GPTQ's
result, so block reconstruction starts AdaRound from it (`h(alpha)` = its fractional part) rather
than from the original weight: reconstruction then refines GPTQ's rounding instead of restarting
from round-to-nearest (measured level with starting from the weight: docs/notes.md; kept because it
starts from the better rounding).
"""

from __future__ import annotations

import torch
from torch import nn

from ..gptq import gptq_quantize_weight, input_hessian
from ..modules import QuantLinear
from ..quantizers import AdaRoundQuantizer


@torch.no_grad()
def gptq_round(model: nn.Module, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """Round every weight-quantized `QuantLinear` of a calibrated `model` by GPTQ, in order.

    Returns {layer name: compensated weight} for the layers rounded (the start block reconstruction
    takes). Layers that already have a rounding (`ada`) are skipped.
    """
    done = {}
    for name, layer in model.named_modules():
        if (
            not isinstance(layer, QuantLinear)
            or layer.input_quantizer is None
            or not layer.weight_quantizer.enabled
            or layer.ada is not None
        ):
            continue
        hessian = input_hessian(model, layer, calib, prepare=lambda m, x: m.input_quantizer(x))
        wq = layer.weight_quantizer
        scale, zero_point = wq.shaped(layer.weight)
        rounded, compensated = gptq_quantize_weight(
            layer.weight, hessian, scale, zero_point, wq.qmin, wq.qmax
        )
        ada = AdaRoundQuantizer(wq, rounded)  # its floor + hard offset reproduce `rounded` exactly
        ada.soft = False
        layer.ada = ada.requires_grad_(False)
        done[name] = compensated
    return done


__all__ = ["gptq_quantize_weight", "gptq_round"]
