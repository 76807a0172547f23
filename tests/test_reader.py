"""quant.reader against tiny pools written here by hand from SHARDS.md (never by `engine`):
the reader must keep the contract on its own, whoever wrote the pool."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quant.errors import QuantError
from quant.reader import (
    ReadStats,
    calibration_dataset,
    calibration_loader,
    iter_calibration,
    iter_samples,
    read_manifest,
    shard_urls,
)


def _png(index: int, size: int = 8) -> bytes:
    """A distinct image per index (its value encodes the index), so order is checkable."""
    arr = np.full((size, size, 3), index % 256, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0, 0, "dfq", "dfq"
    tar.addfile(info, io.BytesIO(data))


def write_pool(root: Path, num_samples: int = 10, shard_size: int = 5, num_classes: int = 10) -> Path:
    """A format-1 pool: manifest.json + shards of <key>.png/.json/.cls, as SHARDS.md specifies."""
    root.mkdir(parents=True, exist_ok=True)
    shardlist = []
    for s, first in enumerate(range(0, num_samples, shard_size)):
        name = f"shard-{s:06d}.tar"
        indices = range(first, min(first + shard_size, num_samples))
        with tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in indices:
                key, cls = f"s{i:09d}", i % num_classes
                meta = {"format_version": 1, "index": i, "key": key, "class_ids": [cls], "k": 1}
                _add(tar, f"{key}.png", _png(i))
                _add(tar, f"{key}.json", json.dumps(meta).encode())
                _add(tar, f"{key}.cls", str(cls).encode())
        data = (root / name).read_bytes()
        shardlist.append(
            {
                "url": name,
                "nsamples": len(indices),
                "filesize": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "shard": s,
                "first_index": first,
            }
        )
    manifest = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "format": "dfq-shards",
        "format_version": 1,
        "name": "tiny",
        "num_samples": num_samples,
        "shard_size": shard_size,
        "prefix": "shard",
        "config": {},
        "config_hash": "0" * 64,
        "shardlist": shardlist,
        "complete": True,
        "stats": {},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _value(t: torch.Tensor) -> int:
    return round(float(t.flatten()[0]) * 255)


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    return write_pool(tmp_path / "pool")


def test_manifest_and_urls(pool: Path) -> None:
    m = read_manifest(str(pool))
    assert m["num_samples"] == 10 and len(m["shardlist"]) == 2
    assert read_manifest(str(pool / "manifest.json"))["name"] == "tiny"
    assert [Path(u).name for u in shard_urls(str(pool), verify="sha256")] == [
        "shard-000000.tar",
        "shard-000001.tar",
    ]


def test_not_a_pool(tmp_path: Path) -> None:
    with pytest.raises(QuantError, match="no manifest.json in .*not a dfq pool"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(QuantError, match="not a dfq pool manifest"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "dfq-shards", "format_version": 9}))
    with pytest.raises(QuantError, match="format_version 9"):
        read_manifest(str(tmp_path))


def test_samples_decoded_in_manifest_order(pool: Path) -> None:
    samples = list(iter_samples(str(pool)))
    assert [s["json"]["index"] for s in samples] == list(range(10))
    s = samples[3]
    assert s["__key__"] == "s000000003" and s["cls"] == 3
    assert s["image"].mode == "RGB" and s["image"].getpixel((0, 0)) == (3, 3, 3)


def test_unlisted_tar_is_ignored(pool: Path) -> None:
    """A committed-looking tar missing from the manifest is a crash leftover: never read."""
    extra = write_pool(pool.parent / "other", num_samples=15, shard_size=5)
    (pool / "shard-000002.tar").write_bytes((extra / "shard-000002.tar").read_bytes())
    (pool / "shard-000003.tar.tmp-abc").write_bytes(b"garbage")
    assert len(shard_urls(str(pool))) == 2
    assert len(list(iter_samples(str(pool)))) == 10


def test_size_and_sha256_verification(pool: Path) -> None:
    shard = pool / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    assert len(shard_urls(str(pool), verify="size")) == 2
    with pytest.raises(QuantError, match="shard-000001.tar sha256"):
        shard_urls(str(pool), verify="sha256")
    shard.write_bytes(bytes(data[:-512]))
    with pytest.raises(QuantError, match="shard-000001.tar has .* bytes but the manifest says"):
        shard_urls(str(pool))
    assert len(shard_urls(str(pool), verify="none")) == 2
    shard.unlink()
    with pytest.raises(QuantError, match="shard-000001.tar is listed in the manifest but missing"):
        shard_urls(str(pool), verify="none")
    with pytest.raises(QuantError, match="verify must be"):
        shard_urls(str(pool), verify="md5")


def _corrupt_one_png(pool: Path) -> None:
    """Rewrite shard 0 with sample 2's PNG replaced by junk, and fix the manifest to match."""
    src = pool / "shard-000000.tar"
    buf = io.BytesIO()
    with tarfile.open(src) as old, tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as new:
        for m in old.getmembers():
            data = old.extractfile(m).read()
            _add(new, m.name, b"not a png" if m.name == "s000000002.png" else data)
    src.write_bytes(buf.getvalue())
    manifest = json.loads((pool / "manifest.json").read_text())
    manifest["shardlist"][0]["filesize"] = len(buf.getvalue())
    manifest["shardlist"][0]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (pool / "manifest.json").write_text(json.dumps(manifest))


def test_corrupt_sample_raise_or_skip(pool: Path) -> None:
    _corrupt_one_png(pool)
    with pytest.raises(QuantError, match="corrupt sample s000000002"):
        list(iter_samples(str(pool)))
    stats = ReadStats()
    samples = list(iter_samples(str(pool), verify="sha256", on_error="skip", stats=stats))
    assert [s["json"]["index"] for s in samples] == [0, 1, 3, 4, 5, 6, 7, 8, 9]
    assert stats.skipped == 1 and stats.samples == 9 and "s000000002" in stats.errors[0]
    with pytest.raises(QuantError, match="on_error"):
        list(iter_samples(str(pool), on_error="ignore"))


def _ident(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)


def test_iter_calibration_first_n_deterministic(pool: Path) -> None:
    urls = shard_urls(str(pool))
    first = [(_value(x), y) for x, y in iter_calibration(urls, _ident, 7)]
    assert first == [(i, i) for i in range(7)]
    assert first == [(_value(x), y) for x, y in iter_calibration(str(pool), _ident, 7)]
    assert len(list(iter_calibration(urls, _ident, 100))) == 10


def test_calibration_dataset_and_loader(pool: Path) -> None:
    ds = calibration_dataset(str(pool), _ident, n=7)
    assert len(ds) == 7
    assert [_value(x) for x, _ in ds] == list(range(7))
    loader = calibration_loader(str(pool), _ident, n=7, batch_size=4)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [4, 3]
    assert batches[1][1].tolist() == [4, 5, 6]


def test_loader_workers_see_each_sample_once(pool: Path) -> None:
    loader = calibration_loader(str(pool), _ident, n=None, batch_size=3, num_workers=2)
    labels = sorted(int(v) for _, y in loader for v in y)
    assert labels == sorted(i % 10 for i in range(10))


def test_split_by_node_without_distributed(pool: Path) -> None:
    """Outside torch.distributed, node splitting is a no-op (one node gets everything)."""
    ds = calibration_dataset(str(pool), _ident, n=None, split_by_node=True)
    assert len(list(ds)) == 10


def test_fsspec_url_pool(pool: Path) -> None:
    assert len(list(iter_samples(f"file://{pool}"))) == 10


def test_bad_pool_fails_at_call_not_first_next(tmp_path: Path) -> None:
    with pytest.raises(QuantError, match="not a dfq pool"):
        iter_samples(str(tmp_path))
    with pytest.raises(QuantError, match="not a dfq pool"):
        iter_calibration(str(tmp_path), _ident, 3)
