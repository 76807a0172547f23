"""`dfq inspect`: summary of a pool from its manifest, class coverage, and a captioned contact sheet."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import pytest
from PIL import Image

from engine.config import GenerateConfig
from engine.diffusion import DiffusionGenerator
from engine.inspect import class_coverage, inspect_pool
from engine.manifest import add_shard, new_manifest, save_manifest
from engine.worker import ShardWorker
from launch.cli import main


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """In-process generation on one thread, as in a CPU actor: on a busy 2-core runner, two OpenMP
    threads spin against each other and a tiny pipeline call slows down 20-50x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pool(tiny_pipeline, tmp_path_factory) -> str:
    """A complete 12-sample cifar10 pool (3 shards), written in-process exactly as an actor would."""
    out = str(tmp_path_factory.mktemp("inspect") / "pool")
    os.makedirs(out)
    cfg = GenerateConfig(
        out=out, preset="tiny", vocab="cifar10", num_images=12, shard_size=4, batch_size=4
    ).resolved()
    worker = ShardWorker(cfg, generator=DiffusionGenerator(cfg, pipe=tiny_pipeline))
    manifest = new_manifest(cfg)
    for shard in range(cfg.num_shards):
        add_shard(manifest, worker.run_unit(shard))
        save_manifest(out, manifest)
    return out


def test_inspect_cli_prints_summary_and_writes_a_contact_sheet(pool: str, tmp_path, capsys) -> None:
    sheet = tmp_path / "sheet.png"
    assert main(["inspect", pool, "--num", "6", "--columns", "3", "--sheet", str(sheet)]) == 0
    out = capsys.readouterr().out
    assert "12/12 in 3/3 shards, complete" in out
    assert 'vocab = "cifar10"' in out and "classes " in out and str(sheet) in out
    image = Image.open(sheet)
    assert image.width == 3 * 160 and image.height > 2 * 160  # 6 samples in 2 rows of 3, captions below
    assert len(set(image.convert("L").getdata())) > 2  # images and text were drawn, not a blank canvas


def test_coverage_counts_every_mixed_class_of_listed_shards_only(pool: str, tmp_path) -> None:
    import webdataset as wds

    manifest = json.loads(open(os.path.join(pool, "manifest.json")).read())
    urls = [os.path.join(pool, e["url"]) for e in manifest["shardlist"]]
    expected = Counter(
        c for s in wds.WebDataset(urls, shardshuffle=False) for c in json.loads(s["json"])["class_ids"]
    )
    assert sum(expected.values()) == 12 * 2

    copy = str(tmp_path / "pool")
    shutil.copytree(pool, copy)
    shutil.copy(os.path.join(copy, "shard-000000.tar"), os.path.join(copy, "shard-000009.tar"))  # unlisted
    assert class_coverage(copy, manifest) == expected  # the unlisted tar is never read
    report = inspect_pool(copy, num=0)
    cov = report["coverage"]
    assert cov["num_classes"] == 10 and cov["classes_covered"] == len(expected)
    assert (cov["min"], cov["max"]) == (min(expected.get(c, 0) for c in range(10)), max(expected.values()))
    assert report["samples_committed"] == 12 and report["complete"] and report["sheet"] is None


def test_incomplete_pool_is_reported_and_json_output(pool: str, tmp_path, capsys) -> None:
    copy = tmp_path / "pool"
    shutil.copytree(pool, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shardlist"] = manifest["shardlist"][:1]
    manifest["complete"] = False
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(copy), "--num", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples_committed"] == 4 and not report["complete"] and report["shards_total"] == 3


def test_inspect_default_sheet_lands_in_the_pool(pool: str, tmp_path, capsys) -> None:
    copy = tmp_path / "pool"
    shutil.copytree(pool, copy)
    assert main(["inspect", str(copy)]) == 0
    assert Image.open(copy / "contact_sheet.png").width == 4 * 160
    # the sheet is not a shard: a later resume keeps it
    manifest = json.loads((copy / "manifest.json").read_text())
    assert all(e["url"].endswith(".tar") for e in manifest["shardlist"])


def test_inspect_of_a_non_pool_is_a_one_line_error(tmp_path, capsys) -> None:
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no manifest.json" in err and err.startswith("dfq inspect")
