"""PyTorch 2 Export quantization (PT2E: `prepare_pt2e` / `convert_pt2e` with the X86 Inductor
quantizer) calibrated from a source.

With torch 2.14 PT2E lives in torchao (`torchao.quantization.pt2e`; `torch.ao.quantization.quantize_pt2e`
is gone), so this needs `pip install dfq[pt2e]`; older torch releases still have it under torch.ao.

    prepared = prepare_pt2e(export_dynamic_batch(model, cfg), quantizer)
    calibrate(prepared, "pool/", cfg, n=512)
    int8 = convert_pt2e(prepared)
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from ..errors import QuantError
from .feed import ExportedModel, Source, check_bits, export_dynamic_batch, run_batches, source_loader

BITS = ((8, 8),)


def pt2e_modules() -> tuple[ModuleType, ModuleType]:
    """(the module with prepare_pt2e/convert_pt2e, the X86 Inductor quantizer module): torchao's,
    else torch.ao's (torch before 2.10)."""
    try:
        import torchao.quantization.pt2e.quantize_pt2e as flow
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    except ImportError:
        try:
            import torch.ao.quantization.quantize_pt2e as flow  # type: ignore[no-redef]
            import torch.ao.quantization.quantizer.x86_inductor_quantizer as x86  # type: ignore[no-redef]
        except ImportError:
            raise QuantError(
                "PT2E quantization needs torchao with this torch: pip install 'dfq[pt2e]'"
            ) from None
    return flow, x86


def calibrate(
    prepared: nn.Module, source: Source, data_config: dict, n: int, batch_size: int = 32, seed: int = 0
) -> None:
    """Run the first `n` images of `source` through a `prepare_pt2e` model, so its observers see them."""
    run_batches(prepared, source_loader(source, data_config, n, batch_size, seed))


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
) -> ExportedModel:
    """The X86 Inductor quantizer's default static W8A8 (per-channel weights, per-tensor u8
    activations, HistogramObserver) of `model`, calibrated on the first `n` images of `calib_source`."""
    check_bits("pt2e", wbits, abits, BITS)
    flow, x86 = pt2e_modules()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = flow.prepare_pt2e(export_dynamic_batch(model, data_config), quantizer)
    calibrate(prepared, calib_source, data_config, n, batch_size, seed)
    return ExportedModel(flow.convert_pt2e(prepared))
