"""Activation quantizers the ViT path needs beyond the shared uniform grid.

- `SearchedUniformQuantizer`: a `UniformQuantizer` whose range is chosen, per tensor or per
  channel, as the least-L2 candidate among percentile clips and shrunken min/max ranges. Transformer
  activations mix a dense bulk with a few huge outliers (post-LayerNorm channels, post-GELU tails),
  so neither plain min/max nor one fixed percentile is right everywhere; RepQ-ViT picks among
  percentiles, and adding shrink ratios lets the search also win where the tail is light.
- `LogQuantizer` / `LogSqrt2Quantizer`: log grids for post-softmax attention. Softmax outputs are
  a power law concentrated near 0 with a few large values; a log grid with base sqrt(2) spends its
  levels where the mass is while still resolving the large probabilities (RepQ-ViT). Its
  dequantized values `delta * 2**(-q/2)` are exactly what a log2 kernel computes after splitting q
  into its parity and half, so this fake-quant is also the inference-time (log2-reparameterized)
  function. `LogQuantizer` may pick a finer base 2**(1/m) where the bits allow (see there).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..quantizers import UniformQuantizer, check_bits, fake_quant, grid_from_range

# Percentile clips RepQ-ViT searches (1.0 = min/max) and the extra min/max shrink ratios we add.
PERCENTILES = (0.999, 0.9999, 0.99999, 1.0)
SHRINK_RATIOS = tuple(1.0 - i / 40 for i in range(1, 30))
# Cap on samples per channel used for the range search (a strided subsample beyond it).
MAX_SEARCH_SAMPLES = 1 << 20

# A calibration objective: the fake-quantized tensor -> a scalar error (e.g. of the op it feeds).
Objective = Callable[[torch.Tensor], torch.Tensor]


def _channels_first(x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    """View `x` as contiguous [channels, samples] (one row for a per-tensor grid), subsampled if huge."""
    if ch_axis is None:
        flat = x.reshape(1, -1)
    else:
        flat = x.movedim(ch_axis, -1).reshape(-1, x.shape[ch_axis]).t()
    stride = math.ceil(flat.shape[1] / MAX_SEARCH_SAMPLES)
    return (flat[:, ::stride] if stride > 1 else flat).contiguous()


def _tail_quantiles(rows: torch.Tensor, probs: tuple[float, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-row (1-p, p) quantile pairs (nearest rank) for p close to 1, from the two tails only.

    `topk` over the few extreme values replaces a full sort, which dominated calibration time.
    """
    n = rows.shape[1]
    ranks = [n - 1 - min(n - 1, max(0, round(p * (n - 1)))) for p in probs]  # distance from the top
    k = max(ranks) + 1
    top = rows.topk(k, dim=1, largest=True, sorted=True).values
    bottom = rows.topk(k, dim=1, largest=False, sorted=True).values
    return [(bottom[:, r], top[:, r]) for r in ranks]


class SearchedUniformQuantizer(UniformQuantizer):
    """Asymmetric uniform activation quantizer with a least-error range search at calibration.

    The error is the L2 error of the tensor itself, or, for a per-tensor grid, of whatever the
    caller's `objective` measures (the wrappers in `layers.py` pass the error of the op the tensor
    feeds: a Linear's output, an attention product). `ch_axis=-1` gives the per-channel grid used on
    post-LayerNorm activations before they are re-parameterized to a per-tensor grid (`reparam.py`).
    """

    def __init__(self, bits: int = 8, ch_axis: int | None = None) -> None:
        super().__init__(bits=bits, signed=False, ch_axis=ch_axis, symmetric=False, init="minmax")

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, objective: Objective | None = None) -> None:
        if not self.enabled:
            return
        if self.ch_axis is not None:
            objective = None  # one error per channel: the channels' own L2 errors
        rows = _channels_first(x.detach().float(), self.ch_axis)
        candidates = _tail_quantiles(rows, PERCENTILES)
        lo0, hi0 = candidates[-1]  # PERCENTILES ends with 1.0: the min/max
        candidates += [(lo0 * r, hi0 * r) for r in SHRINK_RATIOS]
        best_err = torch.full_like(lo0, float("inf"))
        best_scale = best_zp = None
        for lo, hi in candidates:
            scale, zp = grid_from_range(lo, hi, self.qmin, self.qmax, symmetric=False)
            if objective is None:
                diff = fake_quant(rows, scale[:, None], zp[:, None], self.qmin, self.qmax) - rows
                err = (diff * diff).mean(1)
            else:
                err = objective(fake_quant(x, scale[0], zp[0], self.qmin, self.qmax)).reshape(1)
            if best_scale is None:
                best_err, best_scale, best_zp = err, scale, zp
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zp = torch.where(better, zp, best_zp)
        if self.ch_axis is None:
            best_scale, best_zp = best_scale[0], best_zp[0]
        self.set_grid(best_scale, best_zp)

    def to_per_tensor(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Switch to a per-tensor grid (after its per-channel scales were folded elsewhere)."""
        self.ch_axis = None
        self.set_grid(scale.reshape(()), zero_point.reshape(()))


class LogQuantizer(nn.Module):
    """Fake-quantizer on the log grid {delta * 2**(-q/m) : q = 0..2**bits-1} plus an exact zero.

    m (`steps_per_octave`) = 2 is RepQ-ViT's log-sqrt2 grid. A log grid's relative step 2**(1/m)
    does not shrink with more bits (they only extend its range), so at 6-8 bits log-sqrt2 keeps a
    ~19% worst-case error; calibration may therefore pick a finer m among `octave_steps` as long as
    the grid still spans `MIN_OCTAVES` octaves below delta. Any m that is a power of two keeps the
    integer form of log2 quantization: a shift by q // m and one of m mantissa constants.
    For inputs in [0, delta]: q = round(-m * log2(x / delta)); codes past the last level map to 0.
    `delta` (and m) are searched among percentiles of the calibration input by L2 error, of the
    input itself or of the caller's `objective`.
    """

    MIN_OCTAVES = 8

    def __init__(self, bits: int = 8, octave_steps: tuple[int, ...] = (2, 4, 8, 16)) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.enabled = bits < 32
        self.levels = 2**bits
        fitting = tuple(m for m in octave_steps if self.levels // m >= self.MIN_OCTAVES)
        self.octave_steps = fitting or (min(octave_steps),)
        self.register_buffer("delta", torch.ones(()))
        self.register_buffer("steps_per_octave", torch.tensor(self.octave_steps[0]))
        self.register_buffer("initialized", torch.tensor(False))
        self.observing = False

    def quantize(self, x: torch.Tensor, delta: torch.Tensor, m: int | torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize `x` (>= 0) with top level `delta` and `m` levels per octave."""
        code = torch.round(-m * torch.log2(x / delta))  # log2(0) = -inf -> code +inf -> zero
        underflow = code >= self.levels
        code = code.clamp(0, self.levels - 1)
        out = delta * torch.pow(2.0, -code / m)
        out = torch.where(underflow, torch.zeros_like(out), out)
        # straight-through: rounding has no gradient, and without this block reconstruction would
        # see none through the attention map (q, k and everything before them in the block)
        return x + (out - x).detach() if x.requires_grad else out

    def integer_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The log2 form for an integer kernel: value = delta * 2**(-shift) * 2**(mantissa / m).

        Returns (shift, mantissa), mantissa in [0, m); entries that underflow get shift -1.
        """
        m = int(self.steps_per_octave)
        code = torch.round(-m * torch.log2(x / self.delta))
        underflow = code >= self.levels
        code = code.clamp(0, self.levels - 1).long()
        shift = (code + m - 1) // m
        mantissa = shift * m - code
        return torch.where(underflow, torch.full_like(shift, -1), shift), mantissa

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, objective: Objective | None = None) -> None:
        if not self.enabled:
            return
        rows = _channels_first(x.detach().float(), None)
        best = None
        for m in self.octave_steps:
            for _, hi in _tail_quantiles(rows, PERCENTILES):
                delta = hi[0].clamp_min(1e-8)
                if objective is None:
                    diff = self.quantize(rows, delta, m) - rows
                    err = (diff * diff).mean()
                else:
                    err = objective(self.quantize(x, delta, m))
                if best is None or err < best[0]:
                    best = (err, delta, m)
        self.delta = best[1].reshape(()).clone()
        self.steps_per_octave.fill_(best[2])
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.observing or not bool(self.initialized):
            self.calibrate(x)
        return self.quantize(x, self.delta, self.steps_per_octave)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, log grid, steps per octave searched in {self.octave_steps}"


class LogSqrt2Quantizer(LogQuantizer):
    """RepQ-ViT's log-sqrt2 grid {delta * 2**(-q/2)}: a `LogQuantizer` with m fixed at 2."""

    def __init__(self, bits: int = 8) -> None:
        super().__init__(bits, octave_steps=(2,))


__all__ = [
    "LogQuantizer",
    "LogSqrt2Quantizer",
    "SearchedUniformQuantizer",
]
