"""argparse value types shared by the `dfq` subcommands: each names the bad value in its message."""

from __future__ import annotations

import argparse

from benchmarks.argtypes import (
    area_fraction,
    nonnegative_float,
    nonnegative_int,
    oversample_ratio,
    positive_float,
    positive_int,
    seed_list,
)


def bits(text: str) -> int:
    """A bit width: 2..8, or 32 for "leave in float"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bit width must be an integer in 2..8, got {text!r}") from None
    if not (2 <= value <= 8 or value == 32):
        raise argparse.ArgumentTypeError(f"bit width must be in 2..8 (or 32 = float), got {value}")
    return value


def input_size(text: str) -> tuple[int, int, int]:
    """A model's input size: `S` (a square RGB image, e.g. `32`) or `3,H,W` (e.g. `3,32,32`)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values = [3, values[0], values[0]]
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected an input size S or 3,H,W (integers >= 1), got {text!r}")
    if values[0] != 3:
        raise argparse.ArgumentTypeError(
            f"images are read as RGB: the input size needs 3 channels, got {text!r}"
        )
    return values[0], values[1], values[2]


def _channel_floats(text: str, positive: bool) -> tuple[float, float, float]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    finite = all(abs(v) < float("inf") for v in values)  # also rejects nan
    if len(values) != 3 or not finite or (positive and min(values) <= 0):
        what = "numbers > 0" if positive else "numbers"
        raise argparse.ArgumentTypeError(f"expected 3 comma-separated {what} (R,G,B), got {text!r}")
    return values  # type: ignore[return-value]


def channel_mean(text: str) -> tuple[float, float, float]:
    """A normalization mean, one value a channel: `0.4914,0.4822,0.4465`."""
    return _channel_floats(text, positive=False)


def channel_std(text: str) -> tuple[float, float, float]:
    """A normalization std, one value > 0 a channel: `0.247,0.243,0.261`."""
    return _channel_floats(text, positive=True)


__all__ = [
    "area_fraction",
    "bits",
    "channel_mean",
    "channel_std",
    "input_size",
    "nonnegative_float",
    "nonnegative_int",
    "oversample_ratio",
    "positive_float",
    "positive_int",
    "seed_list",
]
