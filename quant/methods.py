"""The quantization methods, as named presets of a path's settings (one registry for API and CLI).

A method names a model family's path and fills the settings a user left unset (`None`): e.g.
`qdrop` is block reconstruction with QDrop's dropping and AdaRound's published regulariser weight,
`genie-m` adds the learned weight step. A new preset is one entry here; a new algorithm is one
module plus an entry that points its family at it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import QuantError

CNN = "cnn"
TRANSFORMER = "transformer"


@dataclass(frozen=True)
class Method:
    """A named preset: the family whose path runs it, one line of help, and its setting values."""

    name: str
    family: str
    summary: str
    defaults: dict[str, Any] = field(default_factory=dict)


def _reconstruction(drop_prob: float, learn_weight_step: bool, round_weight: float) -> dict[str, Any]:
    return {
        "iters": 20000,
        "drop_prob": drop_prob,
        "learn_weight_step": learn_weight_step,
        "round_weight": round_weight,
    }


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "rtn",
            CNN,
            "MSE-searched grids, round to nearest, no training",
            {"iters": 0, "drop_prob": 0.0, "learn_weight_step": False, "round_weight": 0.0},
        ),
        Method(
            "brecq",
            CNN,
            "block reconstruction: AdaRound weights + LSQ activation steps",
            _reconstruction(0.0, False, 0.01),
        ),
        Method(
            "adaround",
            CNN,
            "the same reconstruction as brecq, by its rounding's name",
            _reconstruction(0.0, False, 0.01),
        ),
        Method(
            "qdrop",
            CNN,
            "brecq + QDrop's random float activations (p=0.5)",
            _reconstruction(0.5, False, 0.01),
        ),
        Method(
            "genie-m",
            CNN,
            "qdrop + a learned weight step (Genie-M); the CNN default",
            _reconstruction(0.5, True, 1.0),
        ),
        Method(
            "repq-vit",
            TRANSFORMER,
            "RepQ-ViT calibration (+ head rotation, GPTQ rounding; iters > 0 adds block reconstruction); "
            "the transformer default",
            {"iters": 0},
        ),
    )
}

#: The method a family runs when none is named.
DEFAULT_METHOD = {CNN: "genie-m", TRANSFORMER: "repq-vit"}


def get_method(name: str, family: str | None = None) -> Method:
    """The registered method `name`, checked against `family` when given (one-line error otherwise)."""
    method = METHODS.get(name)
    if method is None:
        raise QuantError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    if family is not None and method.family != family:
        fitting = ", ".join(n for n, m in METHODS.items() if m.family == family)
        raise QuantError(f"method {name!r} is for {method.family}s; a {family} takes: {fitting}")
    return method


def fill_preset(settings: Any, family: str) -> None:
    """Set, on a frozen settings dataclass, the fields left `None` to its method's preset values
    (checking that the method is one of `family`'s)."""
    for name, value in get_method(settings.method, family).defaults.items():
        if getattr(settings, name) is None:
            object.__setattr__(settings, name, value)


def methods_help() -> str:
    """One line per method, for the CLI's help."""
    return "; ".join(f"{m.name} ({m.family}): {m.summary}" for m in METHODS.values())
