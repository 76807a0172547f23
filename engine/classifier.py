"""The classifier a classifier-based generator (bn-distill) learns from, as the CLI layer hands it in.

The engine never imports `quant`, which knows how to build models; the CLI layer resolves the model
spec and passes this record as the generator's `classifier` context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Classifier:
    """A picklable factory of the full-precision model (it travels to Ray actors) and its data config."""

    factory: Callable[[], nn.Module]
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
