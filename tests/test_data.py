"""quant.data: transforms and every image source kind, on tiny fixtures built in tmp dirs."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quant.data import (
    CIFAR10_CLASSES,
    augment_calibration,
    build_transform,
    iter_labelled,
    load_calibration,
    noise_calibration,
    open_dataset,
    source_kind,
)
from quant.errors import QuantError

try:  # the hand-written pool fixture lives beside the reader tests
    from test_reader import write_pool
except ImportError:  # tests/ made a package
    from .test_reader import write_pool

CIFAR_CFG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 1.0}
IDENT_CFG = {"input_size": (3, 8, 8), "mean": (0, 0, 0), "std": (1, 1, 1), "crop_pct": 1.0}


def _jpeg_bytes(value: int, size: int = 8, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _value(t: torch.Tensor) -> int:
    return round(float(t.flatten()[0]) * 255)


def test_small_transform_is_exact_and_resizes_when_needed() -> None:
    tf = build_transform(CIFAR_CFG)
    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = tf(Image.fromarray(arr))
    expect = (torch.from_numpy(arr).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert out.shape == (3, 32, 32) and torch.allclose(out, expect)
    assert tf(Image.new("RGB", (40, 64))).shape == (3, 32, 32)


def test_imagenet_transform_resizes_then_crops() -> None:
    tf = build_transform({"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bilinear"})
    step_sizes = [getattr(t, "size", None) for t in tf.transforms[:2]]
    assert step_sizes == [256, (224, 224)]
    assert tf(Image.new("RGB", (300, 500))).shape == (3, 224, 224)
    with pytest.raises(QuantError, match="interpolation 'cubic'"):
        build_transform({"interpolation": "cubic"})


def test_pool_source(tmp_path: Path) -> None:
    pool = write_pool(tmp_path / "pool", num_samples=10, shard_size=4)
    assert source_kind(str(pool)) == "pool"
    tf = build_transform(IDENT_CFG)
    assert [(_value(x), y) for x, y in open_dataset(str(pool), tf)] == [(i, i) for i in range(10)]
    calib = load_calibration(str(pool), tf, 6)
    assert calib.shape == (6, 3, 8, 8) and [_value(x) for x in calib] == list(range(6))
    with pytest.raises(QuantError, match=f"asked for 11 calibration images but {pool} has only 10"):
        load_calibration(str(pool), tf, 11)


def test_folder_source(tmp_path: Path) -> None:
    for c, cls in enumerate(["dog", "cat"]):
        (tmp_path / cls).mkdir()
        for i in range(3):
            (tmp_path / cls / f"{i}.png").write_bytes(_jpeg_bytes(10 * c + i))
    assert source_kind(str(tmp_path)) == "folder"
    ds = open_dataset(str(tmp_path), build_transform(IDENT_CFG))
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    assert [(_value(x), y) for x, y in ds][:2] == [(10, 0), (11, 0)]


def _write_tar(path: Path, classes: list[str], per_class: int) -> None:
    with tarfile.open(path, "w") as tar:
        for c, cls in enumerate(classes):
            for i in reversed(range(per_class)):  # stored out of order on purpose
                data = _jpeg_bytes(20 * c + i)
                info = tarfile.TarInfo(f"test/{cls}/{i:04d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("README")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))


def test_tar_source_cifar_order(tmp_path: Path) -> None:
    path = tmp_path / "cifar.tar"
    shuffled = list(reversed(CIFAR10_CLASSES))
    _write_tar(path, shuffled, 2)
    assert source_kind(str(path)) == "tar"
    ds = open_dataset(str(path), build_transform(IDENT_CFG))
    assert len(ds) == 20 and ds.classes == list(CIFAR10_CLASSES)
    got = [(_value(x), y) for x, y in (ds[i] for i in range(len(ds)))]
    # class c of CIFAR order was written as position 9 - c, pixel value 20 * (9 - c) + i
    assert got[:4] == [(180, 0), (181, 0), (160, 1), (161, 1)]


def test_tar_source_sorted_names(tmp_path: Path) -> None:
    path = tmp_path / "x.tar"
    _write_tar(path, ["zebra", "ant"], 12)
    ds = open_dataset(str(path), None)
    assert ds.classes == ["ant", "zebra"] and ds.targets[:12] == [0] * 12
    assert [m[0] for m in ds.members[:3]] == ["test/ant/0000.png", "test/ant/0001.png", "test/ant/0002.png"]
    calib = load_calibration(str(path), build_transform(IDENT_CFG), 5, seed=3)
    again = load_calibration(str(path), build_transform(IDENT_CFG), 5, seed=3)
    assert torch.equal(calib, again)
    with pytest.raises(QuantError, match="asked for 25 calibration images but .* has only 24"):
        load_calibration(str(path), build_transform(IDENT_CFG), 25)


def test_iter_labelled_takes_load_calibrations_images_with_labels_and_records(tmp_path: Path) -> None:
    """Pools: the first n with `.cls` and the record; other sources: the same seeded draw as
    `load_calibration`, with the source's labels; asking for more than there are gives them all."""
    tf = build_transform(IDENT_CFG)
    pool = write_pool(tmp_path / "pool", num_samples=10, shard_size=4)
    items = list(iter_labelled(str(pool), tf, 6))
    assert [(_value(x), y, r["index"]) for x, y, r in items] == [(i, i, i) for i in range(6)]
    assert len(list(iter_labelled(str(pool), tf, None))) == 10 == len(list(iter_labelled(str(pool), tf, 50)))

    path = tmp_path / "x.tar"
    _write_tar(path, ["zebra", "ant"], 12)
    drawn = list(iter_labelled(str(path), tf, 5, seed=3))
    assert torch.equal(torch.stack([x for x, _, _ in drawn]), load_calibration(str(path), tf, 5, seed=3))
    assert all(r is None and y == (0 if _value(x) >= 20 else 1) for x, y, r in drawn)  # zebra = 20 + i
    everything = list(iter_labelled(str(path), tf, 100, seed=3))
    assert sorted(_value(x) for x, _, _ in everything) == sorted([*range(12), *range(20, 32)])
    with pytest.raises(QuantError, match="must be >= 1"):
        next(iter_labelled(str(path), tf, 0))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_npz_source(tmp_path: Path, layout: str) -> None:
    images = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((1, 3, 8, 8), dtype=np.uint8)
    if layout == "nhwc":
        images = images.transpose(0, 2, 3, 1)
    path = tmp_path / "d.npz"
    np.savez(path, images=images, labels=np.array([4, 3, 2, 1, 0]))
    assert source_kind(str(path)) == "npz"
    ds = open_dataset(str(path), build_transform(IDENT_CFG))
    assert [(_value(x), y) for x, y in (ds[i] for i in range(5))] == [(0, 4), (1, 3), (2, 2), (3, 1), (4, 0)]
    np.savez(path, pixels=images)
    with pytest.raises(QuantError, match="needs arrays 'images' and 'labels'"):
        open_dataset(str(path), None)


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(QuantError, match="does not exist"):
        source_kind(str(tmp_path / "nope"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(QuantError, match="cannot read"):
        source_kind(str(tmp_path / "f.txt"))


def test_noise_calibration() -> None:
    a = noise_calibration(4, (3, 16, 16), seed=1)
    assert a.shape == (4, 3, 16, 16) and torch.equal(a, noise_calibration(4, (3, 16, 16), seed=1))
    assert not torch.equal(a, noise_calibration(4, (3, 16, 16), seed=2))
    assert noise_calibration(2, 8).shape == (2, 3, 8, 8)


def test_augmented_copies_are_flipped_shifted_crops_of_their_image() -> None:
    import torch.nn.functional as F

    x = torch.randn(4, 3, 16, 16)
    y = augment_calibration(x, 3, seed=5)
    assert y.shape == (12, 3, 16, 16) and torch.equal(y[:4], x)  # originals first, unchanged
    assert torch.equal(y, augment_calibration(x, 3, seed=5))  # deterministic
    assert not torch.equal(y[4:], augment_calibration(x, 3, seed=6)[4:])
    crops = {}
    for i in range(4):
        for flip in (False, True):
            padded = F.pad((x[i].flip(-1) if flip else x[i])[None], [2] * 4, mode="reflect")[0]
            for dy in range(5):
                for dx in range(5):
                    crops.setdefault(i, []).append(padded[:, dy : dy + 16, dx : dx + 16])
    for j in range(4, 12):
        assert any(torch.equal(y[j], c) for c in crops[j % 4]), j
    assert augment_calibration(x, 1) is x
    with pytest.raises(QuantError, match="augmented copies must be >= 1, got 0"):
        augment_calibration(x, 0)


def test_cutmix_copies_paste_one_box_from_another_copy() -> None:
    x = torch.randn(6, 3, 16, 16)
    plain = augment_calibration(x, 3, seed=2)
    mixed = augment_calibration(x, 3, seed=2, cutmix=0.5)
    assert torch.equal(mixed[:6], x) and torch.equal(mixed, augment_calibration(x, 3, seed=2, cutmix=0.5))
    assert torch.equal(plain, augment_calibration(x, 3, seed=2, cutmix=0.0))  # 0: the plain copies
    changed = 0
    for j in range(6, 18):
        diff = (mixed[j] != plain[j]).any(0)  # pixels taken from the partner
        if diff.any():
            changed += 1
            rows, cols = diff.any(1).nonzero().flatten(), diff.any(0).nonzero().flatten()
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert box <= round(16 * 0.5**0.5) ** 2  # sides sqrt(a) x 16 rounded, a <= 0.5
            sources = [k for k in range(6, 18) if torch.equal(mixed[j][:, diff], plain[k][:, diff])]
            assert sources, j  # the box is another copy's pixels at the same place
    assert changed >= 10  # all but a partner that is the copy itself or a box under half a pixel
    for bad in (1.0, -0.1, True):
        with pytest.raises(QuantError, match="cutmix must be an area fraction"):
            augment_calibration(x, 2, cutmix=bad)


def test_mixup_copies_are_convex_blends_of_two_copies() -> None:
    x = torch.randn(6, 3, 16, 16)
    plain = augment_calibration(x, 3, seed=2)
    mixed = augment_calibration(x, 3, seed=2, mixup=0.4)
    assert torch.equal(mixed[:6], x)  # the originals first and unchanged
    assert torch.equal(mixed, augment_calibration(x, 3, seed=2, mixup=0.4))  # deterministic
    assert not torch.equal(mixed, augment_calibration(x, 3, seed=3, mixup=0.4))
    assert torch.equal(plain, augment_calibration(x, 3, seed=2, mixup=0.0))  # 0: the plain copies
    copies = plain[6:].flatten(1)
    blended = 0
    for j in range(6, 18):
        m = mixed[j].flatten()
        best = None
        for i in range(12):  # m = lam * copies[j] + (1 - lam) * copies[i], lam in [0, 1]
            d = copies[j - 6] - copies[i]
            lam = float((m - copies[i]) @ d / (d @ d)) if d.abs().sum() > 0 else 1.0
            err = float((lam * copies[j - 6] + (1 - lam) * copies[i] - m).abs().max())
            if err < 1e-4 and -1e-6 <= lam <= 1 + 1e-6 and (best is None or err < best[0]):
                best = (err, lam)
        assert best is not None, j  # a convex combination of this copy and another pool copy
        blended += 0.02 < best[1] < 0.98
    assert blended >= 6  # Beta(0.4, 0.4) puts most weights away from 0 and 1, not all
    for bad in (-0.1, float("inf"), float("nan"), True):
        with pytest.raises(QuantError, match="mixup must be a Beta concentration"):
            augment_calibration(x, 2, mixup=bad)
