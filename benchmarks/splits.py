"""The fixed evaluation and calibration splits of the real assets (benchmarks/README.md), as functions of the
assets directory, so every benchmark measures on identical images.

- `cifar10_lossless_eval`: the first 1,017 CIFAR-10 test images, lossless (headline evaluation);
- `cifar10_calibration_files`: 1,024 JPEGs outside that slice, drawn with numpy's default_rng(0);
- `cifar10_jpeg_eval`: the other 7,959 JPEGs (large-n evaluation);
- `imagenet_sample`: one ILSVRC-2012 image per class (1,000).

The assets directory is an argument (default: env var DFQ_ASSETS); nothing here knows where it is.
Run `python -m benchmarks.splits --assets DIR` to check the fp32 anchors benchmarks/README.md lists.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from quant.data import CIFAR10_CLASSES, TarImageDataset

CIFAR_TAR = "cifar10_test_jpeg/cifar10_test_jpeg_YoongiKim.tar"
CIFAR_LOSSLESS = "cifar10_test_lossless/cifar10_test_first1017.npz"
# JPEG files test/<class>/<NNNN>.jpg with NNNN below these (classes in CIFAR-10 order) are the
# lossless slice, checked pixel by pixel.
SLICE_BOUNDS = (105, 93, 100, 104, 92, 87, 114, 102, 110, 110)
N_CALIB, CALIB_SEED = 1024, 0


def assets_dir(assets: str | os.PathLike | None = None) -> Path:
    """The assets directory: the argument, else $DFQ_ASSETS."""
    value = assets if assets is not None else os.environ.get("DFQ_ASSETS")
    if not value:
        raise SystemExit("no assets directory: pass --assets DIR or set DFQ_ASSETS")
    return Path(value)


def cifar10_lossless_eval(assets: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,017 lossless images (uint8, N x 3 x 32 x 32) and their labels."""
    with np.load(Path(assets) / CIFAR_LOSSLESS) as z:
        return torch.from_numpy(z["images"].copy()), torch.from_numpy(z["labels"].astype(np.int64))


def _cifar_jpeg(assets: str | os.PathLike, transform: Callable | None) -> tuple[TarImageDataset, list[int]]:
    """The JPEG tar (ordered by class, then NNNN) and the positions of the files outside the slice."""
    ds = TarImageDataset(str(Path(assets) / CIFAR_TAR), transform)
    if ds.classes != list(CIFAR10_CLASSES) or len(ds) != 10_000:
        raise RuntimeError(f"unexpected CIFAR-10 JPEG tar: {len(ds)} images, classes {ds.classes}")
    outside = [
        i
        for i, ((name, _, _), label) in enumerate(zip(ds.members, ds.targets))
        if int(Path(name).stem) >= SLICE_BOUNDS[label]
    ]
    assert len(outside) == 8983, len(outside)
    return ds, outside


def _calibration_positions(outside: list[int]) -> list[int]:
    draw = np.random.default_rng(CALIB_SEED).choice(len(outside), N_CALIB, replace=False)
    return [outside[int(j)] for j in draw]


def cifar10_calibration_files(assets: str | os.PathLike) -> list[str]:
    """The 1,024 real-image calibration files (tar members `test/<class>/<NNNN>.jpg`), in the drawn order."""
    ds, outside = _cifar_jpeg(assets, None)
    return [ds.members[i][0] for i in _calibration_positions(outside)]


def cifar10_calibration(assets: str | os.PathLike, transform: Callable | None = None) -> Dataset:
    """The same 1,024 images as a dataset of (image, label), in the drawn order."""
    ds, outside = _cifar_jpeg(assets, transform)
    return Subset(ds, _calibration_positions(outside))


def cifar10_jpeg_eval(assets: str | os.PathLike, transform: Callable | None = None) -> Dataset:
    """The 7,959 JPEGs neither in the lossless slice nor in the calibration draw, in (class, NNNN) order."""
    ds, outside = _cifar_jpeg(assets, transform)
    calib = set(_calibration_positions(outside))
    keep = [i for i in outside if i not in calib]
    assert len(keep) == 7959, len(keep)
    return Subset(ds, keep)


class _FileList(Dataset):
    def __init__(self, files: list[Path], labels: list[int], transform: Callable | None) -> None:
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple:
        with Image.open(self.files[i]) as im:
            img = im.convert("RGB")
        return (self.transform(img) if self.transform else img), self.labels[i]


def imagenet_sample(assets: str | os.PathLike, transform: Callable | None = None) -> Dataset:
    """The 1,000-image ImageNet sample, labels from classes.tsv (standard 0..999 order)."""
    root = Path(assets) / "imagenet_sample"
    with open(root / "classes.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    files = [root / "images" / r["file"] for r in rows]
    return _FileList(files, [int(r["index"]) for r in rows], transform)


def main(argv: list[str] | None = None) -> None:
    """Check the fp32 anchors of benchmarks/README.md with this project's loader, transforms and evaluator."""
    from quant.data import ArrayImageDataset, build_transform
    from quant.evaluate import evaluate
    from quant.models import load_model

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--assets", default=None, help="assets directory (default: $DFQ_ASSETS)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    assets = assets_dir(args.assets)

    model, cfg = load_model("cifar_resnet20", str(assets / "cifar10_resnet/resnet20-12fca82f.th"))
    tf = build_transform(cfg)
    images, labels = cifar10_lossless_eval(assets)
    lossless = ArrayImageDataset(images.numpy(), labels.numpy(), tf)
    print("resnet20 lossless-1017", evaluate(model, lossless, num_workers=args.workers, progress=False))
    print(
        "resnet20 jpeg-7959",
        evaluate(model, cifar10_jpeg_eval(assets, tf), num_workers=args.workers, progress=False),
    )

    model, cfg = load_model(
        "mobilenetv1_x0.25", str(assets / "imagenet_mobilenetv1_x0.25/mobilenetV1X0.25_pretrain.tar")
    )
    sample = imagenet_sample(assets, build_transform(cfg))
    print(
        "mobilenetv1_x0.25 imagenet-sample-1000",
        evaluate(model, sample, num_workers=args.workers, progress=False),
    )


if __name__ == "__main__":
    main()
