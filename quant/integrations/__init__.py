"""Feed a calibration pool (or any source `dfq quantize --calib` takes) to other PTQ tools.

One module per tool, each with the few lines of glue the tool's own API wants, reading through
`feed.source_loader` (the model's own preprocessing, the same first n images `quant.load_calibration`
takes), and a `quantize_int8(model, data_config, calib_source, n, ...)` that runs the tool's
standard W8A8 flow and returns a model a PyTorch evaluator can call:

| tool | glue | module |
|---|---|---|
| ONNX Runtime `quantize_static` | `calibration_reader` (a CalibrationDataReader) | `ort_static` |
| PT2E (`prepare_pt2e`/`convert_pt2e`, torchao) | `calibrate(prepared, ...)` | `pt2e` |
| OpenVINO NNCF `nncf.quantize` | `nncf_dataset` (an nncf.Dataset) | `nncf_ptq` |
| NVIDIA ModelOpt `mtq.quantize` | `forward_loop` | `modelopt_ptq` |
| Intel Neural Compressor `quantize` | `run_fn` | `inc_ptq` |
| Sony MCT `pytorch_post_training_quantization` | `representative_data_gen`; `generate_images` | `mct_ptq` |
| Qualcomm AIMET `QuantizationSimModel` | `compute_encodings_callback` | `aimet_ptq` |

`TOOLS` is the registry (name -> `Tool`); `installed()` lists those whose package imports here.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType

from torch import nn

from ..errors import QuantError
from .feed import ExportedModel, Source, run_batches, source_loader


@dataclass(frozen=True)
class Tool:
    """A PTQ tool: its adapter module, the package that must import, the pip extra that installs it
    and the (wbits, abits) its flows cover."""

    name: str
    module: str
    package: str
    extra: str
    bits: tuple[tuple[int, int], ...]
    summary: str


_B8 = ((8, 8),)
_B4 = ((8, 8), (4, 8), (4, 4))

TOOLS: dict[str, Tool] = {
    t.name: t
    for t in (
        Tool("ort", "ort_static", "onnxruntime", "onnx", _B8, "ONNX Runtime quantize_static (QDQ)"),
        Tool("pt2e", "pt2e", "torchao", "pt2e", _B8, "PT2E with the X86 Inductor quantizer"),
        Tool("nncf", "nncf_ptq", "nncf", "nncf", _B8, "OpenVINO NNCF (Torch FX backend)"),
        Tool("modelopt", "modelopt_ptq", "modelopt", "modelopt", _B4, "NVIDIA ModelOpt"),
        Tool("inc", "inc_ptq", "neural_compressor", "inc", _B8, "Intel Neural Compressor (PT2E)"),
        Tool("mct", "mct_ptq", "model_compression_toolkit", "mct", ((8, 8), (4, 8)), "Sony MCT"),
        Tool("aimet", "aimet_ptq", "aimet_torch", "aimet", _B4, "Qualcomm AIMET"),
    )
}


def is_installed(name: str) -> bool:
    """Whether tool `name`'s package is importable here (without importing it)."""
    return importlib.util.find_spec(TOOLS[name].package) is not None


def installed() -> list[str]:
    """Names of the registered tools whose package is installed, in registry order."""
    return [name for name in TOOLS if is_installed(name)]


def tool_module(name: str) -> ModuleType:
    """The adapter module of tool `name`; QuantError naming the tool when it is unknown or not installed."""
    if name not in TOOLS:
        raise QuantError(f"unknown PTQ tool {name!r}: use one of {', '.join(TOOLS)}")
    tool = TOOLS[name]
    if not is_installed(name):
        raise QuantError(f"{name} needs {tool.package}: pip install 'dfq[{tool.extra}]'")
    return importlib.import_module(f"{__name__}.{tool.module}")


def quantize_int8(
    tool: str,
    model: nn.Module,
    data_config: dict,
    calib_source: Source,
    n: int,
    **kwargs: object,
) -> nn.Module:
    """Tool `tool`'s standard W8A8 flow (`wbits`/`abits` for its other flows) of `model`, calibrated
    on the first `n` images of `calib_source`; a callable model (images -> logits)."""
    return tool_module(tool).quantize_int8(model, data_config, calib_source, n, **kwargs)


__all__ = [
    "TOOLS",
    "ExportedModel",
    "Tool",
    "installed",
    "quantize_int8",
    "run_batches",
    "source_loader",
    "tool_module",
]
