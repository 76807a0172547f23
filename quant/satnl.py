"""SatNL: a saturating nonlinearity in place of ReLU, for robustness to quantization.

From "Symmetry Regularization and Saturating Nonlinearity for Robust Quantization" (Park, Jang and
Park, ECCV 2022). Its exact definition was not at hand; this is the standard reading of a saturating
ReLU (PACT's clipped activation): `min(act(x), bound)`, one learnable `bound` per nonlinearity,
trained with the rest (its gradient is the upstream gradient where the output saturates). Why: an
activation that the float path already clamps carries no outliers that a low-bit grid would have to
cover or clip abruptly (the paper's "range clamping"), and the clamp adapts together with the
following quantizer's range. It replaces `nn.ReLU`, `nn.ReLU6` and `nn.LeakyReLU` modules (their
negative side is kept) and, in transformers, `nn.GELU`; functional activations in a model's own
`forward` (`F.relu(...)`) are left as they are. Each bound starts at the largest output its
nonlinearity gives on the calibration images (`observe`), so the swap alone changes nothing there.
"""

from __future__ import annotations

import torch
from torch import nn

from .fold import set_submodule

#: the nonlinearities SatNL replaces
SATURATED = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU)


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
                top = y.detach().amax()
                self.bound.copy_(top if not torch.isfinite(self.bound) else torch.maximum(self.bound, top))
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


@torch.no_grad()
def observe(model: nn.Module, images: torch.Tensor, batch: int = 128) -> None:
    """Set every `Saturating` bound under `model` to the largest output its nonlinearity gives on
    `images` (as `model` computes them now)."""
    units = [m for m in model.modules() if isinstance(m, Saturating)]
    for m in units:
        m.bound.fill_(float("inf"))
        m.observing = True
    try:
        for i in range(0, images.shape[0], batch):
            model(images[i : i + batch])
    finally:
        for m in units:
            m.observing = False
