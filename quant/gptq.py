"""GPTQ weight rounding (Frantar et al., ICLR 2023) on a calibrated per-channel grid, and its use as
the starting point of a CNN unit's learned rounding.

GPTQ rounds the input columns of a weight one at a time and, after each, moves the not-yet-rounded
columns to cancel that column's rounding error on the layer's calibration inputs X: it minimises
||(W - Q) X^T||^2 greedily, using the inverse of H = X^T X. Only which grid point each weight takes
changes, never the grid. The ViT path rounds with it outright (`quant.vit.gptq`).

For CNN block reconstruction (`CNNSettings.gptq_start`, on by default) AdaRound starts from
GPTQ's *compensated* weights (each column as it stood when rounded; its nearest rounding is GPTQ's
result) instead of the layer's own weights. Why try it: Genie-M's strong rounding regulariser
pushes the rounding to hard decisions within a short budget (2,000-3,000 iterations), so the start
may persist; it was chosen as the default on held-out real images (docs/notes.md). A convolution is a Linear on its unfolded input patches, so its Hessian is
sum over patches of p p^T ([C_in * k * k] square); grouped convolutions (depthwise) are left to start
from their own weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .modules import QuantConv2d, weight_layers
from .quantizers import AdaRoundQuantizer, fake_quant

#: dampening added to H's diagonal, as a fraction of its mean (GPTQ's default)
DAMP = 0.01
#: columns rounded between two updates of the rest of the weight (GPTQ's lazy batch)
BLOCK = 128


@torch.no_grad()
def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    damp: float = DAMP,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` [out, in] rounded onto the per-row grid (scale, zero_point) [out] by GPTQ.

    `hessian` = sum over calibration inputs of x x^T [in, in]. Columns go in their natural order
    (GPTQ's act-order, largest inputs first, measured no better: docs/notes.md). Returns the fake-quantized weight (values on the grid) and the
    compensated weight (each column as it stood when rounded; its nearest rounding is the first),
    both in `weight`'s dtype.
    """
    w = weight.detach().double().clone()
    h = hessian.double().clone()
    scale, zero_point = scale.double().reshape(-1, 1), zero_point.double().reshape(-1, 1)
    dead = torch.diag(h) == 0  # inputs that never fire: any value is exact, keep them out of H
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * torch.diag(h).mean())
    # upper Cholesky factor of H^-1: row i holds the update the remaining columns get from column i
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q, compensated = torch.zeros_like(w), torch.zeros_like(w)
    n = w.shape[1]
    for start in range(0, n, block):
        end = min(start + block, n)
        wb, errs = w[:, start:end].clone(), torch.zeros_like(w[:, start:end])
        hb = hinv[start:end, start:end]
        for i in range(end - start):
            col = wb[:, i : i + 1]
            compensated[:, start + i : start + i + 1] = col
            qcol = fake_quant(col, scale, zero_point, qmin, qmax)
            q[:, start + i : start + i + 1] = qcol
            err = (col - qcol) / hb[i, i]
            wb[:, i:] -= err @ hb[i : i + 1, i:]
            errs[:, i : i + 1] = err
        w[:, end:] -= errs @ hinv[start:end, end:]
    return q.to(weight.dtype), compensated.to(weight.dtype)


def _patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows its weight (flattened to [out, in]) multiplies: conv patches or tokens."""
    if isinstance(layer, QuantConv2d):
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # N, in, L
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class _Reached(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


def input_hessian(
    model: nn.Module,
    layer: nn.Module,
    x: torch.Tensor,
    prepare: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """sum p p^T over the rows `layer` multiplies when `model` runs on `x` (conv patches or tokens).

    The forward pass stops at the layer (each is called once per pass), so rounding the layers in
    order costs about half of one full pass each. `prepare(layer, input)` maps the input the layer
    receives to what its weight multiplies (e.g. a ViT Linear's own input quantizer).
    """
    acc: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        inp = args[0] if prepare is None else prepare(module, args[0])
        rows = _patches(module, inp).double()
        acc["h"] = rows.t() @ rows
        raise _Reached

    handle = layer.register_forward_pre_hook(hook)
    try:
        model(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    if "h" not in acc:
        raise RuntimeError("the forward pass never reached one of the layers being rounded")
    return acc["h"]


@torch.no_grad()
def unit_start_weights(unit: nn.Module, x: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
    """GPTQ-compensated start weights for the weight layers of a calibrated CNN `unit` on inputs `x`.

    Layers go in execution order, each Hessian taken on the unit's quantized forward with the layers
    before it already at GPTQ's rounding (held as a hard `ada`, replaced when reconstruction starts),
    so later layers absorb earlier layers' errors. Returns {layer: compensated weight} (the layer's
    shape); layers with float weights or groups > 1 are absent (they start from their own weights).
    """
    starts: dict[nn.Module, torch.Tensor] = {}
    for layer in weight_layers(unit):
        if not layer.weight_quantizer.enabled or getattr(layer, "groups", 1) != 1:
            continue
        layer.calibrate_weight()
        hessian = input_hessian(unit, layer, x)
        weight = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        scale, zero_point = layer.weight_quantizer.shaped(layer.weight)
        rounded, compensated = gptq_quantize_weight(
            weight,
            hessian,
            scale.reshape(-1),
            zero_point.reshape(-1),
            layer.weight_quantizer.qmin,
            layer.weight_quantizer.qmax,
        )
        ada = AdaRoundQuantizer(
            layer.weight_quantizer, rounded.reshape(layer.weight.shape)
        )  # reproduces `rounded`
        ada.soft = False
        layer.ada = ada.requires_grad_(False)
        starts[layer] = compensated.reshape(layer.weight.shape)
    return starts


__all__ = ["gptq_quantize_weight", "input_hessian", "unit_start_weights"]
