"""ONNX Runtime static quantization calibrated on a pool (or any source `quant.data` reads).

    reader = ShardCalibrationReader("pool/", build_transform(cfg), n=512, input_name="input")
    quantize_onnx_static("model.onnx", "model.int8.onnx", reader)

`ShardCalibrationReader` is an `onnxruntime.quantization.CalibrationDataReader` that streams the
first n preprocessed images of a source (`quant.dump.iter_source`: a pool's first n in manifest
order, the same images the PyTorch quantizer calibrates on) in batches. `quantize_onnx_static`
wraps `onnxruntime.quantization.quantize_static` with the setting docs/results.md compares against:
QDQ format, per-channel int8 weights, int8 activations, MinMax ranges.

onnxruntime is an optional dependency (`pip install dfq[onnx]`); this module imports without it and
raises a QuantError when a function that needs it is called.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from .dump import iter_source
from .errors import QuantError

try:  # the reader must *be* a CalibrationDataReader when ORT is there; importable when it is not
    from onnxruntime.quantization import CalibrationDataReader as _ReaderBase
except ImportError:  # pragma: no cover - exercised only without onnxruntime
    _ReaderBase = object  # type: ignore[assignment,misc]

CALIBRATE_METHODS = ("minmax", "entropy", "percentile", "distribution")
QUANT_FORMATS = ("qdq", "qoperator")
QUANT_TYPES = ("int8", "uint8")


def _ort_quantization():
    try:
        from onnxruntime import quantization
    except ImportError as e:
        raise QuantError(
            f"ONNX Runtime quantization needs onnxruntime (pip install dfq[onnx]): {e}"
        ) from None
    return quantization


class ShardCalibrationReader(_ReaderBase):
    """Feeds ONNX Runtime's calibrator `{input_name: float32 (B, C, H, W)}` batches from a pool.

    Args:
        pool_or_source: a dfq pool (dir, manifest or fsspec URL), an image folder, a tar of class
            folders or an .npz (whatever `quant.data.open_dataset` reads); or images already
            preprocessed, as a (N, C, H, W) tensor or array (e.g. `quant.data.noise_calibration`).
        transform: PIL image -> (C, H, W) tensor, or a data config dict (`build_transform` of it);
            ignored for preprocessed images.
        n: how many images (the first n; None = all). Fewer in the source raises QuantError.
        input_name: the ONNX graph input to feed (`session.get_inputs()[0].name`).
        batch_size: images per `get_next` (the ONNX input must have a dynamic batch axis when > 1).
        seed: the draw for non-pool sources, as `quant.data.load_calibration` makes it.

    Images are read lazily, batch by batch; `rewind()` starts again from the first image.
    """

    def __init__(
        self,
        pool_or_source: str | os.PathLike | torch.Tensor | np.ndarray,
        transform: Callable | dict | None,
        n: int | None,
        input_name: str,
        batch_size: int = 1,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise QuantError(f"batch_size must be >= 1, got {batch_size}")
        if n is not None and n < 1:
            raise QuantError(f"number of calibration images must be >= 1, got {n}")
        self.source, self.transform, self.n = pool_or_source, transform, n
        self.input_name, self.batch_size, self.seed = input_name, batch_size, seed
        self.count = 0  # images handed out since the last rewind
        self._batches: Iterator[np.ndarray] | None = None

    def _images(self) -> Iterator[np.ndarray]:
        if isinstance(self.source, (torch.Tensor, np.ndarray)):
            images = np.asarray(
                self.source.detach().cpu() if isinstance(self.source, torch.Tensor) else self.source
            )
            if images.ndim != 4:
                raise QuantError(f"preprocessed images must be (N, C, H, W), got shape {images.shape}")
            if self.n is not None and len(images) < self.n:
                raise QuantError(f"asked for {self.n} calibration images but got {len(images)}")
            yield from images[: self.n]
            return
        for _, image, _ in iter_source(self.source, self.transform, self.n, self.seed):
            yield np.asarray(image)
        if self.n is not None and self.count < self.n:
            raise QuantError(f"asked for {self.n} calibration images but {self.source} has only {self.count}")

    def _batched(self) -> Iterator[np.ndarray]:
        batch: list[np.ndarray] = []
        for image in self._images():
            batch.append(image)
            self.count += 1
            if len(batch) == self.batch_size:
                yield np.ascontiguousarray(np.stack(batch), dtype=np.float32)
                batch = []
        if batch:
            yield np.ascontiguousarray(np.stack(batch), dtype=np.float32)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next `{input_name: batch}`, or None when the n images are used up (ORT's protocol)."""
        if self._batches is None:
            self._batches = self._batched()
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        """Start again from the first image (ORT's calibrators read the data once; other tools may not)."""
        self._batches, self.count = None, 0

    def __len__(self) -> int:
        """Number of batches a full pass yields when the source holds n images (n=None: unknown)."""
        if self.n is None:
            if isinstance(self.source, (torch.Tensor, np.ndarray)):
                return -(-len(self.source) // self.batch_size)
            raise TypeError("length unknown: n is None")
        return -(-self.n // self.batch_size)


def _enum(enum: type, table: dict[str, str], value: str, what: str):
    if not isinstance(value, str) or value.lower() not in table:
        raise QuantError(f"unknown {what} {value!r}: use one of {', '.join(table)}")
    return getattr(enum, table[value.lower()])


def quantize_onnx_static(
    fp_onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    reader: ShardCalibrationReader,
    per_channel: bool = True,
    calibrate_method: str = "minmax",
    quant_format: str = "qdq",
    activation_type: str = "int8",
    weight_type: str = "int8",
    preprocess: bool = True,
    op_types: list[str] | None = None,
    extra_options: dict | None = None,
) -> Path:
    """Static INT8 quantization of the float ONNX model at `fp_onnx_path`, calibrated by `reader`.

    Defaults are the setting docs/results.md reports (QDQ, per-channel int8 weights, int8 activations,
    MinMax). `preprocess` first runs `onnxruntime.quantization.quant_pre_process` (shape inference
    and graph optimisation: fuses BatchNorm into Conv when the exporter left it, which per-channel
    weight quantization needs). `calibrate_method`: minmax, entropy, percentile or distribution;
    `quant_format`: qdq or qoperator; `op_types`: restrict to these op types (default: all ORT
    quantizes). Returns `out_path`.
    """
    q = _ort_quantization()
    method = _enum(
        q.CalibrationMethod,
        {
            "minmax": "MinMax",
            "entropy": "Entropy",
            "percentile": "Percentile",
            "distribution": "Distribution",
        },
        calibrate_method,
        "calibrate_method",
    )
    fmt = _enum(q.QuantFormat, {"qdq": "QDQ", "qoperator": "QOperator"}, quant_format, "quant_format")
    types = {"int8": "QInt8", "uint8": "QUInt8"}
    act_type = _enum(q.QuantType, types, activation_type, "activation_type")
    w_type = _enum(q.QuantType, types, weight_type, "weight_type")
    src, out = Path(fp_onnx_path), Path(out_path)
    if not src.is_file():
        raise QuantError(f"ONNX model {src} does not exist")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dfq-ort-") as tmp:
        model_in = src
        if preprocess:
            model_in = Path(tmp) / "preprocessed.onnx"
            try:
                q.quant_pre_process(str(src), str(model_in))
            except Exception as e:  # shape inference/optimiser errors come in many types
                raise QuantError(f"quant_pre_process failed on {src}: {type(e).__name__}: {e}") from None
        q.quantize_static(
            str(model_in),
            str(out),
            reader,
            quant_format=fmt,
            op_types_to_quantize=op_types,
            per_channel=per_channel,
            activation_type=act_type,
            weight_type=w_type,
            calibrate_method=method,
            extra_options=extra_options,
        )
    return out
