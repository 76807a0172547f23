"""Pools on fsspec URLs: `file://` behaves as a local path, object stores get whole-object writes.

- `file://` (a shared mount on a cluster): the local path rules, temp name + fsync + rename and the
  `.dfq.lock`; the multi-node test (test_multinode.py) writes its pool through such a URL.
- object stores have no rename: the engine must write each shard object whole, list it in the
  manifest only after that, never show a partial object, and resume by the manifest alone. In
  process: a memory filesystem whose `mv`/copy raise. Across Ray actor processes: `local://`, which
  fsspec serves from the local disk but the engine treats as a remote store (`memory://` is per
  process, so actors cannot share it; that is how the driver's shared-storage check is tested).
"""

from __future__ import annotations

import hashlib
import os

import pytest
import webdataset as wds
from fsspec.implementations.memory import MemoryFileSystem

from engine.config import GenerateConfig
from engine.diffusion import DiffusionGenerator
from engine.driver import generate
from engine.errors import EngineError, GenerationError
from engine.lock import LOCK_NAME, PoolLock
from engine.manifest import (
    add_shard,
    load_manifest,
    new_manifest,
    reconcile,
    remove_temp_files,
    save_manifest,
)
from engine.worker import ShardWorker
from engine.writer import ShardWriter, committed_size, encode_image, is_local


class NoRenameMemoryFS(MemoryFileSystem):
    """An object store in miniature: objects appear whole on close, and there is no rename or copy."""

    protocol = ("dfqobj",)
    store: dict = {}  # its own objects, apart from memory://
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("dfqobj://"))

    def mv(self, *args, **kwargs):
        raise AssertionError("object stores have no rename: the engine must not call mv")

    def cp_file(self, *args, **kwargs):
        raise AssertionError("the engine must not copy objects")


@pytest.fixture
def objstore():
    import fsspec

    fsspec.register_implementation("dfqobj", NoRenameMemoryFS, clobber=True)
    fs = fsspec.filesystem("dfqobj")
    fs.makedirs("/pool", exist_ok=True)
    yield fs, "dfqobj://pool"
    fs.rm("/pool", recursive=True)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """In-process generation on one thread, as in a CPU actor (the same bytes need the same threads)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(out: str, **kw) -> GenerateConfig:
    base = {"preset": "tiny", "settings": {"steps": 2, "size": (16, 16)}, "num_images": 6, "shard_size": 2}
    return GenerateConfig(out=out, **{**base, "batch_size": 2, "workers": 1, "progress": False, **kw})


def _names(fs, path: str) -> list[str]:
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def _png(i: int) -> bytes:
    from PIL import Image

    return encode_image(Image.new("RGB", (8, 8), (i, 2 * i, 3 * i)), "png")


def test_file_urls_are_local_paths_and_object_urls_are_not() -> None:
    assert is_local("/data/pool") and is_local("pool") and is_local("file:///mnt/shared/pool")
    assert not is_local("s3://bucket/pool") and not is_local("gs://bucket/pool")
    assert not is_local("local:///tmp/pool") and not is_local("memory://pool")


def test_file_url_takes_the_local_lock(tmp_path) -> None:
    """`file://` resolves to the directory itself: the same `.dfq.lock` keeps a second driver out."""
    out = tmp_path / "pool"
    out.mkdir()
    with PoolLock(str(out)), pytest.raises(EngineError, match=f"another dfq generate is running on {out}"):
        generate(_cfg(f"file://{out}"))


def test_object_store_shard_is_one_whole_object_then_a_manifest_entry(objstore) -> None:
    fs, out = objstore
    cfg = _cfg(out).resolved()
    with ShardWriter(f"{out}/shard-000000.tar") as writer:
        for i in range(2):
            writer.add_sample(f"s{i:09d}", _png(i), "png", {"index": i}, 0)
            writer.flush_partial()  # a local writer would push bytes to its temp file here
            assert _names(fs, "/pool") == []  # no partial object, no temp object
        size, sha = writer.commit()
    assert committed_size(f"{out}/shard-000000.tar") == size
    assert hashlib.sha256(fs.cat_file("/pool/shard-000000.tar")).hexdigest() == sha

    with pytest.raises(RuntimeError), ShardWriter(f"{out}/shard-000001.tar") as writer:
        writer.add_sample("s000000002", _png(2), "png", {"index": 2}, 0)
        raise RuntimeError("the worker fails mid-shard")
    assert _names(fs, "/pool") == ["shard-000000.tar"]  # an aborted shard leaves nothing behind
    assert committed_size(f"{out}/shard-000001.tar") is None

    manifest = new_manifest(cfg)
    entry = {"url": "shard-000000.tar", "nsamples": 2, "filesize": size, "sha256": sha, "shard": 0}
    add_shard(manifest, {**entry, "first_index": 0})
    save_manifest(out, manifest)  # one put, no temp object renamed over the old one
    assert load_manifest(out)["shardlist"] == manifest["shardlist"]


def test_object_store_resume_trusts_only_the_manifest(objstore) -> None:
    fs, out = objstore
    cfg = _cfg(out).resolved()
    manifest = new_manifest(cfg)
    for shard, data in ((0, b"a" * 100), (1, b"b" * 100)):
        fs.pipe_file(f"/pool/shard-00000{shard}.tar", data)
        add_shard(
            manifest,
            {"url": f"shard-00000{shard}.tar", "nsamples": 2, "filesize": 100, "sha256": "x", "shard": shard}
            | {"first_index": 2 * shard},
        )
    save_manifest(out, manifest)
    fs.pipe_file("/pool/shard-000001.tar", b"b" * 60)  # listed, but the object is not what was listed
    fs.pipe_file("/pool/shard-000002.tar", b"c" * 100)  # an object nobody listed (a driver died)
    fs.pipe_file("/pool/notes.txt", b"the user's")
    loaded = load_manifest(out)
    assert reconcile(out, loaded) == [1, 2]
    remove_temp_files(out, cfg.prefix)
    assert [e["shard"] for e in load_manifest(out)["shardlist"]] == [0]
    assert _names(fs, "/pool") == ["manifest.json", "notes.txt", "shard-000000.tar"]


@pytest.mark.slow
def test_object_store_pool_across_ray_actors_resumes_to_the_same_bytes(
    ray_local, tiny_pipeline, tmp_path
) -> None:
    """`local://` goes through the engine's object-store path with real actor processes: a partial
    pool (one good shard, one listed but damaged, one unlisted object) is finished by a Ray run that
    keeps the good shard untouched, redoes the rest byte-identically, and takes no lock."""
    root = str(tmp_path / "pool")
    out = f"local://{root}"
    cfg = _cfg(out).resolved()
    worker = ShardWorker(cfg, generator=DiffusionGenerator(cfg, pipe=tiny_pipeline))
    manifest = new_manifest(cfg)
    os.makedirs(root)
    entries = [worker.run_unit(s) for s in (0, 1)]
    for entry in entries:
        add_shard(manifest, entry)
    save_manifest(out, manifest)
    assert sorted(os.listdir(root)) == ["manifest.json", "shard-000000.tar", "shard-000001.tar"]  # no temps
    with open(os.path.join(root, "shard-000001.tar"), "r+b") as f:
        f.truncate(1000)
    with open(os.path.join(root, "shard-000002.tar"), "wb") as f:
        f.write(b"\0" * 512)
    before = os.stat(os.path.join(root, "shard-000000.tar"))

    summary = generate(_cfg(out))
    assert (summary["complete"], summary["shards_skipped"], summary["shards_written"]) == (True, 1, 2)
    assert sorted(os.listdir(root)) == ["manifest.json"] + [f"shard-{s:06d}.tar" for s in range(3)]
    assert LOCK_NAME not in os.listdir(root)  # object stores cannot hold a flock
    after = os.stat(os.path.join(root, "shard-000000.tar"))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    final = load_manifest(out)
    assert final["shardlist"][1]["sha256"] == entries[1]["sha256"]  # redone by an actor: same bytes
    for entry in final["shardlist"]:
        with open(os.path.join(root, entry["url"]), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == entry["sha256"]
    urls = [os.path.join(root, e["url"]) for e in final["shardlist"]]
    assert [s["json"]["index"] for s in wds.WebDataset(urls, shardshuffle=False).decode()] == list(range(6))


@pytest.mark.slow
def test_output_the_workers_cannot_share_is_refused_not_listed(ray_local) -> None:
    """`memory://` lives in each process, like a node-local disk on a cluster: the actor's shard is
    invisible to the driver, which must fail loudly instead of listing a shard nobody can read."""
    import fsspec

    out = "memory://dfq-unshared-pool"
    fs = fsspec.filesystem("memory")
    try:
        with pytest.raises(GenerationError, match="storage every node shares"):
            generate(_cfg(out, num_images=2))
        assert load_manifest(out)["shardlist"] == []
    finally:
        if fs.exists("/dfq-unshared-pool"):
            fs.rm("/dfq-unshared-pool", recursive=True)
