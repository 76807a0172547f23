"""Intel Neural Compressor (3.x, `neural_compressor.torch`) static quantization calibrated from a source.

    q = quantize(export(model, example_inputs), StaticQuantConfig(), run_fn=run_fn("pool/", cfg, 512),
                 example_inputs=example_inputs)

Without intel-extension-for-pytorch, INC's static W8A8 is its PT2E flow (the X86 Inductor quantizer);
`run_fn(model)` is its calibration callback.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .feed import (
    ExportedModel,
    Source,
    check_bits,
    example_input,
    run_batches,
    source_loader,
)

BITS = ((8, 8),)


def run_fn(
    source: Source, data_config: dict, n: int, batch_size: int = 32, seed: int = 0
) -> Callable[[nn.Module], None]:
    """INC's `run_fn(model)`: the first `n` images of `source` through the prepared model."""
    loader = source_loader(source, data_config, n, batch_size, seed)
    return lambda model: run_batches(model, loader)


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
    """INC's `quantize` with the default `StaticQuantConfig` (W8A8) on the exported `model`,
    calibrated by `run_fn` on the first `n` images of `calib_source`."""
    import torch
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import StaticQuantConfig, quantize

    from ..errors import QuantError

    check_bits("inc", wbits, abits, BITS)
    example = (example_input(data_config),)
    try:
        graph = export(model.eval(), example, dynamic_shapes=({0: torch.export.Dim("batch")},))
    except RuntimeError as e:  # INC logs torch.export's error and raises this
        raise QuantError(f"neural_compressor.torch.export failed on {type(model).__name__}: {e}") from None
    calib = run_fn(calib_source, data_config, n, batch_size, seed)
    q = quantize(graph, StaticQuantConfig(), run_fn=calib, example_inputs=example)
    return ExportedModel(q)
