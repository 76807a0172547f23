"""The flags that state a model's preprocessing, for models that do not carry it (a factory returning
a bare module): `--input-size`, `--mean`, `--std`, `--num-classes`. Shared by `dfq quantize` and the
classifier-based generators of `dfq generate`, which record the values given so a run is reproducible.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from launch.argtypes import channel_mean, channel_std, input_size, positive_int

if TYPE_CHECKING:
    from quant.models import Preprocess

#: argparse dests of the flags, in the order they are recorded
FLAGS = ("input_size", "mean", "std", "num_classes")


def add_preprocess_flags(group: argparse._ActionsContainer, scope: str = "") -> None:
    """Add the four flags to a parser or argument group; `scope` prefixes their help."""
    group.add_argument(
        "--input-size",
        type=input_size,
        metavar="S|3,H,W",
        help=f"{scope}the model's input size, e.g. 32 or 3,32,32 (overrides the model's own)",
    )
    group.add_argument(
        "--mean", type=channel_mean, metavar="R,G,B", help=f"{scope}normalization mean, e.g. 0.49,0.48,0.45"
    )
    group.add_argument(
        "--std", type=channel_std, metavar="R,G,B", help=f"{scope}normalization std, e.g. 0.25,0.24,0.26"
    )
    group.add_argument(
        "--num-classes",
        type=positive_int,
        help=f"{scope}classes of the model's head (passed to a factory or timm/torchvision model that "
        "takes num_classes)",
    )


def preprocess_of(args: argparse.Namespace) -> Preprocess:
    """The preprocessing flags as `quant.models.Preprocess` (unset fields: the model's own)."""
    from quant.models import Preprocess

    return Preprocess(input_size=args.input_size, mean=args.mean, std=args.std)


def given_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    """The flags given, JSON-ready (lists), for result.json / the pool's config; None if none."""
    given = {name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in given.items()} or None
