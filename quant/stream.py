"""Fresh training images every step: endless minibatches from an image tensor or a dataset.

The distillation methods (`quant.distill`) train for a budget of steps rather than reconstructing
from a fixed tensor, so they read their images as a stream: a pool's shards in manifest order
through a shuffle buffer (`quant.reader.CalibrationDataset`, never all in memory), an indexable
dataset (ImageFolder, tar, .npz) or a tensor in a new random order every epoch. With `flip_crop`
each batch is drawn anew through the CIFAR/ImageNet training augmentation (a left-right flip with
probability 1/2, a shift of up to 1/8 of the image with reflect padding: `quant.data.
augment_calibration`'s), so a pool smaller than the budget is not seen as the same images each
epoch. `epochs` says how many times over the source the stream has gone.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, IterableDataset

from .data import augment_calibration
from .errors import QuantError
from .quantizers import check_calibration

Source = torch.Tensor | Dataset


def _image(item: object) -> torch.Tensor:
    """The image of a dataset item ((image, label) pairs or bare images)."""
    image = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(image, torch.Tensor):
        raise QuantError(
            f"dataset items must be image tensors (apply the model's transform), got {type(image).__name__}"
        )
    return image


def source_size(source: Source) -> int:
    """Images in `source` (an iterable dataset's nominal length; 0 if it has none)."""
    try:
        return len(source)  # type: ignore[arg-type]
    except TypeError:
        return 0


def first_images(source: Source, n: int) -> torch.Tensor:
    """The first `n` images of `source` (fewer if it has fewer), stacked: the same ones every call."""
    if isinstance(source, torch.Tensor):
        return source[:n]
    if isinstance(source, IterableDataset):
        images = [_image(item) for item in itertools.islice(iter(source), n)]
    else:
        images = [_image(source[i]) for i in range(min(n, len(source)))]
    if not images:
        raise QuantError("the training images are empty")
    return torch.stack(images)


class ImageStream:
    """Endless batches of `batch_size` images from `source`, deterministic per `seed`.

    A tensor or an indexable dataset is read in a fresh random permutation each epoch. An iterable
    dataset (a pool) of at most `buffer` images is decoded once and then read like a tensor; a
    larger one streams in its own order through a shuffle buffer of `buffer` images, restarted at
    its end. `epochs` counts passes over the source (images drawn / its size).
    """

    def __init__(
        self, source: Source, batch_size: int, seed: int = 0, flip_crop: bool = False, buffer: int = 1024
    ) -> None:
        if isinstance(source, torch.Tensor):
            check_calibration(source)
        elif not isinstance(source, Dataset):
            raise QuantError(f"training images must be a tensor or a Dataset, got {type(source).__name__}")
        self.size = source_size(source)
        if isinstance(source, IterableDataset) and 0 < self.size <= buffer:
            source = first_images(source, self.size)  # small: decoded once, not every epoch
            self.size = len(source)
        if self.size == 0 and not isinstance(source, IterableDataset):
            raise QuantError("the training images are empty")
        self.source, self.batch_size, self.flip_crop = source, batch_size, flip_crop
        self.drawn = 0
        self.generator = torch.Generator().manual_seed(seed)
        self._buffer_size = max(buffer, batch_size)
        self._items = self._iterable() if isinstance(source, IterableDataset) else self._indexed()

    @property
    def epochs(self) -> float:
        return self.drawn / self.size if self.size else 0.0

    def _indexed(self) -> Iterator[torch.Tensor]:
        n = self.size
        while True:
            for i in torch.randperm(n, generator=self.generator).tolist():
                yield self.source[i] if isinstance(self.source, torch.Tensor) else _image(self.source[i])

    def _iterable(self) -> Iterator[torch.Tensor]:
        buffer: list[torch.Tensor] = []
        while True:
            empty = True
            for item in self.source:
                empty = False
                buffer.append(_image(item))
                if len(buffer) >= self._buffer_size:
                    yield buffer.pop(self._pick(len(buffer)))
            if empty:
                raise QuantError("the training images are empty")
            while len(buffer) > self._buffer_size // 2:  # carry half into the next pass: mixes epochs
                yield buffer.pop(self._pick(len(buffer)))

    def _pick(self, n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=self.generator))

    def next(self) -> torch.Tensor:
        """The next batch (a new random flip and shift per image with `flip_crop`)."""
        batch = torch.stack([next(self._items) for _ in range(self.batch_size)])
        self.drawn += self.batch_size
        if self.flip_crop:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            batch = augment_calibration(batch, 2, seed=seed)[self.batch_size :]
        return batch
