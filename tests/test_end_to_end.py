"""The whole path through the real CLI on CPU: prompt -> shard -> calibrated model -> accuracy.

Both generators write a pool through the real Ray engine; `dfq quantize` reads it through the shard
format only (a CNN by block reconstruction, a ViT by the RepQ-ViT path) and reports accuracy. The
factories below are `module:factory` model specs, so Ray actors import them as users' code would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from launch.cli import main
from quant.reader import ReadStats, iter_samples, read_manifest, shard_urls

CIFAR_CFG = {
    "input_size": (3, 32, 32),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.25, 0.25, 0.25),
    "crop_pct": 1.0,
    "interpolation": "bilinear",
    "num_classes": 10,
}


def tiny_vit(num_classes: int = 10) -> tuple[nn.Module, dict]:
    """A 32 px timm ViT with random weights (patch 8, one block)."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
        num_classes=num_classes,
    )  # fmt: skip
    return model.eval(), dict(CIFAR_CFG)


def tiny_bn_cnn(num_classes: int = 10) -> tuple[nn.Module, dict]:
    """A small conv/BN/ReLU classifier whose BN statistics come from structured random data."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )  # fmt: skip
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, 32, 32) * 0.7 + 0.2)
    return model.eval(), dict(CIFAR_CFG)


def _generate(pool: Path, *extra: str) -> None:
    argv = ["generate", "--num-images", "16", "--shard-size", "8", "--workers", "1", "--vocab", "cifar10"]
    assert main([*argv, "--out", str(pool), "--no-progress", *extra]) == 0


def _quantize(pool: Path, out: Path, model: str, *extra: str) -> dict:
    argv = [
        "quantize",
        "--model",
        model,
        "--calib",
        str(pool),
        "--n-calib",
        "16",
        "--wbits",
        "4",
        "--abits",
        "4",
    ]
    argv += ["--eval", str(pool), "--out", str(out), "--no-progress", *extra]
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert (out / "quantized.pt").is_file()
    assert 0.0 <= result["fp_agree"] <= 100.0 and result["fp_kl"] >= 0.0  # fidelity to the fp model
    return result


def _check_pool(pool: Path, generator: str) -> list[dict]:
    manifest = read_manifest(str(pool))
    assert manifest["complete"] and len(shard_urls(str(pool), verify="sha256")) == 2
    stats = ReadStats()
    samples = list(iter_samples(str(pool), verify="sha256", stats=stats))
    assert stats.skipped == 0 and sorted(s["json"]["index"] for s in samples) == list(range(16))
    for s in samples:
        assert s["json"]["generator"] == generator and s["cls"] == s["json"]["class_ids"][0]
    return samples


@pytest.mark.slow
def test_diffusion_pool_calibrates_a_cnn_and_a_vit(ray_local, tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    _generate(pool, "--preset", "tiny")
    _check_pool(pool, "diffusion")

    # GPTQ start: the default; --batch-size is a CNN flag (a transformer refuses it)
    cnn = _quantize(pool, tmp_path / "cnn", "cifar_resnet20", "--iters", "4", "--batch-size", "8")
    vit = _quantize(
        pool,
        tmp_path / "vit",
        "tests.test_end_to_end:tiny_vit",
        "--vit-recon-iters",
        "2",
        "--vit-calib-size",
        "8",
    )
    for result in (cnn, vit):
        assert result["n_calib"] == 16 and result["n_eval"] == 16 and result["calib"] == str(pool)
        assert 0.0 <= result["top1"] <= 100.0 and 0.0 <= result["fp_top1"] <= 100.0
    assert cnn["iters"] == 4 and cnn["method"] == "genie-m"
    assert vit["iters"] == 2 and vit["method"] == "repq-vit+rot+genie-m" and vit["placement"] is None
    # a pool may not span the input range: the ViT's image grid then comes from the normalization
    assert vit["input_grid"] == "preprocess" and cnn["input_grid"] is None
    assert vit["calib_images"] == 8 and cnn["calib_images"] is None  # grids on 8, reconstruction on 16
    assert cnn["gptq_start"] is True and vit["gptq_start"] is None


@pytest.mark.slow
def test_bn_distill_pool_through_the_engine(ray_local, tmp_path: Path) -> None:
    pool = tmp_path / "bn"
    _generate(
        pool, "--generator", "bn-distill", "--model", "tests.test_end_to_end:tiny_bn_cnn",
        "--steps", "3", "--batch-size", "8", "--distill-loss", "norm",
    )  # fmt: skip
    samples = _check_pool(pool, "bn-distill")
    config = json.loads((pool / "manifest.json").read_text())["config"]
    assert config["settings"]["bn_loss"] == "norm"  # shapes the content: part of the hash
    assert config["settings"]["iterations"] == 3 and config["settings"]["batch_size"] == 8
    assert all(s["image"].size == (32, 32) for s in samples)
    assert all(len(set(s["json"]["class_ids"])) == 2 for s in samples)  # mixup of two class targets
    result = _quantize(
        pool, tmp_path / "q", "tests.test_end_to_end:tiny_bn_cnn", "--method", "genie-m", "--iters", "2",
        "--augment", "2", "--augment-cutmix", "0.5", "--augment-mixup", "0.4", "--batch-size", "8",
    )  # fmt: skip
    assert result["iters"] == 2 and result["wbits"] == 4
    assert result["augment"] == 2 and result["n_calib"] == 16  # the pool's images, before the copies
    assert result["augment_cutmix"] == 0.5 and result["augment_mixup"] == 0.4
