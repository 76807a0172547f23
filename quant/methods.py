"""The quantization methods, as named presets of a path's settings (one registry for API and CLI).

A method names the path that runs it and fills the settings a user left unset (`None`): e.g.
`qdrop` is block reconstruction with QDrop's dropping and AdaRound's published regulariser weight,
`genie-m` adds the learned weight step. Two paths are model families' own (`cnn`: block
reconstruction, `transformer`: RepQ-ViT calibration); the `distill` path (`kd`, `nipq`) trains a
quantized copy of either family against the float model, so its methods name the model families
they take. A new preset is one entry here; a new algorithm is one module plus an entry that points
its path at it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import QuantError

CNN = "cnn"
TRANSFORMER = "transformer"
#: the path that quantizes by training on the pool against the float model (`quant.distill`)
DISTILL = "distill"


@dataclass(frozen=True)
class Method:
    """A named preset: the path that runs it (`family`), one line of help, its setting values, and
    the model families it takes (`models`; empty: the one its path is named for)."""

    name: str
    family: str
    summary: str
    defaults: dict[str, Any] = field(default_factory=dict)
    models: tuple[str, ...] = ()

    @property
    def model_families(self) -> tuple[str, ...]:
        return self.models or (self.family,)


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
        Method(
            "kd",
            DISTILL,
            "EnhancingDFQ/GDFQ fine-tuning: a fake-quantized copy trained on the pool against the float "
            "model (KL on logits + MSE of every quantized activation, LSQ steps, straight-through weights)",
            {
                "lr": 1e-5,
                "lr_scale": 1e-4,
                "act_weight": 1.0,
                "rounding": "ste",
                "noise": False,
                "hard_fraction": 0.0,
            },
            models=(CNN, TRANSFORMER),
        ),
        Method(
            "nipq",
            DISTILL,
            "NIPQ: training with pseudo-quantization noise and learned truncation, then hard quantization "
            "(the last 10% of the steps) at fixed bit widths; KL to the float model on logits",
            {
                "lr": 1e-5,
                "lr_scale": 1e-4,
                "act_weight": 0.0,
                "rounding": "ste",
                "noise": True,
                "hard_fraction": 0.1,
            },
            models=(CNN, TRANSFORMER),
        ),
    )
}

#: The method a family runs when none is named.
DEFAULT_METHOD = {CNN: "genie-m", TRANSFORMER: "repq-vit"}


def get_method(name: str, family: str | None = None) -> Method:
    """The registered method `name`, checked against the model family `family` when given
    (one-line error otherwise)."""
    method = METHODS.get(name)
    if method is None:
        raise QuantError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    if family is not None and family not in method.model_families:
        fitting = ", ".join(n for n, m in METHODS.items() if family in m.model_families)
        takes = " and ".join(f"{f}s" for f in method.model_families)
        raise QuantError(f"method {name!r} is for {takes}; a {family} takes: {fitting}")
    return method


def fill_preset(settings: Any, path: str) -> None:
    """Set, on a frozen settings dataclass, the fields left `None` to its method's preset values
    (checking that the method runs on `path`)."""
    method = get_method(settings.method)
    if method.family != path:
        fitting = ", ".join(n for n, m in METHODS.items() if m.family == path)
        raise QuantError(f"method {method.name!r} does not run on the {path} path; it takes: {fitting}")
    for name, value in method.defaults.items():
        if getattr(settings, name) is None:
            object.__setattr__(settings, name, value)


def methods_help() -> str:
    """One line per method, for the CLI's help."""
    return "; ".join(f"{m.name} ({'/'.join(m.model_families)}): {m.summary}" for m in METHODS.values())
