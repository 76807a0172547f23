"""NVIDIA Model Optimizer (`modelopt.torch.quantization`) calibrated from a source.

    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop("pool/", data_config, n=512))

ModelOpt inserts fake-quant `TensorQuantizer`s into the model in place and runs `forward_loop(model)`
once to set their ranges (max calibration); it runs on a CPU as on a GPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from .feed import Source, check_bits, run_batches, source_loader

BITS = ((8, 8), (4, 8), (4, 4))


def forward_loop(
    source: Source, data_config: dict, n: int, batch_size: int = 32, seed: int = 0
) -> Callable[[nn.Module], None]:
    """ModelOpt's `forward_loop(model)`: the first `n` images of `source` through `model`, no gradients."""
    loader = source_loader(source, data_config, n, batch_size, seed)
    return lambda model: run_batches(model, loader)


def quant_config(wbits: int = 8, abits: int = 8) -> dict:
    """`mtq.INT8_DEFAULT_CFG` (per-channel weights, per-tensor inputs, max calibration) with the
    weight and input quantizers set to `wbits` / `abits`."""
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    bits = {"*weight_quantizer": wbits, "*input_quantizer": abits}
    for entry in config["quant_cfg"]:
        if entry.get("quantizer_name") in bits and "cfg" in entry:
            entry["cfg"]["num_bits"] = bits[entry["quantizer_name"]]
    return config


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
    """`mtq.quantize` of a copy of `model` with INT8_DEFAULT_CFG (W8A8; W4A8 / W4A4 with the bits
    changed), calibrated on the first `n` images of `calib_source`."""
    import modelopt.torch.quantization as mtq

    check_bits("modelopt", wbits, abits, BITS)
    loop = forward_loop(calib_source, data_config, n, batch_size, seed)
    return mtq.quantize(copy.deepcopy(model).eval(), quant_config(wbits, abits), loop)
