"""Shard writing (deterministic bytes, atomic commit), manifest (atomic, resume reconcile), pool lock."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from engine.config import GenerateConfig
from engine.errors import EngineError
from engine.lock import LOCK_NAME, PoolLock
from engine.manifest import (
    add_shard,
    check_same_config,
    load_manifest,
    missing_shards,
    new_manifest,
    reconcile,
    save_manifest,
)
from engine.writer import ShardWriter, encode_image, file_sha256


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8))


def _write_shard(path: str, n: int = 3, fmt: str = "png") -> tuple[int, str]:
    with ShardWriter(path) as writer:
        for i in range(n):
            meta = {
                "index": i,
                "key": f"s{i:09d}",
                "prompt": f"a photo of a thing {i}",
                "class_ids": [i, i + 1],
            }
            writer.add_sample(f"s{i:09d}", encode_image(_image(i), fmt), fmt, meta, i)
        return writer.commit()


def test_same_samples_give_the_same_bytes(tmp_path) -> None:
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    size_a, sha_a = _write_shard(str(a))
    size_b, sha_b = _write_shard(str(b))
    assert a.read_bytes() == b.read_bytes() and sha_a == sha_b
    assert (
        size_a == a.stat().st_size
        and sha_a == file_sha256(str(a)) == hashlib.sha256(a.read_bytes()).hexdigest()
    )
    with tarfile.open(a) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["s000000000.png", "s000000000.json", "s000000000.cls"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (0, 0, 0, "dfq", "dfq", 0o444)
    }


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_webdataset_reads_a_shard_back(tmp_path, fmt: str) -> None:
    path = tmp_path / "shard-000000.tar"
    _write_shard(str(path), n=4, fmt=fmt)
    samples = list(wds.WebDataset(str(path), shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == [f"s{i:09d}" for i in range(4)]
    for i, s in enumerate(samples):
        assert s[fmt].size == (16, 16) and s["json"]["index"] == i and s["cls"] == i
    assert encode_image(_image(0), fmt) == encode_image(_image(0), fmt)


def test_commit_is_atomic_and_abort_leaves_nothing(tmp_path) -> None:
    final = tmp_path / "shard-000000.tar"
    writer = ShardWriter(str(final))
    writer.add_sample("s000000000", encode_image(_image(0), "png"), "png", {"index": 0}, 0)
    writer.flush_partial()
    temps = [p.name for p in tmp_path.iterdir()]
    assert not final.exists() and len(temps) == 1 and temps[0].startswith("shard-000000.tar.tmp-")
    writer.commit()
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"]

    with pytest.raises(RuntimeError), ShardWriter(str(tmp_path / "shard-000001.tar")) as w:
        w.add_sample("s000000001", b"x", "png", {"index": 1}, 1)
        raise RuntimeError("worker failed mid-shard")
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"]
    with pytest.raises(ValueError, match="dots"), ShardWriter(str(tmp_path / "x.tar")) as w:
        w.add_sample("s.1", b"", "png", {}, 0)
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"]


def _cfg(out: str, **kw) -> GenerateConfig:
    return GenerateConfig(out=out, **{"preset": "tiny", "num_images": 10, "shard_size": 4, **kw}).resolved()


def _entry(out, cfg: GenerateConfig, shard: int) -> dict:
    path = os.path.join(out, cfg.shard_name(shard))
    size, sha = _write_shard(path, n=len(cfg.shard_indices(shard)))
    return {"url": cfg.shard_name(shard), "nsamples": len(cfg.shard_indices(shard)), "filesize": size,
            "sha256": sha, "shard": shard, "first_index": cfg.shard_indices(shard)[0]}  # fmt: skip


def test_manifest_fields_roundtrip_and_completion(tmp_path) -> None:
    out = str(tmp_path)
    cfg = _cfg(out)
    manifest = new_manifest(cfg)
    for key in ("__kind__", "wids_version", "format", "format_version", "name", "num_samples", "shard_size",
                "prefix", "config", "config_hash", "shardlist", "complete", "stats"):  # fmt: skip
        assert key in manifest
    assert manifest["__kind__"] == "wids-shard-index-v1" and manifest["num_samples"] == 10
    for shard in (2, 0):
        add_shard(manifest, _entry(out, cfg, shard), {"rejected": shard, "seconds": 1.0})
    save_manifest(out, manifest)
    assert sorted(os.listdir(out)) == [
        "manifest.json",
        "shard-000000.tar",
        "shard-000002.tar",
    ]  # no temp left
    loaded = load_manifest(out)
    assert [e["shard"] for e in loaded["shardlist"]] == [0, 2] and not loaded["complete"]
    assert (
        missing_shards(loaded) == [1] and loaded["stats"]["rejected"] == 2 and loaded["stats"]["images"] == 6
    )
    add_shard(loaded, _entry(out, cfg, 1))
    assert loaded["complete"] and loaded["stats"]["images"] == 10
    assert set(loaded["shardlist"][0]) == {"url", "nsamples", "filesize", "sha256", "shard", "first_index"}


def test_load_rejects_a_foreign_manifest(tmp_path) -> None:
    assert load_manifest(str(tmp_path)) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"shardlist": []}))
    with pytest.raises(EngineError, match="not a dfq pool"):
        load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(EngineError, match="cannot read"):
        load_manifest(str(tmp_path))


def test_reconcile_keeps_good_shards_and_discards_leftovers(tmp_path) -> None:
    out = str(tmp_path)
    cfg = _cfg(out)
    manifest = new_manifest(cfg)
    for shard in range(3):
        add_shard(manifest, _entry(out, cfg, shard))
    save_manifest(out, manifest)
    before = os.stat(tmp_path / "shard-000000.tar")
    with open(tmp_path / "shard-000001.tar", "r+b") as f:  # truncated: listed, wrong size
        f.truncate(512)
    os.remove(tmp_path / "shard-000002.tar")  # listed, missing
    (tmp_path / "shard-000003.tar.tmp-1a2b").write_bytes(b"partial")  # crash leftover
    (tmp_path / "shard-000004.tar").write_bytes(b"unlisted")  # unlisted: never trusted
    (tmp_path / "notes.txt").write_text("the user's own file")
    todo = reconcile(out, manifest)
    assert todo == [1, 2]
    assert sorted(os.listdir(out)) == ["manifest.json", "notes.txt", "shard-000000.tar"]
    assert [e["shard"] for e in load_manifest(out)["shardlist"]] == [0]
    after = os.stat(tmp_path / "shard-000000.tar")
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_config_mismatch_names_the_difference(tmp_path) -> None:
    manifest = new_manifest(_cfg(str(tmp_path)))
    check_same_config(
        manifest, _cfg(str(tmp_path / "elsewhere"), workers=2, batch_size=1), "pool"
    )  # runtime only
    with pytest.raises(EngineError, match=r"seed: 0 -> 5"):
        check_same_config(manifest, _cfg(str(tmp_path), seed=5), "pool")
    with pytest.raises(EngineError, match=r"num_images: 10 -> 12"):
        check_same_config(manifest, _cfg(str(tmp_path), num_images=12), "pool")
    with pytest.raises(EngineError, match=r"steps: 4 -> 5"):  # a generator setting, named as such
        check_same_config(manifest, _cfg(str(tmp_path), settings={"steps": 5}), "pool")
    edited = {**manifest, "config": {**manifest["config"], "seed": float("inf")}, "config_hash": "0" * 64}
    with pytest.raises(EngineError, match=r"seed: inf -> 0"):
        check_same_config(edited, _cfg(str(tmp_path)), "pool")


def test_lock_refuses_a_second_holder_in_process_and_across_processes(tmp_path) -> None:
    out = str(tmp_path)
    with PoolLock(out):
        assert (tmp_path / LOCK_NAME).exists()
        with pytest.raises(EngineError, match=f"another dfq generate is running on {out}"):
            PoolLock(out).acquire()
        code = (
            "import sys\nfrom engine.lock import PoolLock\nfrom engine.errors import EngineError\n"
            f"try:\n    PoolLock({out!r}).acquire()\nexcept EngineError as e:\n    print(e); sys.exit(3)\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 3 and "another dfq generate is running" in proc.stdout
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text("host 12345\n")  # left by a driver that was SIGKILLed: not held
    with PoolLock(out):  # a stale file or a released lock can be taken again
        pass


def test_fsspec_url_pool_writes_whole_objects_and_reconciles() -> None:
    """Non-local outputs (object stores): the shard object is written whole, then the manifest."""
    import fsspec

    fs = fsspec.filesystem("memory")
    out = "memory://dfq-test-pool"
    if fs.exists("/dfq-test-pool"):
        fs.rm("/dfq-test-pool", recursive=True)
    fs.makedirs("/dfq-test-pool", exist_ok=True)
    cfg = _cfg(out, num_images=4, shard_size=2)
    manifest = new_manifest(cfg)
    with ShardWriter(f"{out}/shard-000000.tar") as writer:
        writer.add_sample("s000000000", encode_image(_image(0), "png"), "png", {"index": 0}, 0)
        assert not fs.exists("/dfq-test-pool/shard-000000.tar")  # nothing visible before commit
        size, sha = writer.commit()
    assert hashlib.sha256(fs.cat_file("/dfq-test-pool/shard-000000.tar")).hexdigest() == sha
    entry = {
        "url": "shard-000000.tar",
        "nsamples": 2,
        "filesize": size,
        "sha256": sha,
        "shard": 0,
        "first_index": 0,
    }
    add_shard(manifest, entry)
    save_manifest(out, manifest)
    fs.pipe_file("/dfq-test-pool/shard-000001.tar", b"unlisted leftover")
    loaded = load_manifest(out)
    assert reconcile(out, loaded) == [1]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/dfq-test-pool", detail=False)) == [
        "manifest.json",
        "shard-000000.tar",
    ]
    fs.rm("/dfq-test-pool", recursive=True)
