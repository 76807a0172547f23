"""`quant`: post-training quantization of CNNs and vision transformers calibrated on shard pools.

The front door is `quantize(model, calib, settings=None) -> QuantizedModel` (`quant.api`); `load`
reads back what `QuantizedModel.save` wrote. Methods are named presets (`METHODS`) of each path's
settings (`CNNSettings`, `TransformerSettings`, and `DistillSettings` for the methods that train a
quantized copy on the images: `kd`, `nipq`). It never imports `engine`: the two share only the
shard format (SHARDS.md). `select_samples` keeps the best of an oversampled pool by the float
model's score (`SELECTORS`: energy, bn-sensitivity; GenQ's filters).
"""

from .api import QuantizedModel, load, method_settings, model_family, quantize, settings_for
from .cnn import CNNSettings
from .data import build_transform, load_calibration
from .distill import DistillSettings
from .errors import QuantError
from .methods import METHODS
from .select import SELECTORS, select_samples
from .vit import TransformerSettings

__all__ = [
    "METHODS",
    "SELECTORS",
    "CNNSettings",
    "DistillSettings",
    "QuantError",
    "QuantizedModel",
    "TransformerSettings",
    "build_transform",
    "load",
    "load_calibration",
    "method_settings",
    "model_family",
    "quantize",
    "select_samples",
    "settings_for",
]
