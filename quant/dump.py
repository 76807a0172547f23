"""Calibration images as plain arrays, for tools that want tensors rather than shards.

`iter_source` is the one place that turns any image source `quant.data` accepts (a dfq pool, an
image folder, a tar of class folders, an .npz) into (key, image tensor, label) triples in a fixed
order: a pool's first n samples in manifest order, the same ones `quant.data.load_calibration`
takes; for the other sources the same seeded draw `load_calibration` makes. `dump_tensors` writes
those triples to one file whose suffix picks the layout:

- `.npy`: `images` (N, C, H, W) float32 at the path, `labels` (N,) int64 at `<stem>.labels.npy`
  and the keys, one a line, at `<stem>.keys.txt` beside it;
- `.npz`: one archive with `images`, `labels` and `keys` (unicode strings);
- `.pt`: a `torch.save` dict `{"images": FloatTensor, "labels": LongTensor, "keys": list[str]}`.

Files are written under a temporary name and renamed, so a reader never sees half a dump.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from .data import build_transform, open_dataset, source_kind
from .errors import QuantError
from .reader import iter_samples

SUFFIXES = (".npy", ".npz", ".pt")


def resolve_transform(transform: Callable | dict | None) -> Callable | None:
    """A transform as given, or `quant.data.build_transform` of a data config dict."""
    if isinstance(transform, dict):
        return build_transform(transform)
    return transform


def _item_key(dataset: object, index: int) -> str:
    """A stable name for item `index` of an indexable source: its file or member name when known."""
    samples = getattr(dataset, "samples", None)  # torchvision ImageFolder: (path, class)
    if samples is not None:
        return os.path.relpath(samples[index][0], getattr(dataset, "root", "."))
    members = getattr(dataset, "members", None)  # quant.data.TarImageDataset: (name, offset, size)
    if members is not None:
        return str(members[index][0])
    return f"i{index:09d}"


def iter_source(
    source: str | os.PathLike, transform: Callable | dict, n: int | None, seed: int = 0
) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(key, image tensor, label) for the first `n` images of `source` (all when n is None).

    The images are the ones `quant.data.load_calibration(source, transform, n, seed)` stacks, in
    the same order. Yields fewer than n only when the source holds fewer (callers check the count).
    """
    if n is not None and n < 1:
        raise QuantError(f"number of images must be >= 1, got {n}")
    transform = resolve_transform(transform)
    if transform is None:
        raise QuantError("a transform (or a data config dict) is needed to turn images into tensors")
    source = str(source)
    if source_kind(source) == "pool":
        for i, sample in enumerate(iter_samples(source)):
            if n is not None and i >= n:
                return
            if "cls" not in sample:
                raise QuantError(f"sample {sample['__key__']} in {sample['__url__']} has no .cls label")
            yield sample["__key__"], transform(sample["image"]), sample["cls"]
        return
    dataset = open_dataset(source, transform)
    count = len(dataset)
    if n is None:
        indices = range(count)
    else:
        if count < n:
            raise QuantError(f"asked for {n} images but {source} has only {count}")
        indices = np.random.default_rng(seed).choice(count, n, replace=False)
    for i in indices:
        image, label = dataset[int(i)]
        yield _item_key(dataset, int(i)), image, int(label)


def collect(
    source: str | os.PathLike, transform: Callable | dict, n: int | None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`iter_source` gathered into (images float32 N,C,H,W, labels int64 N, keys); exactly n or an error."""
    images: np.ndarray | None = None
    labels: list[int] = []
    keys: list[str] = []
    chunks: list[np.ndarray] = []
    for i, (key, image, label) in enumerate(iter_source(source, transform, n, seed)):
        arr = np.asarray(image, dtype=np.float32)
        if n is not None:
            if images is None:  # one allocation for the whole dump: no list of copies to stack
                images = np.empty((n, *arr.shape), dtype=np.float32)
            if arr.shape != images.shape[1:]:
                raise QuantError(f"image {key} has shape {arr.shape}, the first had {images.shape[1:]}")
            images[i] = arr
        else:
            chunks.append(arr)
        labels.append(label)
        keys.append(key)
    if n is not None and len(keys) < n:
        raise QuantError(f"asked for {n} images but {source} has only {len(keys)}")
    if not keys:
        raise QuantError(f"{source} holds no images")
    if images is None:
        shapes = {c.shape for c in chunks}
        if len(shapes) > 1:
            raise QuantError(
                f"images of {source} have different shapes {sorted(shapes)}: set a transform that crops"
            )
        images = np.stack(chunks)
    return images, np.asarray(labels, dtype=np.int64), keys


def _sidecars(path: Path) -> tuple[Path, Path]:
    stem = path.with_suffix("")
    return stem.with_name(stem.name + ".labels.npy"), stem.with_name(stem.name + ".keys.txt")


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def dump_tensors(
    source: str | os.PathLike,
    transform: Callable | dict,
    n: int | None,
    out_path: str | os.PathLike,
    seed: int = 0,
) -> list[Path]:
    """Write the first `n` preprocessed images of `source` (see `iter_source`) to `out_path`.

    `transform` maps a PIL image to a (C, H, W) tensor (e.g. `quant.data.build_transform(cfg)`), or
    is the data config dict itself. The suffix of `out_path` picks the layout (module docstring):
    `.npy` (+ `.labels.npy`, `.keys.txt` beside it), `.npz` or `.pt`. Returns the files written.
    """
    path = Path(out_path)
    if path.suffix not in SUFFIXES:
        raise QuantError(f"cannot dump to {path}: the suffix must be one of {', '.join(SUFFIXES)}")
    images, labels, keys = collect(source, transform, n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        labels_path, keys_path = _sidecars(path)
        _atomic(path, lambda p: np.save(p, images))
        _atomic(labels_path, lambda p: np.save(p, labels))
        _atomic(keys_path, lambda p: Path(p).write_text("".join(k + "\n" for k in keys)))
        return [path, labels_path, keys_path]
    if path.suffix == ".npz":
        _atomic(path, lambda p: np.savez(p, images=images, labels=labels, keys=np.asarray(keys, dtype=str)))
        return [path]
    blob = {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels), "keys": keys}
    _atomic(path, lambda p: torch.save(blob, p))
    return [path]


def load_tensors(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a dump written by `dump_tensors` back as (images, labels, keys), whatever its layout."""
    path = Path(path)
    if not path.is_file():
        raise QuantError(f"dump {path} does not exist")
    if path.suffix == ".npy":
        labels_path, keys_path = _sidecars(path)
        keys = keys_path.read_text().splitlines() if keys_path.is_file() else []
        return np.load(path), np.load(labels_path), keys
    if path.suffix == ".npz":
        with np.load(path) as z:
            return z["images"], z["labels"], [str(k) for k in z["keys"]]
    if path.suffix == ".pt":
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return blob["images"].numpy(), blob["labels"].numpy(), list(blob["keys"])
    raise QuantError(f"cannot read {path}: the suffix must be one of {', '.join(SUFFIXES)}")
