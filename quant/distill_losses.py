"""The objectives of the distillation methods (`quant.distill`): what the quantized copy is trained on.

- `kl_to_teacher`: KL(p_fp || p_q) of the softmax outputs, batch mean (EnhancingDFQ Eq. 2, GDFQ's
  fine-tuning loss without labels: a pool's label is a prompt's or a generator's, the float
  model's own output is the target).
- `activation_mse` over `ActivationTaps` (EnhancingDFQ's SimLoss2, Eq. 11): the mean over the
  tapped activations of the MSE between the float and the quantized copy's values. Tapped: the
  output of every activation quantizer of a CNN (`QuantAct`: the clipped [0, beta_l] activations,
  beta_l = step * levels learned by LSQ); in a transformer, whose quantizers sit on layer inputs that
  the float pass never forms, each block's output (the residual stream).
- `weight_asymmetry` (SymReg): see there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modules import QuantAct, QuantConv2d, QuantLinear


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)), summed over classes, averaged over the batch."""
    return F.kl_div(
        F.log_softmax(student_logits.float(), -1),
        F.log_softmax(teacher_logits.float(), -1),
        log_target=True,
        reduction="batchmean",
    )


def tap_names(model: nn.Module, transformer: bool) -> list[str]:
    """The activations SimLoss2 compares: a CNN's quantized activations (every enabled `QuantAct`),
    a transformer's block outputs (`quant.vit.reconstruct.transformer_blocks`)."""
    if transformer:
        from .vit.reconstruct import transformer_blocks

        return transformer_blocks(model)
    return [n for n, m in model.named_modules() if isinstance(m, QuantAct) and m.quant.enabled]


class ActivationTaps:
    """Forward hooks that keep the outputs of the named modules of `model`, in `names`' order,
    from its latest forward (`take` returns and clears them). `remove` detaches the hooks."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.names = list(names)
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [
            model.get_submodule(name).register_forward_hook(self._keeper(name)) for name in self.names
        ]

    def _keeper(self, name: str):
        def keep(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            self.values[name] = output

        return keep

    def take(self) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in self.values]
        if missing:
            raise RuntimeError(f"activation {missing[0]} was not computed in the forward pass")
        out = [self.values[n] for n in self.names]
        self.values = {}
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def activation_mse(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """SimLoss2: the mean over tapped activations of each one's mean squared error to the float one."""
    if not student:
        raise ValueError("no activations to compare")
    return torch.stack(
        [F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher, strict=True)]
    ).mean()


def channel_asymmetry(weight: torch.Tensor) -> torch.Tensor:
    """Per output channel, (max + min) / (max - min) of the weights: 0 for a range symmetric about
    zero, +-1 for one on a single side."""
    flat = weight.flatten(1)
    high, low = flat.amax(1), flat.amin(1)
    return (high + low) / (high - low).clamp_min(1e-12)


def weight_asymmetry(layers: list[QuantConv2d | QuantLinear]) -> torch.Tensor:
    """SymReg: the mean over the weight-quantized layers of the mean squared `channel_asymmetry` of
    their weights (the learned rounding's soft weights where one is trained).

    From "Symmetry Regularization and Saturating Nonlinearity for Robust Quantization" (Park, Jang
    and Park, ECCV 2022), whose exact definition was not at hand: this is the standard reading of a
    weight-symmetry regularizer. It pulls each channel's weight range towards symmetry about zero,
    where a symmetric grid (zero point fixed at the middle, what integer kernels prefer) wastes no
    levels and its rounding errors do not add a systematic offset to the channel's output."""
    terms = [
        channel_asymmetry(layer.ada() if layer.ada is not None else layer.weight).square().mean()
        for layer in layers
    ]
    if not terms:
        raise ValueError("no weight-quantized layers to regularize")
    return torch.stack(terms).mean()
