"""Images in, model-ready tensors out: the preprocessing a data config asks for, and every image
source the quantizer accepts (a dfq pool, an ImageFolder, a tar of class folders, an .npz).

Every source yields (tensor, label) through the same `build_transform`, so a CIFAR image from an
.npz and the same image from a JPEG tar go through identical arithmetic.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from .errors import QuantError
from .reader import _manifest_path, calibration_dataset, iter_calibration, iter_samples

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_INTERP = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
}


# ----------------------------------------------------------------------------- transforms


def _size(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    return int(input_size[-2]), int(input_size[-1])


class _ResizeIfNeeded:
    """Small-input path (CIFAR, crop_pct 1): touch pixels only when the image is not already
    the model's size, so lossless 32x32 images reach the model bit-exact."""

    def __init__(self, size: tuple[int, int], interpolation: InterpolationMode) -> None:
        self.size = size
        self.resize = T.Compose([T.Resize(min(size), interpolation=interpolation), T.CenterCrop(size)])

    def __call__(self, img: Image.Image) -> Image.Image:
        if (img.height, img.width) == self.size:
            return img
        return self.resize(img)

    def __repr__(self) -> str:
        return f"ResizeIfNeeded({self.size})"


def build_transform(data_config: dict) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform of a model's data config (timm's eval recipe, written out).

    Inputs of 224 px and up, or crop_pct < 1: resize the short side to int(size / crop_pct),
    center crop, ToTensor, Normalize. Small inputs with crop_pct 1 (CIFAR): resize only if needed.
    """
    h, w = _size(data_config.get("input_size", (3, 224, 224)))
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    interp_name = data_config.get("interpolation") or "bilinear"
    if interp_name not in _INTERP:
        raise QuantError(f"unknown interpolation {interp_name!r}: use one of {', '.join(_INTERP)}")
    interp = _INTERP[interp_name]
    mean = tuple(data_config.get("mean") or IMAGENET_MEAN)
    std = tuple(data_config.get("std") or IMAGENET_STD)
    if min(h, w) >= 224 or crop_pct < 1.0:
        scale = int(min(h, w) / crop_pct)
        geometry: list[Any] = [T.Resize(scale, interpolation=interp), T.CenterCrop((h, w))]
    else:
        geometry = [_ResizeIfNeeded((h, w), interp)]
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(mean, std)])


def input_range(data_config: dict) -> tuple[float, float]:
    """The values a model input can take: pixels in [0, 1] after the config's Normalize, as one
    (lowest, highest) over the channels.

    Why: an input grid fitted on calibration images that never reach some pixel values (a pool
    distilled from BN statistics stays dark: its brightest value is 0.84 where real CIFAR images
    reach 2.13) clips real inputs. The preprocessing states the range without any data.
    """
    mean = data_config.get("mean") or IMAGENET_MEAN
    std = data_config.get("std") or IMAGENET_STD
    lows = [(0.0 - m) / s for m, s in zip(mean, std, strict=True)]
    highs = [(1.0 - m) / s for m, s in zip(mean, std, strict=True)]
    return min(lows), max(highs)


def input_grid_for(choice: str, real_images: bool) -> str:
    """The patch-embedding input grid for a `--input-grid` choice: `calibrated` (fitted to the
    calibration images) or `preprocess` (over `input_range`). `auto`: real images span the input
    range, so their fitted grid is right; pools and noise need not (a distilled pool stays dark),
    so theirs comes from the preprocessing."""
    if choice != "auto":
        return choice
    return "calibrated" if real_images else "preprocess"


# ----------------------------------------------------------------------------- sources


def _class_index(names: Sequence[str]) -> dict[str, int]:
    """Sorted class names -> index; CIFAR-10's standard order when the names are exactly CIFAR-10's
    (it happens to be alphabetical, but the rule is stated so a renamed class cannot shift labels)."""
    if set(names) == set(CIFAR10_CLASSES):
        return {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    return {c: i for i, c in enumerate(sorted(set(names)))}


def _natural_key(name: str) -> tuple:
    """'10.jpg' after '9.jpg': files in numeric order when their names are numbers."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


class TarImageDataset(Dataset):
    """Images in a tar laid out `<anything>/<class>/<file>.<jpg|png|...>`, indexed once, decoded lazily.

    The member table (offset, size) is read in one pass; items are read by seek, with one file
    handle per process so DataLoader workers do not share a file position.
    Order: by (class index, file name in natural order).
    """

    def __init__(self, path: str, transform: Callable | None = None) -> None:
        self.path, self.transform = path, transform
        rows = []
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                parts = m.name.split("/")
                if m.isfile() and len(parts) >= 2 and m.name.lower().endswith(IMAGE_SUFFIXES):
                    rows.append((parts[-2], parts[-1], m.offset_data, m.size, m.name))
        if not rows:
            raise QuantError(f"no images laid out <class>/<file> in tar {path}")
        self.class_to_idx = _class_index([r[0] for r in rows])
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.get)
        rows.sort(key=lambda r: (self.class_to_idx[r[0]], _natural_key(r[1])))
        self.members = [(r[4], r[2], r[3]) for r in rows]  # (member name, offset, size)
        self.targets = [self.class_to_idx[r[0]] for r in rows]
        self._fh: Any = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.members)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fh": None, "_pid": -1}

    def read_bytes(self, i: int) -> bytes:
        if self._pid != os.getpid():
            self._fh, self._pid = open(self.path, "rb"), os.getpid()  # kept open: one handle per process
        _, offset, size = self.members[i]
        self._fh.seek(offset)
        return self._fh.read(size)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        with Image.open(io.BytesIO(self.read_bytes(i))) as im:
            img = im.convert("RGB")
        return (self.transform(img) if self.transform else img), self.targets[i]


class ArrayImageDataset(Dataset):
    """uint8 images (N,3,H,W or N,H,W,3) with labels, each turned into a PIL image so it goes through
    the same transform as a file would."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None = None) -> None:
        if images.ndim != 4 or images.dtype != np.uint8:
            raise QuantError(
                f"images must be uint8 N x 3 x H x W or N x H x W x 3, got {images.dtype} {images.shape}"
            )
        if images.shape[1] == 3 and images.shape[-1] != 3:
            images = images.transpose(0, 2, 3, 1)
        if len(images) != len(labels):
            raise QuantError(f"{len(images)} images but {len(labels)} labels")
        self.images = np.ascontiguousarray(images)
        self.targets = [int(v) for v in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[i], "RGB")
        return (self.transform(img) if self.transform else img), self.targets[i]


def _load_npz(path: str, transform: Callable | None) -> ArrayImageDataset:
    with np.load(path) as z:
        if "images" not in z or "labels" not in z:
            raise QuantError(f"{path} needs arrays 'images' and 'labels', has {', '.join(z.files)}")
        return ArrayImageDataset(z["images"], z["labels"], transform)


def _is_pool(source: str) -> bool:
    if "://" in source:
        import fsspec

        fs, path = fsspec.core.url_to_fs(_manifest_path(source))
        return fs.exists(path)
    return source.endswith("manifest.json") or os.path.isfile(os.path.join(source, "manifest.json"))


def source_kind(source: str) -> str:
    """'pool', 'folder', 'tar' or 'npz': what `open_dataset` will read `source` as."""
    source = str(source)
    if _is_pool(source):
        return "pool"
    if "://" in source:
        raise QuantError(f"no manifest.json at {source}: URLs must be dfq pools")
    if not os.path.exists(source):
        raise QuantError(f"data source {source} does not exist")
    if os.path.isdir(source):
        return "folder"
    if source.endswith(".npz"):
        return "npz"
    if tarfile.is_tarfile(source):
        return "tar"
    raise QuantError(f"cannot read {source}: not a dfq pool, image folder, tar of images or .npz")


def open_dataset(source: str, transform: Callable | None) -> Dataset:
    """(tensor, label) items from `source`, its kind detected (see `source_kind`).

    Pools give an IterableDataset in manifest order (label = `.cls`); the others are indexable.
    """
    kind = source_kind(source)
    if kind == "pool":
        return calibration_dataset(source, transform or (lambda im: im))
    if kind == "folder":
        from torchvision.datasets import ImageFolder

        try:
            return ImageFolder(source, transform=transform)
        except (FileNotFoundError, RuntimeError) as e:  # torchvision: no class folders / no images
            raise QuantError(f"cannot read image folder {source}: {e}") from None
    if kind == "npz":
        return _load_npz(source, transform)
    return TarImageDataset(source, transform)


def load_calibration(source: str, transform: Callable, n: int, seed: int = 0) -> torch.Tensor:
    """n calibration images from `source`, stacked, always the same ones for the same arguments.

    Pools: the first n in manifest order (a pool is already a random draw). Other sources are
    ordered by class, so they get a seeded draw `numpy.random.default_rng(seed).choice(len, n)`.
    """
    if n < 1:
        raise QuantError(f"number of calibration images must be >= 1, got {n}")
    if source_kind(source) == "pool":
        images = [x for x, _ in iter_calibration(source, transform, n)]
        if len(images) < n:
            raise QuantError(f"asked for {n} calibration images but {source} has only {len(images)}")
        return torch.stack(images)
    dataset = open_dataset(source, transform)
    if len(dataset) < n:
        raise QuantError(f"asked for {n} calibration images but {source} has only {len(dataset)}")
    return torch.stack([dataset[int(i)][0] for i in _draw(len(dataset), n, seed)])


def _draw(size: int, n: int, seed: int) -> np.ndarray:
    """The seeded draw of n of `size` indexable items that `load_calibration` takes."""
    return np.random.default_rng(seed).choice(size, n, replace=False)


def iter_labelled(
    source: str, transform: Callable, n: int | None = None, seed: int = 0
) -> Iterator[tuple[torch.Tensor, int, dict | None]]:
    """Up to n (all when None) (image tensor, label, record) items of `source`, one at a time: the
    images `load_calibration` takes for the same n and seed (all of them, drawn in the same way, when
    the source has fewer). The label is a pool sample's `.cls` (-1 if it has none) or the folder's /
    array's label; the record is a pool sample's JSON (SHARDS.md), None for other sources.

    Why: diagnostics read a pool's prompted classes beside its images, and more images than fit in
    memory at once.
    """
    if n is not None and n < 1:
        raise QuantError(f"number of images must be >= 1, got {n}")
    if source_kind(source) == "pool":
        samples = iter_samples(source)
        for sample in samples if n is None else itertools.islice(samples, n):
            yield transform(sample["image"]), int(sample.get("cls", -1)), sample.get("json")
        return
    dataset = open_dataset(source, transform)
    count = len(dataset) if n is None else min(n, len(dataset))
    for i in _draw(len(dataset), count, seed):
        image, label = dataset[int(i)]
        yield image, int(label), None


def training_images(source: str, transform: Callable, n: int, seed: int = 0) -> Dataset:
    """The n images `load_calibration` would stack, as a dataset the distillation methods stream
    (`quant.stream`): a pool's first n in manifest order, read shard by shard, never all at once;
    any other source the same seeded draw."""
    if n < 1:
        raise QuantError(f"number of training images must be >= 1, got {n}")
    if source_kind(source) == "pool":
        dataset = calibration_dataset(source, transform, n)
    else:
        dataset = open_dataset(source, transform)
    if len(dataset) < n:
        raise QuantError(f"asked for {n} training images but {source} has only {len(dataset)}")
    if source_kind(source) == "pool":
        return dataset
    idx = np.random.default_rng(seed).choice(len(dataset), n, replace=False)
    return Subset(dataset, [int(i) for i in idx])


def noise_calibration(n: int, input_size: int | Sequence[int], seed: int = 0) -> torch.Tensor:
    """n standard-normal images in the normalised input space: the no-data baseline."""
    h, w = _size(input_size)
    c = 3 if isinstance(input_size, int) or len(input_size) < 3 else int(input_size[-3])
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g)


def augment_calibration(
    images: torch.Tensor, copies: int, seed: int = 0, cutmix: float = 0.0, mixup: float = 0.0
) -> torch.Tensor:
    """`images` followed by `copies - 1` augmented copies: each image flipped left-right with
    probability 1/2 and shifted by up to 1/8 of its size (reflect padding), per copy and image;
    with `cutmix` > 0, each copy then gets a box pasted from a randomly drawn copy (any copy, itself
    included), of the image's aspect ratio and an area drawn uniformly up to about `cutmix` of the
    image (sides rounded to whole pixels), at a uniform position; with `mixup` = alpha > 0, each
    copy is then blended pixel by pixel with a randomly drawn copy (itself included),
    `lam * copy + (1 - lam) * partner`, lam ~ Beta(alpha, alpha) per copy (Mixup's pixel mixing).

    Why: a small pool (the 256 images BN distillation affords) is seen ~250 times in a 2,000
    iteration block reconstruction at batch 32, and the rounding fits those images' block outputs
    rather than the layer's function. Copies that the float model maps as it would the original
    (the training augmentation of CIFAR and ImageNet classifiers) widen the inputs the block
    outputs are matched on, with no new information and at the same cost per iteration.
    Cut-and-paste mixing (MixMix's data mixing, CutMix's boxes) adds inputs no single image gives;
    it measured neutral, so it is off by default (docs/notes.md). Pixel Mixup is the other mixing
    baseline of the prompt ablation (`dfq bench prompts`): mixing classes at calibration time
    against mixing them in the generator's prompt.
    Deterministic in (`images`, `copies`, `seed`, `cutmix`, `mixup`); the originals come first and
    unchanged, and the copies before the mixing are those of the same call without it.
    """
    if copies < 1:
        raise QuantError(f"augmented copies must be >= 1, got {copies}")
    if isinstance(cutmix, bool) or not isinstance(cutmix, (int, float)) or not 0.0 <= cutmix < 1.0:
        raise QuantError(f"cutmix must be an area fraction in [0, 1), got {cutmix!r}")
    if isinstance(mixup, bool) or not isinstance(mixup, (int, float)) or not 0.0 <= mixup < float("inf"):
        raise QuantError(f"mixup must be a Beta concentration alpha >= 0 (0: off), got {mixup!r}")
    if copies == 1:
        return images
    b, _, h, w = images.shape
    pad_h, pad_w = max(1, h // 8), max(1, w // 8)
    if pad_h >= h or pad_w >= w:
        raise QuantError(f"images of {h}x{w} are too small to shift")
    g = torch.Generator().manual_seed(seed)
    out = [images]
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    for _ in range(copies - 1):
        flip = torch.rand(b, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        padded = torch.nn.functional.pad(x, [pad_w, pad_w, pad_h, pad_h], mode="reflect")
        dy = torch.randint(0, 2 * pad_h + 1, (b,), generator=g).view(b, 1, 1)
        dx = torch.randint(0, 2 * pad_w + 1, (b,), generator=g).view(b, 1, 1)
        index = ((rows + dy) * (w + 2 * pad_w) + cols + dx).view(b, 1, h * w).expand(-1, x.shape[1], -1)
        out.append(torch.gather(padded.flatten(2), 2, index).view_as(x))
    extra = torch.cat(out[1:])
    if cutmix > 0:
        extra = _paste_boxes(extra, cutmix, g)
    if mixup > 0:
        extra = _blend(extra, mixup, g)
    return torch.cat([images, extra])


def _blend(x: torch.Tensor, alpha: float, g: torch.Generator) -> torch.Tensor:
    """Each image of `x` blended with a randomly drawn image of `x` (itself included):
    `lam * x + (1 - lam) * partner`, lam ~ Beta(alpha, alpha) per image (drawn by numpy from a seed
    taken off `g`: torch's Beta sampler takes no generator)."""
    n = x.shape[0]
    partner = x[torch.randint(0, n, (n,), generator=g)]
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=n)).to(x.dtype).view(n, 1, 1, 1)
    return lam * x + (1 - lam) * partner


def _paste_boxes(x: torch.Tensor, max_area: float, g: torch.Generator) -> torch.Tensor:
    """Each image of `x` with the same box of a randomly drawn image of `x` (itself included) pasted in:
    sides sqrt(a) times the image's, a uniform in [0, max_area], sides rounded; uniform position."""
    n, _, h, w = x.shape
    partner = x[torch.randint(0, n, (n,), generator=g)]
    side = (max_area * torch.rand(n, generator=g)).sqrt()
    bh, bw = (side * h).round().long(), (side * w).round().long()
    y0 = (torch.rand(n, generator=g) * (h - bh + 1)).long().clamp_max(h - bh)
    x0 = (torch.rand(n, generator=g) * (w - bw + 1)).long().clamp_max(w - bw)
    ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    inside = (
        (ys >= y0.view(n, 1, 1)) & (ys < (y0 + bh).view(n, 1, 1))
        & (xs >= x0.view(n, 1, 1)) & (xs < (x0 + bw).view(n, 1, 1))
    )  # fmt: skip
    return torch.where(inside.unsqueeze(1), partner, x)
