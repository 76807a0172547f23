"""The two small pieces Genie-D adds to plain BN-statistics matching, written for determinism.

- `LatentGenerator`: a tiny conv decoder from per-sample latents to normalized images. Optimizing
  latents plus a shared decoder (instead of raw pixels) gives images with natural-image-like
  spatial correlation, which Genie (CVPR 2023) found quantizes better than ZeroQ's pixel images.
- `SwingJitter`: before every strided conv, each sample is shifted by up to one pixel (reflect
  padding, a fresh random offset per sample and iteration). A strided conv sees only one phase of
  its input grid; jittering the phase stops the images from overfitting to it (checkerboards).
  Offsets come from a seeded `torch.Generator`, drawn on the host once per batch, so a rerun gives
  the same images; the shift is one collision-free gather, whose backward is deterministic on GPUs
  too.
"""

from __future__ import annotations

import torch
from torch import nn

LATENT_DIM = 256


class LatentGenerator(nn.Module):
    """Latent (B, LATENT_DIM) -> normalized image (B, C, H, W).

    A linear map to a coarse grid of at most 8x8, then "upsample x2, 3x3 conv, BN, LeakyReLU"
    stages (channels halving, at least 16) to the full size, tanh, and a final affine-free BN that
    pins each channel of the batch to mean 0 / std 1 (the model's normalized input range). At
    32 px with width 128 this is Genie's decoder (c1 = 128, c2 = 64; 2.2 M parameters); at 224 px
    the coarse grid stays 7x7 instead of Genie's 56x56, so the linear layer is 1.6 M rather than
    100 M parameters.
    """

    def __init__(self, channels: int, height: int, width: int, base: int = 128) -> None:
        super().__init__()
        ups = 0
        while max(height, width) >> ups > 8 and (height >> ups) % 2 == 0 and (width >> ups) % 2 == 0:
            ups += 1
        self.grid = (height >> ups, width >> ups)
        self.base = base
        self.linear = nn.Linear(LATENT_DIM, base * self.grid[0] * self.grid[1])
        layers: list[nn.Module] = [nn.BatchNorm2d(base)]
        c = base
        for _ in range(ups - 1):
            c_next = max(c // 2, 16)
            layers += [
                nn.Upsample(scale_factor=2),
                nn.Conv2d(c, c_next, 3, padding=1),
                nn.BatchNorm2d(c_next),
            ]
            layers.append(nn.LeakyReLU(0.2))
            c = c_next
        if ups > 0:
            layers.append(nn.Upsample(scale_factor=2))
        layers += [nn.Conv2d(c, channels, 3, padding=1), nn.Tanh(), nn.BatchNorm2d(channels, affine=False)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.linear(z).view(z.shape[0], self.base, *self.grid)
        return self.body(out)


def build_latent_generator(channels: int, height: int, width: int, seed: int) -> LatentGenerator:
    """A decoder whose initial weights depend only on `seed` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LatentGenerator(channels, height, width)


def strided_convs(model: nn.Module) -> list[nn.Conv2d]:
    """The convs whose stride is not 1: the places where the sampling phase matters."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]


def _reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect padding of the last two dims from slices and `cat`.

    Same values as `F.pad(mode="reflect")`, but its backward is plain slicing and summing, which is
    deterministic on CUDA (ReflectionPad2d's backward uses atomics).
    """
    h, w = x.shape[-2:]
    top = [x[..., i : i + 1, :] for i in range(pad, 0, -1)]
    bottom = [x[..., h - 1 - i : h - i, :] for i in range(1, pad + 1)]
    x = torch.cat([*top, x, *bottom], dim=-2)
    left = [x[..., i : i + 1] for i in range(pad, 0, -1)]
    right = [x[..., w - 1 - i : w - i] for i in range(1, pad + 1)]
    return torch.cat([*left, x, *right], dim=-1)


def shift_per_sample(x: torch.Tensor, offsets: torch.Tensor, jitter: int = 1) -> torch.Tensor:
    """Shift each sample of `x` (B, C, H, W) by its own offset in [-jitter, jitter]^2.

    `offsets` (B,) holds each sample's offset as `dy * span + dx`, span = 2 * jitter + 1. One
    gather on the flattened reflect-padded map: every output reads a distinct input position, so
    the backward scatter never adds twice into one place and stays deterministic everywhere.
    """
    b, c, h, w = x.shape
    span = 2 * jitter + 1
    padded = _reflect_pad(x, jitter).flatten(2)  # (B, C, (H + 2j) * (W + 2j))
    rows = torch.arange(h, device=x.device).view(1, h, 1) + torch.div(
        offsets, span, rounding_mode="floor"
    ).view(b, 1, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w) + torch.remainder(offsets, span).view(b, 1, 1)
    index = (rows * (w + 2 * jitter) + cols).view(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(padded, 2, index).view(b, c, h, w)


class SwingJitter:
    """Pre-forward hooks that jitter the input of every strided conv, one offset per sample.

    `offsets` holds one draw per (iteration, conv, sample); `step(it)` selects the iteration.
    Use as a context manager around the optimisation loop.
    """

    def __init__(self, convs: list[nn.Conv2d], offsets: torch.Tensor, jitter: int = 1) -> None:
        self.convs = convs
        self.offsets = offsets  # (iters, n_convs, B), values in [0, span^2)
        self.jitter = jitter
        self.it = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> SwingJitter:
        for i, conv in enumerate(self.convs):
            self._handles.append(conv.register_forward_pre_hook(self._make_hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def step(self, it: int) -> None:
        self.it = it

    def _make_hook(self, index: int):  # noqa: ANN202 - a torch hook closure
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x = inputs[0]
            if x.shape[-1] <= self.jitter or x.shape[-2] <= self.jitter:
                return inputs
            return (shift_per_sample(x, self.offsets[self.it, index], self.jitter), *inputs[1:])

        return hook


def draw_offsets(
    iters: int, n_convs: int, batch: int, seed: int, device: torch.device, jitter: int = 1
) -> torch.Tensor:
    """All jitter offsets of one batch, drawn at once from a seeded generator, moved to `device` once."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, (2 * jitter + 1) ** 2, (iters, max(n_convs, 1), batch), generator=gen)
    return offsets.to(device)
