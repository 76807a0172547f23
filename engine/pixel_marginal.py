"""Pixel marginals of generated images: what a pool needs so that other tools' calibrators see real
images' ranges.

BN-statistics distillation pins each image's channels to mean 0 / std 1 in normalized units, but
its decoder ends in a tanh: the values stay inside about +-1.1 (a CIFAR pool of the ResNet-20 spans
pixels 32..187), where real images reach 0 and 255. A min/max calibrator (ONNX Runtime's, PT2E's)
fitted on such a pool clips every real image's bright and dark pixels, and each layer's range
after them. `gaussian_marginal` keeps each image's content (a monotone map per image and channel:
its pixels' order is kept) and gives its values the marginal the model's normalization implies,
a standard normal in normalized units (clipped to [0, 1] when written as 8 bit), the same prior
as the pin's mean and std, extended from two moments to the whole distribution.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def gaussian_marginal(x: torch.Tensor) -> torch.Tensor:
    """Per image and channel, replace each value by the standard-normal quantile of its rank:
    (B, C, H, W) normalized -> the same shape with N(0, 1) marginals; ties keep their order."""
    b, c, h, w = x.shape
    flat = x.reshape(b * c, h * w)
    order = flat.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(h * w, device=x.device).expand(b * c, -1))
    u = (ranks.to(torch.float64) + 0.5) / (h * w)
    return torch.special.ndtri(u).to(x.dtype).reshape(b, c, h, w)
