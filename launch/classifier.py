"""The classifier of classifier-based generators (bn-distill), injected by the CLI.

`engine` may not import `quant`, but those generators need the classifier that `quant` knows how to
build. The CLI layer, which may import both, resolves the model spec here and hands the engine an
`engine.classifier.Classifier`: a picklable factory (it travels to Ray actors) and the data config.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from quant.models import Preprocess

VOCAB_BY_CLASSES = {10: "cifar10", 100: "cifar100", 1000: "imagenet"}


def load_classifier(
    spec: str, checkpoint: str | None, num_classes: int | None, preprocess: Preprocess | None = None
) -> nn.Module:
    """Build the classifier in eval mode (runs in each actor process)."""
    from quant.models import load_model

    model, _ = load_model(spec, checkpoint=checkpoint, num_classes=num_classes, preprocess=preprocess)
    return model.eval()


def distill_context(
    spec: str, checkpoint: str | None, num_classes: int | None, preprocess: Preprocess | None = None
) -> tuple[dict[str, Any], dict]:
    """(generator context `{"classifier": Classifier}`, data config) for `spec`: loads the model once
    here and runs one image through it, so a bad spec, checkpoint or input size is a one-line error
    before Ray starts. `preprocess` (the CLI's --input-size/--mean/--std) overrides or completes the
    model's data config; actors get absolute paths, whatever their working directory."""
    from engine.classifier import Classifier
    from quant.models import check_forward, load_model, resolve_spec

    model, data_config = load_model(
        spec, checkpoint=checkpoint, num_classes=num_classes, preprocess=preprocess
    )
    check_forward(model, data_config)
    checkpoint = None if checkpoint is None else os.path.abspath(checkpoint)
    classifier = Classifier(
        factory=functools.partial(load_classifier, resolve_spec(spec), checkpoint, num_classes, preprocess),
        input_size=tuple(data_config["input_size"]),
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        num_classes=int(data_config["num_classes"]),
    )
    return {"classifier": classifier}, data_config
