"""Pools made before generators had their own settings still read, resume, and refuse other recipes.

`tests/fixtures/legacy_pools/` holds two tiny pools written by the engine of `made_with.json`'s commit
(the flat config layout: bn-distill iterations as `steps`, its options in `generator_options`, no
batch size in the hash), with the exact `dfq generate` arguments that made them. Each test works on
a copy. Shard bytes are compared exactly where the machine matches the one that made the fixture
(same torch version and CPU kernel family); elsewhere floating-point kernels may move a pixel by a
level (SHARDS.md), so the per-sample records are compared exactly and the pixels within one level.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from launch.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_pools"
MADE_WITH = json.loads((FIXTURES / "made_with.json").read_text())
LEGACY_DATA_CONFIG = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def tiny_classifier(num_classes: int = 10) -> tuple[nn.Module, dict]:
    """The bn-distill fixture's classifier (`--model tests.test_legacy_pools:tiny_classifier`):
    conv/BN/ReLU on 16 px, BN statistics from seeded noise. Changing it changes that pool."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
        )  # fmt: skip
        model.train()
        with torch.no_grad():
            for _ in range(4):
                model(torch.randn(16, 3, 16, 16) * 0.7 + 0.2)
    return model.eval(), {**LEGACY_DATA_CONFIG, "num_classes": num_classes}


def same_machine() -> bool:
    """Whether this machine runs the kernels that made the fixture (then bytes must match exactly)."""
    return (torch.__version__.split("+")[0], torch.backends.cpu.get_cpu_capability()) == (
        MADE_WITH["torch"],
        MADE_WITH["cpu_capability"],
    )


def copy_pool(name: str, tmp_path: Path) -> str:
    out = tmp_path / name
    shutil.copytree(FIXTURES / name, out)
    return str(out)


def argv(name: str, out: str, *changes: str) -> list[str]:
    """The command that made fixture `name`, on `out`, with `changes` appended (argparse: last wins)."""
    return ["generate", "--out", out, *MADE_WITH["commands"][name], *changes]


def manifest_of(out: str) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())


def members(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def dir_state(out: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir())}


def assert_same_shard(made: str, original: str) -> None:
    """Byte-identical on the fixture's machine; elsewhere identical records and pixels within a level."""
    if same_machine():
        assert Path(made).read_bytes() == Path(original).read_bytes()
        return
    new, old = members(made), members(original)
    assert sorted(new) == sorted(old)
    for name in old:
        if name.endswith(".png"):
            a = np.asarray(Image.open(io.BytesIO(new[name])), dtype=np.int16)
            b = np.asarray(Image.open(io.BytesIO(old[name])), dtype=np.int16)
            assert a.shape == b.shape and np.abs(a - b).max() <= 1, name
        else:
            assert new[name] == old[name], name


@pytest.mark.parametrize("name", ["diffusion", "bn_distill"])
def test_legacy_pool_reads(name: str, tmp_path: Path) -> None:
    """The engine's reader (inspect) and webdataset read every listed sample of an old pool."""
    import webdataset as wds

    from engine.inspect import inspect_pool

    out = copy_pool(name, tmp_path)
    manifest = manifest_of(out)
    report = inspect_pool(out)
    assert report["complete"] and report["samples_committed"] == manifest["num_samples"]
    urls = [os.path.join(out, e["url"]) for e in manifest["shardlist"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert [s["json"]["index"] for s in samples] == list(range(manifest["num_samples"]))
    generator = manifest["config"]["generator"]
    assert all(s["json"]["generator"] == generator and s["cls"] == s["json"]["class_ids"][0] for s in samples)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["diffusion", "bn_distill"])
def test_legacy_pool_resumes_a_removed_shard_to_the_same_bytes(
    ray_local, name: str, tmp_path: Path, monkeypatch
) -> None:
    """The command that made the pool, re-run by today's code after its last shard was removed,
    accepts the old manifest and writes that shard again, the same bytes (or records, see above)."""
    monkeypatch.chdir(Path(__file__).parents[1])  # actors import `tests.*` from the driver's cwd
    out = copy_pool(name, tmp_path)
    last = manifest_of(out)["shardlist"][-1]["url"]
    os.remove(os.path.join(out, last))
    assert main(argv(name, out)) == 0
    manifest = manifest_of(out)
    assert manifest["complete"] and manifest["config"] == manifest_of(str(FIXTURES / name))["config"]
    for entry in manifest["shardlist"]:
        assert_same_shard(os.path.join(out, entry["url"]), str(FIXTURES / name / entry["url"]))


@pytest.mark.parametrize(
    ("name", "changes", "needle"),
    [
        ("diffusion", ["--steps", "3"], "steps: 2 -> 3"),
        ("diffusion", ["--seed", "1"], "seed: 0 -> 1"),
        ("diffusion", ["--guidance", "2"], "guidance"),
        ("bn_distill", ["--steps", "4"], "3 -> 4"),
        ("bn_distill", ["--distill-loss", "norm"], "norm"),
        ("bn_distill", ["--k", "1"], "k: 2 -> 1"),
    ],
)
def test_legacy_pool_refuses_other_content_settings(
    name: str, changes: list[str], needle: str, tmp_path: Path, capsys
) -> None:
    """Another recipe on an old pool: one line naming the difference, exit 2, nothing written."""
    out = copy_pool(name, tmp_path)
    os.remove(os.path.join(out, manifest_of(out)["shardlist"][-1]["url"]))
    before = dir_state(out)
    assert main(argv(name, out, *changes)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other settings" in err and needle in err, err
    assert dir_state(out) == before


def test_bn_distill_resume_with_another_batch_size_is_refused(tmp_path: Path, capsys) -> None:
    """The batch-size bug: bn-distill optimises a batch jointly (BN statistics are batch statistics),
    so `--batch-size` changes the pixels. Resuming the pool made with `--batch-size 2` with
    `--batch-size 1` once ran to "complete", mixing two recipes in one pool; it must be refused."""
    out = copy_pool("bn_distill", tmp_path)
    os.remove(os.path.join(out, "shard-000001.tar"))
    before = dir_state(out)
    assert main(argv("bn_distill", out, "--batch-size", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "batch_size: 2 -> 1" in err, err
    assert dir_state(out) == before
