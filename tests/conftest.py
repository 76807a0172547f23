"""Shared offline fixtures: a tiny random SD pipeline, a tiny timm classifier, a local Ray session.

Nothing here touches the network or ../shared: a fresh clone must pass its tests alone.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

# Ray 2.60 writes an auth token under ~/.ray unless told not to; set before any ray import.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    """Tests run on 2 cores: keep torch from oversubscribing them alongside Ray actors."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_pipeline():
    """A small random StableDiffusionPipeline (UNet, VAE, CLIP text encoder, tokenizer), built offline."""
    from engine.tiny import build_tiny_pipeline

    return build_tiny_pipeline()


@pytest.fixture(scope="session")
def tiny_classifier() -> torch.nn.Module:
    """A tiny timm CNN (random weights, BN statistics from a few train-mode batches)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    return model.eval()


@pytest.fixture(scope="module")
def ray_local():
    """A local 2-CPU Ray session with its own temp dir, shut down after the module."""
    import ray

    tmp = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
