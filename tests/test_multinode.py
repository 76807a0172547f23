"""Multi-node on CPU: a real Ray cluster of two nodes on loopback, joined the way a user joins one.

`dfq generate --address auto --out file://...` runs against a `ray.cluster_utils.Cluster` (a head
and a second node, each its own raylet and object store), spreads its CPU actors over both nodes,
loses the second node mid-run (`remove_node` once the first shard is committed), and still finishes
the pool: every index once, every shard's sha256 as listed, the same bytes as an in-process run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time

import pytest
import webdataset as wds

from engine.config import GenerateConfig
from engine.diffusion import DiffusionGenerator
from engine.driver import _actor_plan
from engine.worker import ShardWorker
from engine.writer import file_sha256
from launch.cli import main

N, SHARD = 48, 2  # 24 shards of 2 tiny images: plenty left (for both actors) when the first commits


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """In-process generation on one thread, as in a CPU actor (the same bytes need the same threads)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _manifest(out: str) -> dict | None:
    try:
        with open(os.path.join(out, "manifest.json")) as f:
            return json.load(f)  # replaced atomically: never half-written
    except FileNotFoundError:
        return None


@pytest.fixture
def cluster(monkeypatch):
    """Head (4 CPUs, runs the driver) + node B (1 CPU), under a private RAY_TMPDIR, so `--address
    auto` finds this cluster and no other session's `ray.init()` can stumble on it. With room for
    both actors on the head, Ray's default placement packs them there; only SPREAD uses node B."""
    import ray
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="raymn-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    small = {"object_store_memory": 80 * 1024**2, "include_dashboard": False}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, **small})
    try:
        c.node_b = c.add_node(num_cpus=1, resources={"node_b": 1}, **small)
        c.wait_for_nodes()
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_node_b_after_first_commit(c, out: str, timeout: float = 240.0) -> threading.Thread:
    """Watch the manifest; once the first shard is committed (by either node), take node B away.
    Both actors got a shard when the run started, so node B's actor is busy (or still starting) then,
    and most shards are still to do."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            manifest = _manifest(out)
            if manifest and manifest["shardlist"]:
                c.left_at = len(manifest["shardlist"])
                c.remove_node(c.node_b)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_cluster_run_spreads_over_nodes_and_survives_losing_one(
    cluster, tiny_pipeline, tmp_path, capsys
) -> None:
    out = str(tmp_path / "pool")
    node_b = cluster.node_b.node_id
    watcher = _remove_node_b_after_first_commit(cluster, out)
    argv = ["generate", "--address", "auto", "--preset", "tiny", "--steps", "2", "--size", "16"]
    argv += ["--num-images", str(N), "--shard-size", str(SHARD), "--workers", "2", "--batch-size", "2"]
    assert main([*argv, "--out", f"file://{out}", "--no-progress"]) == 0  # a shared mount, as a URL
    watcher.join(timeout=5)
    printed = capsys.readouterr().out
    assert cluster.node_b not in cluster.worker_nodes, "node B was never removed"
    assert cluster.left_at < N // SHARD  # removed while shards were still to do

    manifest = _manifest(out)
    assert manifest["complete"] and len(manifest["shardlist"]) == N // SHARD
    # SPREAD put one actor on each node (else losing node B would kill no worker); the one on node B
    # died with it mid-shard, and its shard was redone on the head (the other actor, or a replacement)
    restarted = int(re.search(r"\((\d+) restarted\)", printed).group(1))
    assert restarted >= 1 and re.search(r"died on shard \d+ \(its node may have left\)", printed), printed
    nodes = {s["node"] for s in manifest["stats"]["shards"].values()}
    assert cluster.head_node.node_id in nodes and nodes <= {cluster.head_node.node_id, node_b}
    assert sorted(os.listdir(out)) == ["manifest.json"] + [f"shard-{s:06d}.tar" for s in range(N // SHARD)]
    for entry in manifest["shardlist"]:
        assert file_sha256(os.path.join(out, entry["url"])) == entry["sha256"]
    urls = [os.path.join(out, e["url"]) for e in manifest["shardlist"]]
    indices = [s["json"]["index"] for s in wds.WebDataset(urls, shardshuffle=False).decode()]
    assert indices == list(range(N))  # every index exactly once

    # the same config run in-process (no cluster, no node loss) gives the same shard bytes
    cfg = GenerateConfig(out=str(tmp_path / "ref"), preset="tiny", settings={"steps": 2, "size": (16, 16)})
    cfg = _replace(cfg, num_images=N, shard_size=SHARD, batch_size=2).resolved()
    os.makedirs(cfg.out)
    worker = ShardWorker(cfg, generator=DiffusionGenerator(cfg, pipe=tiny_pipeline))
    for entry in manifest["shardlist"][:3]:
        assert worker.run_unit(entry["shard"])["sha256"] == entry["sha256"]


def test_actor_plan_spreads_actors_over_nodes() -> None:
    """Both kinds of actor ask Ray for SPREAD placement: one per GPU across GPU nodes, and CPU
    actors over nodes rather than packed on the first one."""
    cfg = GenerateConfig(out="/x", preset="tiny", workers=3).resolved()
    n, options, device, _ = _actor_plan(cfg, {"CPU": 6.0})
    assert (n, device, options["scheduling_strategy"]) == (3, "cpu", "SPREAD")
    gpu_cfg = GenerateConfig(out="/x", preset="tiny").resolved()
    n, options, device, _ = _actor_plan(gpu_cfg, {"CPU": 64.0, "GPU": 16.0})
    assert (n, device, options["num_gpus"], options["scheduling_strategy"]) == (16, "cuda", 1, "SPREAD")


def _replace(cfg: GenerateConfig, **kw) -> GenerateConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)
