"""argparse value types shared by the `dfq` subcommands: each names the bad value in its message."""

from __future__ import annotations

import argparse

from benchmarks.argtypes import (
    area_fraction,
    nonnegative_float,
    nonnegative_int,
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


__all__ = [
    "area_fraction",
    "bits",
    "nonnegative_float",
    "nonnegative_int",
    "positive_float",
    "positive_int",
    "seed_list",
]
