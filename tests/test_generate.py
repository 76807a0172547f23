"""End to end on Ray (2 CPU actors, tiny preset): the pool, crash recovery, resume, determinism, refusals.

One reference pool (`pool_a`, made by the CLI exactly as a user would) anchors every other test: a
run that recovers from a killed worker, a resumed run and a re-run must all reproduce its bytes.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import webdataset as wds

from engine.config import GenerateConfig
from engine.diffusion import DiffusionGenerator
from engine.driver import generate
from engine.errors import EngineError, GenerationError
from engine.lock import LOCK_NAME, PoolLock
from engine.prompts import load_vocab, make_prompt, noise_seed
from engine.worker import ShardWorker
from engine.writer import file_sha256
from launch.cli import main

JSON_FIELDS = {
    "format_version", "index", "key", "generator", "model", "prompt", "negative_prompt", "class_ids",
    "class_names", "vocab", "k", "pairing", "seed", "run_seed", "scheduler", "steps", "guidance", "width",
    "height", "rejected",
}  # fmt: skip
N, SHARD = 64, 16


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """In-process generation on one thread, as in a CPU actor: on a busy 2-core runner, two OpenMP
    threads spin against each other and a tiny pipeline call slows down 20-50x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(out, **kw) -> GenerateConfig:
    """The API twin of the CLI command that made `pool_a`."""
    return GenerateConfig(
        out=str(out),
        **{"preset": "tiny", "num_images": N, "shard_size": SHARD, "workers": 2, "progress": False, **kw},
    )


def manifest_of(out) -> dict:
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def shard_hashes(out) -> dict[str, str]:
    """sha256 of every committed shard, computed from the files (not trusted from the manifest)."""
    return {e["url"]: file_sha256(os.path.join(out, e["url"])) for e in manifest_of(out)["shardlist"]}


def read_pool(out) -> list[dict]:
    urls = [os.path.join(out, e["url"]) for e in manifest_of(out)["shardlist"]]
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))


def dir_state(out) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in os.scandir(out)}


@pytest.fixture(scope="module")
def pool_a(ray_local, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("gen") / "pool_a")
    argv = [
        "generate",
        "--preset",
        "tiny",
        "--num-images",
        str(N),
        "--shard-size",
        str(SHARD),
        "--workers",
        "2",
    ]
    assert main([*argv, "--out", out]) == 0
    return out


@pytest.mark.slow
def test_cli_pool_is_complete_readable_and_consistent(pool_a: str) -> None:
    manifest = manifest_of(pool_a)
    assert manifest["complete"] and manifest["num_samples"] == N
    assert [e["url"] for e in manifest["shardlist"]] == [f"shard-{s:06d}.tar" for s in range(4)]
    assert sorted(os.listdir(pool_a)) == ["manifest.json"] + [
        f"shard-{s:06d}.tar" for s in range(4)
    ]  # no lock/temp
    for entry in manifest["shardlist"]:
        path = os.path.join(pool_a, entry["url"])
        assert os.path.getsize(path) == entry["filesize"] and file_sha256(path) == entry["sha256"]
    # the two actors both worked: the first two shards are dispatched at once, one per free actor
    assert len({s["worker"] for s in manifest["stats"]["shards"].values()}) == 2

    samples = read_pool(pool_a)
    assert [s["json"]["index"] for s in samples] == list(range(N))  # every index exactly once, in order
    vocab = load_vocab("imagenet")
    for s in samples:
        meta = s["json"]
        assert set(meta) == JSON_FIELDS
        assert s["__key__"] == meta["key"] == f"s{meta['index']:09d}"
        assert s["png"].size == (32, 32) and s["png"].mode == "RGB"
        assert s["cls"] == meta["class_ids"][0]
        assert len(set(meta["class_ids"])) == meta["k"] == 2
        assert meta["class_names"] == [vocab.names[c] for c in meta["class_ids"]]
        assert meta["prompt"] == make_prompt("a photo of {}", meta["class_names"])
        assert meta["seed"] == noise_seed(0, meta["index"]) and meta["rejected"] == 0
        assert (meta["model"], meta["scheduler"], meta["steps"], meta["guidance"]) == (
            "preset:tiny",
            "PNDMScheduler",
            4,
            3.5,
        )
        assert np.asarray(s["png"]).std() > 0


@pytest.mark.slow
def test_killed_worker_is_replaced_and_bytes_match_a_clean_run(pool_a: str, tmp_path) -> None:
    """Shard 1's first actor SIGKILLs itself mid-write; the driver requeues it on a new actor.

    Equal shard hashes prove both determinism (same seed -> same bytes, across actors) and that the
    recovered pool has every index exactly once.
    """
    out = str(tmp_path / "pool")
    summary = generate(tiny_cfg(out, fault_shard=1))
    assert summary["complete"] and summary["actor_restarts"] == 1
    assert shard_hashes(out) == shard_hashes(pool_a)
    assert [s["json"]["index"] for s in read_pool(out)] == list(range(N))
    assert not [n for n in os.listdir(out) if ".tmp-" in n or n == LOCK_NAME]


@pytest.mark.slow
def test_run_that_dies_then_resumes_over_leftovers_to_the_same_pool(pool_a: str, tmp_path) -> None:
    """A run whose worker dies with no replacement left fails; damage the partial pool the ways a
    crash or a careless user can (truncated shard, stray temp file, unlisted tar); re-running the
    same command redoes exactly what is missing and reproduces the reference bytes."""
    out = str(tmp_path / "pool")
    with pytest.raises(GenerationError, match="re-run"):
        # shard 3 goes out last and its worker dies; the driver lets the in-flight shard finish
        generate(tiny_cfg(out, fault_shard=3, max_actor_restarts=0))
    partial = manifest_of(out)
    assert [e["shard"] for e in partial["shardlist"]] == [0, 1, 2] and not partial["complete"]
    assert not [
        n for n in os.listdir(out) if ".tmp-" in n or n == LOCK_NAME
    ]  # the killed writer's temp is gone

    with open(os.path.join(out, "shard-000001.tar"), "r+b") as f:  # listed but truncated
        f.truncate(1000)
    with open(os.path.join(out, "shard-000002.tar.tmp-deadbeef"), "wb") as f:  # a crashed writer's temp
        f.write(b"\0" * 700)
    shutil.copy(os.path.join(out, "shard-000000.tar"), os.path.join(out, "shard-000003.tar"))  # unlisted
    before = dir_state(out)

    summary = generate(tiny_cfg(out))
    assert (summary["complete"], summary["shards_skipped"], summary["shards_written"]) == (True, 2, 2)
    assert shard_hashes(out) == shard_hashes(pool_a)
    assert [s["json"]["index"] for s in read_pool(out)] == list(range(N))
    after = dir_state(out)
    for name in ("shard-000000.tar", "shard-000002.tar"):  # committed shards are not rewritten
        assert after[name] == before[name]
    assert sorted(after) == ["manifest.json"] + [f"shard-{s:06d}.tar" for s in range(4)]


def test_second_driver_on_the_same_dir_refuses(tmp_path) -> None:
    out = tmp_path / "pool"
    out.mkdir()
    with PoolLock(str(out)), pytest.raises(EngineError, match=f"another dfq generate is running on {out}"):
        generate(tiny_cfg(out))


def test_mismatched_resume_is_refused_and_writes_nothing(tmp_path) -> None:
    out = tmp_path / "pool"
    out.mkdir()
    cfg = tiny_cfg(out).resolved()
    from engine.manifest import new_manifest, save_manifest

    save_manifest(str(out), new_manifest(cfg))
    before = dir_state(out), (out / "manifest.json").read_bytes()
    with pytest.raises(EngineError, match="seed: 0 -> 1"):
        generate(tiny_cfg(out, seed=1))
    assert (dir_state(out), (out / "manifest.json").read_bytes()) == before


@pytest.mark.parametrize(
    ("changes", "needle"),
    [({"num_images": 0}, "num-images"), ({"k": 1001}, "k=1001"), ({"vocab": "missing.txt"}, "missing.txt")],
)
def test_bad_requests_write_nothing(tmp_path, changes: dict, needle: str) -> None:
    out = tmp_path / "pool"
    with pytest.raises(EngineError, match=needle):
        generate(tiny_cfg(out, **changes))
    assert not out.exists()


def test_unwritable_output_is_refused(tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(EngineError, match="not a directory"):
        generate(tiny_cfg(blocker))
    with pytest.raises(EngineError, match="not writable"):
        generate(tiny_cfg(blocker / "pool"))


class _FlakyGenerator(DiffusionGenerator):
    """Index 3's first image is NaN and index 5's first two are blank: both must be regenerated."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bad = {noise_seed(0, 3, 0): "nan", noise_seed(0, 5, 0): "blank", noise_seed(0, 5, 1): "blank"}

    def denoise(self, prompts, seeds):
        images = super().denoise(prompts, seeds)
        for j, seed in enumerate(seeds):
            if self.bad.get(seed) == "nan":
                images[j][0, 0, 0] = np.nan
            elif self.bad.get(seed) == "blank":
                images[j][:] = 0.0
        return images


def test_unusable_images_are_regenerated_with_derived_seeds(tiny_pipeline, tmp_path) -> None:
    cfg = tiny_cfg(tmp_path, num_images=8, shard_size=8, batch_size=4).resolved()
    result = ShardWorker(cfg, generator=_FlakyGenerator(cfg, pipe=tiny_pipeline)).run_unit(0)
    assert result["rejected"] == 3
    metas = {
        s["json"]["index"]: s["json"]
        for s in wds.WebDataset(str(tmp_path / result["url"]), shardshuffle=False).decode("pil")
    }
    assert (metas[3]["rejected"], metas[3]["seed"]) == (1, noise_seed(0, 3, 1))
    assert (metas[5]["rejected"], metas[5]["seed"]) == (2, noise_seed(0, 5, 2))
    assert all(metas[i]["rejected"] == 0 and metas[i]["seed"] == noise_seed(0, i) for i in (0, 1, 2, 4, 6, 7))

    fewer_retries = dataclass_replace(cfg, settings=dataclass_replace(cfg.settings, max_retries=1))
    always_bad = _FlakyGenerator(fewer_retries, pipe=tiny_pipeline)
    with pytest.raises(GenerationError, match="sample 5"):
        always_bad.generate([5])


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_local_model_dir_with_scheduler_swap_and_similar_pairing(tiny_pipeline, tmp_path) -> None:
    """The from_pretrained path (a local diffusers folder), a scheduler alias, and similarity pairing
    whose matrix is prepared once (as the driver does) and handed to the worker as its context."""
    from engine.generators import prepare_context
    from engine.prompts import rank_by_similarity

    model_dir = tmp_path / "tiny-sd"
    tiny_pipeline.save_pretrained(str(model_dir))
    cfg = GenerateConfig(
        out=str(tmp_path), model=str(model_dir), vocab="cifar10", pairing="similar", num_images=4, shard_size=4,
        image_format="webp",
        settings={"size": (32, 32), "steps": 2, "scheduler": "ddim", "negative_prompt": "blurry"},
    ).resolved()  # fmt: skip
    context = prepare_context(cfg)
    assert context["similarity"].shape == (10, 10)
    result = ShardWorker(cfg, context).run_unit(0)
    ranked = rank_by_similarity(context["similarity"])
    samples = list(wds.WebDataset(str(tmp_path / result["url"]), shardshuffle=False).decode("pil"))
    assert len(samples) == 4
    for s in samples:
        meta = s["json"]
        assert s["webp"].size == (32, 32) and meta["scheduler"] == "DDIMScheduler"
        assert meta["model"] == str(model_dir) and meta["negative_prompt"] == "blurry"
        first, second = meta["class_ids"]
        assert second in ranked[first][:5]  # among the 5 nearest classes (default_neighbours(10, 2))
    assert type(tiny_pipeline.scheduler).__name__ == "PNDMScheduler"  # the shared fixture was not mutated
