"""Sony Model Compression Toolkit (MCT) post-training quantization calibrated from a source, and
MCT's own data-free image generator.

    q, _ = mct.ptq.pytorch_post_training_quantization(model, representative_data_gen("pool/", cfg, 512))

MCT calls `representative_data_gen()` for each pass it makes (statistics, bias correction) and
iterates it; each item is a list with one input batch. Its default target platform (IMX500) is
W8A8 with power-of-two activation thresholds; `wbits=4` selects its 4-bit kernels for every
convolution and linear layer (activations stay 8-bit: the platform has no 4-bit activations).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .feed import Source, check_bits, source_loader

BITS = ((8, 8), (4, 8))


def representative_data_gen(
    source: Source, data_config: dict, n: int, batch_size: int = 32, seed: int = 0
) -> Callable[[], Iterator[list[torch.Tensor]]]:
    """MCT's `representative_data_gen`: each call iterates the first `n` images of `source` as
    `[batch]` lists."""
    loader = source_loader(source, data_config, n, batch_size, seed)

    def gen() -> Iterator[list[torch.Tensor]]:
        for images, _ in loader:
            yield [images]

    return gen


def _core_config(wbits: int):
    import model_compression_toolkit as mct
    from model_compression_toolkit.core.common.network_editors import NodeTypeFilter

    config = mct.core.CoreConfig()
    if wbits != 8:
        for layer in (nn.Conv2d, nn.Linear):
            config.bit_width_config.set_manual_weights_bit_width(NodeTypeFilter(layer), wbits, "weight")
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
    """`mct.ptq.pytorch_post_training_quantization` of a copy of `model` at MCT's default settings
    (W8A8; W4A8 with 4-bit kernels), calibrated on the first `n` images of `calib_source`."""
    import model_compression_toolkit as mct

    check_bits("mct", wbits, abits, BITS)
    gen = representative_data_gen(calib_source, data_config, n, batch_size, seed)
    qmodel, _ = mct.ptq.pytorch_post_training_quantization(
        copy.deepcopy(model).eval(), gen, core_config=_core_config(wbits)
    )
    return qmodel.cpu().eval()


def generate_images(
    model: nn.Module, data_config: dict, n: int, n_iter: int | None = None, batch_size: int | None = None
) -> tuple[torch.Tensor, float]:
    """(n images from `mct.data_generation` for `model`, wall seconds): MCT's data-free generator
    (BN-statistics alignment) at its default recipe, with `n_iter` / `batch_size` overriding its
    iterations (500) and batch (32). Images come in the model's normalised input space (MCT assumes
    the torchvision ImageNet normalisation). Needs a model with BatchNorm2d."""
    import model_compression_toolkit as mct

    from ..errors import QuantError

    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise QuantError(f"mct.data_generation needs BatchNorm2d layers; {type(model).__name__} has none")
    overrides = {k: v for k, v in (("n_iter", n_iter), ("data_gen_batch_size", batch_size)) if v is not None}
    config = mct.data_generation.get_pytorch_data_generation_config(**overrides)
    size = data_config.get("input_size", (3, 224, 224))
    hw = (size, size) if isinstance(size, int) else (int(size[-2]), int(size[-1]))
    t0 = time.perf_counter()
    images = mct.data_generation.pytorch_data_generation_experimental(
        copy.deepcopy(model).eval(), n, hw, config
    )
    seconds = time.perf_counter() - t0
    return torch.cat([torch.as_tensor(x).detach().cpu().float() for x in images])[:n], seconds
