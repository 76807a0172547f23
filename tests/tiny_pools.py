"""Tiny calibration pools and a tiny CNN, built in code, for the tests of the tool adapters.

`write_image_pool` writes a format-1 pool (SHARDS.md) by hand, so these tests do not depend on the
engine; `tiny_cnn` is a random conv-bn-relu network with BN statistics from a few batches.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0, 0, "dfq", "dfq"
    tar.addfile(info, io.BytesIO(data))


def write_image_pool(root: Path, num_samples: int = 48, shard_size: int = 20, size: int = 16) -> Path:
    """A format-1 pool of smooth random images (4x4 noise upsampled), so ranges look like photos'."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    shardlist = []
    for s, first in enumerate(range(0, num_samples, shard_size)):
        name, indices = f"shard-{s:06d}.tar", range(first, min(first + shard_size, num_samples))
        with tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in indices:
                key, cls = f"s{i:09d}", i % 10
                small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
                buf = io.BytesIO()
                small.resize((size, size), Image.BILINEAR).save(buf, format="PNG")
                meta = {"format_version": 1, "index": i, "key": key, "class_ids": [cls], "k": 1}
                _add(tar, f"{key}.png", buf.getvalue())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
                _add(tar, f"{key}.cls", str(cls).encode())
        data = (root / name).read_bytes()
        shardlist.append(
            {"url": name, "nsamples": len(indices), "filesize": len(data),
             "sha256": hashlib.sha256(data).hexdigest(), "shard": s, "first_index": first}
        )  # fmt: skip
    manifest = {
        "__kind__": "wids-shard-index-v1", "wids_version": 1, "format": "dfq-shards", "format_version": 1,
        "name": "images", "num_samples": num_samples, "shard_size": shard_size, "prefix": "shard",
        "config": {}, "config_hash": "0" * 64, "shardlist": shardlist, "complete": True, "stats": {},
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def tiny_cnn() -> nn.Module:
    """conv-bn-relu x3, pool, linear: random weights, BN statistics from a few batches."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 16, 16))
    return model.eval()
