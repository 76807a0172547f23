"""ONNX Runtime static INT8 (`onnxruntime.quantization.quantize_static`) calibrated from a source.

    reader = calibration_reader("pool/", data_config, n=512, input_name="input")
    quantize_onnx_static("fp.onnx", "int8.onnx", reader)

The reader is `quant.ort_calib.ShardCalibrationReader` (no new code): this module adds the `noise`
source and `quantize_int8`, which exports the float model, quantizes it (QDQ, per-channel int8
weights, int8 activations, MinMax) and wraps the INT8 graph in an ONNX Runtime session that a
PyTorch evaluator can call.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import noise_calibration
from ..export_onnx import export_fp
from ..ort_calib import ShardCalibrationReader, quantize_onnx_static
from .feed import Source, check_bits, example_input

BITS = ((8, 8),)


def calibration_reader(
    source: Source, data_config: dict, n: int, input_name: str = "input", batch_size: int = 32, seed: int = 0
) -> ShardCalibrationReader:
    """ONNX Runtime's CalibrationDataReader over the first `n` images of `source`, preprocessed by
    `data_config` (`noise` becomes Gaussian images in the normalised input space)."""
    if isinstance(source, str) and source == "noise":
        source = noise_calibration(n, data_config.get("input_size", (3, 224, 224)), seed=seed)
    transform = None if isinstance(source, torch.Tensor) else data_config
    return ShardCalibrationReader(source, transform, n, input_name, batch_size=batch_size, seed=seed)


class OnnxModel(nn.Module):
    """An ONNX Runtime session (CPU) called like a PyTorch classifier: float (B, C, H, W) in, logits out."""

    def __init__(self, onnx_bytes: bytes) -> None:
        super().__init__()
        import onnxruntime as ort

        self.onnx_bytes = onnx_bytes
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: batch})[0]).to(x.device)


def quantize_int8(
    model: nn.Module,
    data_config: dict,
    calib_source: Source,
    n: int,
    *,
    batch_size: int = 32,
    seed: int = 0,
    wbits: int = 8,
    abits: int = 8,
) -> OnnxModel:
    """ORT's standard static W8A8 (QDQ, per-channel weights, MinMax) of `model`, calibrated on the
    first `n` images of `calib_source`."""
    check_bits("ort", wbits, abits, BITS)
    reader = calibration_reader(calib_source, data_config, n, "input", batch_size, seed)
    with tempfile.TemporaryDirectory(prefix="dfq-ort-") as tmp:
        fp = export_fp(model, example_input(data_config, 1), Path(tmp) / "fp.onnx")
        out = quantize_onnx_static(fp, Path(tmp) / "int8.onnx", reader)
        return OnnxModel(out.read_bytes())
