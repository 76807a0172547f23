"""OpenVINO NNCF post-training quantization (`nncf.quantize`) calibrated from a source.

    dataset = nncf_dataset("pool/", data_config, n=512)  # nncf.Dataset(loader, transform_fn)
    int8 = nncf.quantize(export_dynamic_batch(model, data_config), dataset, subset_size=len(dataset_loader))

`quantize_int8` uses NNCF's Torch FX backend (the model exported with `torch.export`): its eager
Torch backend needs a C++ extension compiled at first use (over NNCF's 60 s limit on a 2-core machine)
and breaks on `nn.Sequential` models. The FX result holds int8 weights and q/dq activation nodes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .feed import ExportedModel, Source, check_bits, export_dynamic_batch, source_loader

BITS = ((8, 8),)


def nncf_dataset(source: Source, data_config: dict, n: int, batch_size: int = 32, seed: int = 0) -> Any:
    """`nncf.Dataset` over the first `n` images of `source`: items are (images, labels) batches and
    the transform_fn keeps the images (the model's input)."""
    import nncf

    return nncf.Dataset(source_loader(source, data_config, n, batch_size, seed), lambda batch: batch[0])


def _is_transformer(model: nn.Module) -> bool:
    from ..api import model_family
    from ..errors import QuantError

    try:
        return model_family(model) == "transformer"
    except QuantError:
        return False


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
    """NNCF's default W8A8 preset (symmetric per-channel int8 weights, 8-bit activations, MinMax
    ranges, fast bias correction; the transformer model type for attention models), calibrated on
    the first `n` images of `calib_source`."""
    import nncf

    check_bits("nncf", wbits, abits, BITS)
    dataset = nncf_dataset(calib_source, data_config, n, batch_size, seed)
    batches = -(-n // batch_size)  # NNCF counts dataset items, here batches
    model_type = nncf.ModelType.TRANSFORMER if _is_transformer(model) else None
    graph = export_dynamic_batch(model, data_config)
    return ExportedModel(nncf.quantize(graph, dataset, subset_size=batches, model_type=model_type))
