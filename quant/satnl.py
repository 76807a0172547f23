"""SatNL: a saturating nonlinearity in place of ReLU, for robustness to quantization.

From "Symmetry Regularization and Saturating Nonlinearity for Robust Quantization" (Park, Jang and
Park, ECCV 2022). Its exact definition was not at hand; this is the standard reading of a saturating
ReLU (PACT's clipped activation): `min(act(x), bound)`, one learnable `bound` per nonlinearity,
trained with the rest (its gradient is the upstream gradient where the output saturates). Why: an
activation that the float path already clamps carries no outliers that a low-bit grid would have to
cover or clip abruptly (the paper's "range clamping"), and the clamp adapts together with the
following quantizer's range. It replaces `nn.ReLU`, `nn.ReLU6` and `nn.LeakyReLU` modules (their
negative side is kept) and, in transformers, `nn.GELU`; functional activations in a model's own
`forward` (`F.relu(...)`) are left as they are. Each bound starts at the 99.9th percentile of its
nonlinearity's outputs on the calibration images (`observe`): the swap clamps only their top
thousandth, and the bound has a gradient from the first step (one started at the maximum would
never see an output above it, so it would neither clamp nor learn).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .fold import set_submodule

#: the nonlinearities SatNL replaces
SATURATED = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU)
#: where a bound starts: this quantile of its nonlinearity's outputs on the calibration images
START_QUANTILE = 0.999


class Saturating(nn.Module):
    """`min(inner(x), bound)` with a learnable per-tensor `bound` (SatNL)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        if getattr(inner, "inplace", False):
            inner.inplace = False  # the min needs the activation's output as a fresh tensor
        self.inner = inner
        self.bound = nn.Parameter(torch.tensor(float("inf")))
        self.observing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if self.observing:
            with torch.no_grad():
                self.bound.fill_(upper_quantile(y, START_QUANTILE))
            return y
        return torch.minimum(y, self.bound)

    def extra_repr(self) -> str:
        return f"bound={float(self.bound):.4g}"


def saturate(model: nn.Module) -> list[Saturating]:
    """Replace, in place, every nonlinearity module of a `SATURATED` type under `model` by a
    `Saturating` one (unbounded until `observe`); returns them. A module tree built the same way
    gets the same names, so a saved state loads into it."""
    # every place a module sits (torchvision's blocks call one ReLU twice): one bound per place
    found = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if type(m) in SATURATED]
    made = []
    for name, module in found:
        wrapped = Saturating(module)
        set_submodule(model, name, wrapped)
        made.append(wrapped)
    return made


def upper_quantile(t: torch.Tensor, q: float) -> float:
    """The `q` quantile (q near 1) of `t`'s elements, from its top (1 - q) share alone."""
    flat = t.detach().flatten().float()
    k = max(1, math.ceil((1.0 - q) * flat.numel()))
    return float(flat.topk(k).values[-1])


@torch.no_grad()
def observe(model: nn.Module, images: torch.Tensor) -> None:
    """Set every `Saturating` bound under `model` to the `START_QUANTILE` of its nonlinearity's
    outputs over `images` (one batch, as `model` computes it now)."""
    units = [m for m in model.modules() if isinstance(m, Saturating)]
    for m in units:
        m.observing = True
    try:
        model(images)
    finally:
        for m in units:
            m.observing = False
