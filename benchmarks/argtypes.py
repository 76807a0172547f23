"""argparse value types of the benchmarks' options (the `dfq` subcommands share them): each names
the bad value in its message."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", int, float)


def _number(text: str, cast: Callable[[str], T], ok: Callable[[T], bool], expected: str) -> T:
    """`cast(text)` if it parses and `ok` holds, else an argparse error naming `text`."""
    try:
        value = cast(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "an integer >= 1")


def nonnegative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def nonnegative_float(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")  # also nan


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < float("inf"), "a finite number > 0")  # also nan


def area_fraction(text: str) -> float:
    """A fraction of an image's area in [0, 1), e.g. `0.5`."""
    return _number(text, float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")  # also rejects nan


def oversample_ratio(text: str) -> float:
    """How many times the kept number of images to score, a finite number >= 1, e.g. `4` or `1.5`."""
    return _number(text, float, lambda v: 1 <= v < float("inf"), "a finite number >= 1")  # also nan


def seed_list(text: str) -> list[int]:
    """A comma list of distinct integer seeds >= 0, e.g. `0,1,2`."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers >= 0, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected a comma list of distinct integers >= 0, got {text!r}")
    return seeds
