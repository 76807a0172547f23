"""Calibration batches for other PTQ tools: any source `dfq quantize --calib` takes, with the model's
own preprocessing, as a torch DataLoader of (images, labels).

A source is a dfq pool (dir, manifest or URL), an image folder, a tar of class folders, an .npz
(read by `quant.dump.iter_source`: a pool's first n in manifest order, a seeded draw from the
others, the same images `quant.load_calibration` stacks), `"noise"` (`quant.data.noise_calibration`)
or images already preprocessed, as an (N, C, H, W) tensor. Every tool adapter in this package reads
its calibration data through `source_loader`, so all tools see the same images in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from ..data import build_transform, noise_calibration
from ..dump import iter_source
from ..errors import QuantError

Source = str | os.PathLike | torch.Tensor


class _SourceImages(IterableDataset):
    """(image, label) of the first n images of a file source, streamed; exactly n or a QuantError."""

    def __init__(self, source: str, transform: Callable, n: int, seed: int) -> None:
        super().__init__()
        self.source, self.transform, self.n, self.seed = source, transform, n, seed

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        count = 0
        for _, image, label in iter_source(self.source, self.transform, self.n, self.seed):
            count += 1
            yield image, label
        if count < self.n:
            raise QuantError(f"asked for {self.n} calibration images but {self.source} has only {count}")


def source_loader(
    source: Source, data_config: dict, n: int, batch_size: int = 32, seed: int = 0
) -> DataLoader:
    """A DataLoader of (images, labels) batches over the first `n` images of `source` (module
    docstring), preprocessed as `data_config` says; re-iterable, the same batches each pass.
    Preprocessed tensors and noise get label -1."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise QuantError(f"number of calibration images must be an integer >= 1, got {n!r}")
    if batch_size < 1:
        raise QuantError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(source, torch.Tensor):
        if source.ndim != 4 or not source.is_floating_point():
            raise QuantError(
                f"preprocessed images must be float (N, C, H, W), got {source.dtype} {tuple(source.shape)}"
            )
        if len(source) < n:
            raise QuantError(f"asked for {n} calibration images but got {len(source)}")
        images = source[:n].detach().cpu().float()
        return DataLoader(TensorDataset(images, torch.full((n,), -1)), batch_size=batch_size)
    if str(source) == "noise":
        images = noise_calibration(n, data_config.get("input_size", (3, 224, 224)), seed=seed)
        return DataLoader(TensorDataset(images, torch.full((n,), -1)), batch_size=batch_size)
    dataset = _SourceImages(str(source), build_transform(data_config), n, seed)
    return DataLoader(dataset, batch_size=batch_size)


def run_batches(model: nn.Module | Callable, loader: DataLoader) -> None:
    """Call `model` on every image batch of `loader` without gradients: the calibration pass every
    callback-style tool wants (ModelOpt's forward_loop, INC's run_fn, AIMET's compute_encodings
    callback, a PT2E prepared model's observers)."""
    with torch.no_grad():
        for images, _ in loader:
            model(images)


def example_input(data_config: dict, batch: int = 2) -> torch.Tensor:
    """A (batch, C, H, W) zero tensor of the model's input size, for tracing and export (batch 2:
    torch.export specialises a batch axis of 1)."""
    size = data_config.get("input_size", (3, 224, 224))
    c, h, w = (3, size, size) if isinstance(size, int) else (int(size[-3]), int(size[-2]), int(size[-1]))
    return torch.zeros(batch, c, h, w)


def export_dynamic_batch(model: nn.Module, data_config: dict) -> torch.fx.GraphModule:
    """`torch.export` of the eval-mode model with a dynamic batch axis, as a GraphModule (the input
    PT2E quantizers and NNCF's FX backend take)."""
    batch = torch.export.Dim("batch")
    try:
        program = torch.export.export(
            model.eval(), (example_input(data_config),), dynamic_shapes=({0: batch},)
        )
    except Exception as e:  # export raises many types (UserError, Unsupported, GuardOnDataDependent...)
        raise QuantError(f"torch.export failed on {type(model).__name__}: {type(e).__name__}: {e}") from None
    return program.module()


class ExportedModel(nn.Module):
    """An exported (and quantized) GraphModule that evaluators can call `.eval()` and `.to()` on.

    Why: an exported GraphModule refuses `.eval()` ("not supported yet"); its train/eval behaviour
    is fixed at export time (eval here), so switching modes is a no-op on it.
    """

    def __init__(self, graph: torch.fx.GraphModule) -> None:
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True) -> ExportedModel:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)


def check_bits(tool: str, wbits: int, abits: int, supported: tuple[tuple[int, int], ...]) -> None:
    """QuantError naming the bits when `tool` has no flow for (wbits, abits)."""
    if (wbits, abits) not in supported:
        have = ", ".join(f"W{w}A{a}" for w, a in supported)
        raise QuantError(f"{tool} has no W{wbits}A{abits} flow here: use {have}")
