"""quant.dump: a pool (or any image source) to .npy / .npz / .pt and back, in the calibration order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quant.data import build_transform, load_calibration
from quant.dump import dump_tensors, iter_source, load_tensors
from quant.errors import QuantError

try:  # the hand-written pool fixture lives beside the reader tests
    from test_reader import write_pool
except ImportError:  # tests/ made a package
    from .test_reader import write_pool

IDENT_CFG = {"input_size": (3, 8, 8), "mean": (0, 0, 0), "std": (1, 1, 1), "crop_pct": 1.0}


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    return write_pool(tmp_path / "pool", num_samples=10, shard_size=4)


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt"])
def test_round_trip(pool: Path, tmp_path: Path, suffix: str) -> None:
    tf = build_transform(IDENT_CFG)
    out = tmp_path / "dump" / f"calib{suffix}"
    written = dump_tensors(str(pool), tf, 6, out)
    assert written[0] == out and all(p.is_file() for p in written)
    if suffix == ".npy":
        assert [p.name for p in written] == ["calib.npy", "calib.labels.npy", "calib.keys.txt"]
        assert np.load(out).dtype == np.float32  # a plain array any tool can np.load
    images, labels, keys = load_tensors(out)
    assert images.dtype == np.float32 and images.shape == (6, 3, 8, 8)
    assert labels.dtype == np.int64 and labels.tolist() == list(range(6))
    assert keys == [f"s{i:09d}" for i in range(6)]
    # exactly the tensors the PyTorch quantizer calibrates on, in the same order
    np.testing.assert_array_equal(images, load_calibration(str(pool), tf, 6).numpy())
    if suffix == ".pt":
        blob = torch.load(out, weights_only=True)
        assert set(blob) == {"images", "labels", "keys"} and blob["images"].dtype == torch.float32
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_data_config_as_transform_and_all_images(pool: Path, tmp_path: Path) -> None:
    out = dump_tensors(str(pool), IDENT_CFG, None, tmp_path / "all.npz")[0]
    images, labels, _ = load_tensors(out)
    assert images.shape == (10, 3, 8, 8) and labels.tolist() == list(range(10))
    assert [round(float(x[0, 0, 0]) * 255) for x in images] == list(range(10))


def test_folder_source_keys_and_seeded_draw(tmp_path: Path) -> None:
    for c, cls in enumerate(["cat", "dog"]):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (10 * c + i,) * 3).save(tmp_path / "folder" / cls / f"{i}.png")
    tf = build_transform(IDENT_CFG)
    triples = list(iter_source(str(tmp_path / "folder"), tf, 4, seed=1))
    assert len({k for k, _, _ in triples}) == 4 and all(k.endswith(".png") for k, _, _ in triples)
    # the same draw as load_calibration makes for a non-pool source
    expect = load_calibration(str(tmp_path / "folder"), tf, 4, seed=1)
    np.testing.assert_array_equal(torch.stack([x for _, x, _ in triples]).numpy(), expect.numpy())


def test_errors(pool: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantError, match="suffix must be one of"):
        dump_tensors(str(pool), IDENT_CFG, 2, tmp_path / "x.csv")
    with pytest.raises(QuantError, match="asked for 11 images but .* has only 10"):
        dump_tensors(str(pool), IDENT_CFG, 11, tmp_path / "x.npy")
    assert not (tmp_path / "x.npy").exists()
    with pytest.raises(QuantError, match="needed"):
        dump_tensors(str(pool), None, 2, tmp_path / "x.npy")
