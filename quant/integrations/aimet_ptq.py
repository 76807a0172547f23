"""Qualcomm AIMET (`aimet_torch`) quantization simulation calibrated from a source.

    sim = QuantizationSimModel(model, dummy_input, default_param_bw=8, default_output_bw=8)
    sim.compute_encodings(compute_encodings_callback("pool/", cfg, n=512))

AIMET's standard PTQ flow prepares the model (`model_preparer.prepare_model`: a torch.fx copy with
functional ops as modules, so custom modules such as a ResNet's padding shortcut need no quantized
definition), folds BatchNorm into the convolutions, then inserts quantize-
dequantize nodes (per-channel int weights, asymmetric activations, min-max ranges) and sets their
encodings from the callback's forward passes. Any bit width: W8A8, W4A8, W4A4.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from .feed import Source, check_bits, example_input, run_batches, source_loader

BITS = ((8, 8), (4, 8), (4, 4))


def compute_encodings_callback(
    source: Source, data_config: dict, n: int, batch_size: int = 32, seed: int = 0
) -> Callable[[nn.Module, Any], None]:
    """AIMET's `forward_pass_callback(model, args)`: the first `n` images of `source` through the sim model."""
    loader = source_loader(source, data_config, n, batch_size, seed)
    return lambda model, _args=None: run_batches(model, loader)


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
) -> nn.Module:
    """`prepare_model`, BN folding, then `QuantizationSimModel` at `wbits`/`abits` (default W8A8) with its default
    config, encodings computed on the first `n` images of `calib_source`; returns the sim model."""
    from aimet_torch.batch_norm_fold import fold_all_batch_norms
    from aimet_torch.model_preparer import prepare_model
    from aimet_torch.quantsim import QuantizationSimModel

    check_bits("aimet", wbits, abits, BITS)
    model = prepare_model(copy.deepcopy(model).eval())
    dummy = example_input(data_config, 1)
    fold_all_batch_norms(model, input_shapes=tuple(dummy.shape))
    sim = QuantizationSimModel(model, dummy_input=dummy, default_param_bw=wbits, default_output_bw=abits)
    sim.compute_encodings(compute_encodings_callback(calib_source, data_config, n, batch_size, seed))
    return sim.model
