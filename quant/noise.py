"""NIPQ's pseudo-quantization: a differentiable stand-in for a uniform fake-quantizer during training.

NIPQ (Shin et al., CVPR 2023, arXiv 2206.00820) trains with pseudo-quantization noise instead of
rounding: inside the grid's range a tensor passes with additive noise whose distribution is that of
its own rounding errors (a histogram of round(t) - t over the in-range elements, in grid steps,
sampled bin by bin plus a uniform offset within the bin), and outside it is truncated to the range's
ends. Unlike straight-through rounding, every gradient is the true one of the function computed:
identity to the input inside the range, zero outside; the step receives `noise` inside the range
and the range's end outside (the truncation bound is `step * (qmax - zero_point)`, so learning the
step learns the truncation too, as NIPQ's single `alpha` does). After training the same grid
quantizes hard (`quant.modules` / `quant.quantizers` switch back when `noise` is off).

Not implemented: NIPQ's bit-width search (a learned, sigmoid-coded bit width per layer with an
average-bit target); the bit widths here are fixed.
"""

from __future__ import annotations

import torch

#: bins of the rounding-error histogram (the reference implementation's 256)
N_BINS = 256
#: rounding errors the histogram is estimated from (a strided subsample of larger tensors)
HIST_SAMPLES = 1 << 16
#: resolution of the inverse-CDF table that maps a uniform draw to a bin
TABLE = 1 << 14


@torch.no_grad()
def rounding_noise(t: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Noise shaped like `t`, in grid steps, drawn from the histogram of `round(t) - t` over the
    elements where `inside` is true (uniform on [-0.5, 0.5] where there are none).

    One uniform u per element: its cell of a `TABLE`-cell inverse-CDF table gives the bin, its
    position within the cell the offset within the bin (a cell lies inside one bin, where the
    offset is uniform and independent of the cell). Bins of probability below 1 / TABLE are
    rounded in or out of the table; `searchsorted` per element, exact, cost ten times the rest."""
    u = torch.rand(t.shape, device=t.device, dtype=t.dtype)
    stride = max(1, t.numel() // HIST_SAMPLES)
    sample, keep = t.flatten()[::stride], inside.flatten()[::stride]
    errors = (sample.round() - sample)[keep]
    if errors.numel() == 0:
        return u.sub_(0.5)
    hist = torch.histc(errors.float(), bins=N_BINS, min=-0.5, max=0.5)
    cdf = hist.cumsum(0) / hist.sum()
    centers = (torch.arange(TABLE, device=t.device, dtype=cdf.dtype) + 0.5) / TABLE
    table = torch.searchsorted(cdf, centers, right=True).clamp_(max=N_BINS - 1).to(t.dtype)
    scaled = u.mul_(TABLE)
    cell = scaled.floor()
    bins = table[cell.long().clamp_(max=TABLE - 1)]
    return bins.add_(scaled.sub_(cell)).div_(N_BINS).sub_(0.5)


def pseudo_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """`x` truncated to the grid `scale * ([qmin, qmax] - zero_point)`, with rounding-error noise of
    one step's width added inside it (NIPQ). `scale` and `zero_point` broadcast against `x`."""
    t = x / scale + zero_point
    below, above = t <= qmin, t >= qmax
    noise = rounding_noise(t.detach(), ~(below | above))
    low = (qmin - zero_point) * scale
    high = (qmax - zero_point) * scale
    return torch.where(below, low, torch.where(above, high, x + noise * scale))
