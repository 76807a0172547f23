"""enhancing-dfq (engine/enhancing_dfq.py) on a tiny BN CNN and a tiny ViT: training lowers its
losses, every part switches off, the pool honours SHARDS.md, reruns and resumed trainings give the
same bytes, and bad settings are refused with one line before anything is written."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from engine.classifier import Classifier
from engine.config import GenerateConfig
from engine.enhancing_dfq import CHECKPOINT, EnhancingDFQGenerator, Trainer
from launch.cli import main
from tests.test_legacy_pools import tiny_classifier

CNN = "tests.test_legacy_pools:tiny_classifier"
VIT = "tests.test_enhancing_dfq:tiny_vit"
SWITCHES = ("label_embed", "mixer", "flow_attention", "simloss1", "bn_loss")
HEAD_GAIN = 8.0
FAST = {"iterations": 6, "train_batch": 4, "warmup": 2, "embed_dim": 16, "threads": 1, "log_every": 3}


def tiny_vit() -> tuple[nn.Module, dict]:
    """A 2-block timm ViT on 32 px (no BN: the patch-similarity loss), seeded random weights."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
            num_heads=2, num_classes=10,
        )  # fmt: skip
        with torch.no_grad():
            model.head.weight.mul_(HEAD_GAIN)  # logits far from uniform: cross-entropy has room to fall
    return model.eval(), {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "num_classes": 10}


def confident_cnn() -> tuple[nn.Module, dict]:
    """The bn-distill fixture's CNN with a sharper head (its random logits are nearly uniform)."""
    model, data_config = tiny_classifier()
    with torch.no_grad():
        model[-1].weight.mul_(HEAD_GAIN)
    return model, data_config


def classifier(factory) -> Classifier:
    _, dc = factory()
    return Classifier(lambda: factory()[0], dc["input_size"], dc["mean"], dc["std"], dc["num_classes"])


def config(out: Path, k: int = 2, **settings) -> GenerateConfig:
    return GenerateConfig(
        out=str(out), generator="enhancing-dfq", model="m", vocab="cifar10", num_images=4, shard_size=2,
        k=k, settings={**FAST, **settings}, device="cpu",
    ).resolved()  # fmt: skip


def window(history: list[dict], key: str, first: bool) -> float:
    values = [h[key] for h in (history[:5] if first else history[-5:])]
    return sum(values) / len(values)


@pytest.mark.parametrize("factory", [confident_cnn, tiny_vit], ids=["bn-cnn", "vit"])
def test_training_lowers_the_losses(factory, tmp_path: Path) -> None:
    stats = "bn" if factory is confident_cnn else "patch"
    trainer = Trainer(config(tmp_path, iterations=40, train_batch=8, warmup=5, lr=5e-3), classifier(factory))
    trainer.run()
    h = trainer.history
    assert len(h) == 40 and {"ce", "mix", "sim1", stats, "mlp"} <= h[0].keys()
    print({key: (window(h, key, True), window(h, key, False)) for key in ("ce", "mix", stats)})
    assert window(h, "mix", False) < 0.5 * window(h, "mix", True)
    assert window(h, stats, False) < window(h, stats, True)
    assert window(h, "ce", False) < window(h, "ce", True)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["done"] and state["iteration"] == 40


@pytest.mark.parametrize("switch", SWITCHES)
def test_every_part_switches_off(switch: str, tmp_path: Path) -> None:
    cfg = config(tmp_path, iterations=2, warmup=1, **{switch: False})
    clf = classifier(tiny_classifier)
    state = Trainer(cfg, clf).run()
    images = EnhancingDFQGenerator(cfg, classifier=clf, edfq_state=state).generate([0, 1])
    assert [img.size for img, _ in images] == [(16, 16)] * 2


def test_k1_and_vit_sampling(tmp_path: Path) -> None:
    cfg = config(tmp_path, k=1, iterations=2, warmup=1)
    clf = classifier(tiny_vit)
    gen = EnhancingDFQGenerator(cfg, classifier=clf, edfq_state=Trainer(cfg, clf).run())
    (img, meta), *_ = gen.generate([5, 6, 7])
    assert img.size == (32, 32) and meta["mix_weights"] == [1.0] and len(meta["class_ids"]) == 1


def test_resumed_training_ends_with_the_same_checkpoint(tmp_path: Path) -> None:
    clf = classifier(tiny_classifier)
    whole = Trainer(config(tmp_path / "a", checkpoint_every=3), clf).run()
    killed = config(tmp_path / "b", checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        Trainer(killed, clf).run(stop_after=4)  # dies after iteration 4, its checkpoint is at 3
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)["iteration"] == 3
    stale = tmp_path / "b" / (CHECKPOINT + ".tmp-x")  # a write the kill cut short
    stale.write_bytes(b"partial")
    resumed = Trainer(killed, clf).run()
    assert not stale.exists()
    assert_same_state(
        torch.load(io.BytesIO(resumed), weights_only=True), torch.load(io.BytesIO(whole), weights_only=True)
    )


def assert_same_state(a, b, path: str = "checkpoint") -> None:
    """Equal values, tensors bit for bit (torch.save's bytes may order storages differently)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    else:
        assert a == b, path


def argv(out: Path, model: str = CNN, *extra: str) -> list[str]:
    return [
        "generate", "--generator", "enhancing-dfq", "--model", model, "--out", str(out), "--num-images", "5",
        "--shard-size", "3", "--k", "2", "--device", "cpu", "--no-progress", "--edfq-iterations", "6",
        "--edfq-batch", "4", "--edfq-warmup", "2", "--edfq-embed-dim", "16", "--edfq-threads", "1",
        "--edfq-checkpoint-every", "3", *extra,
    ]  # fmt: skip


def shard_hashes(out: Path) -> list[str]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [s["sha256"] for s in manifest["shardlist"]]


def test_pool_is_valid_deterministic_and_resumes(ray_local, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(argv(a)) == 0
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["complete"] and [s["nsamples"] for s in manifest["shardlist"]] == [3, 2]
    assert (
        manifest["config"]["settings"]["iterations"] == 6 and "threads" not in manifest["config"]["settings"]
    )
    for entry in manifest["shardlist"]:
        with tarfile.open(a / entry["url"]) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
        for name, data in files.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                assert meta["generator"] == "enhancing-dfq" and len(meta["class_ids"]) == 2
                assert (
                    abs(sum(meta["mix_weights"]) - 1) < 1e-5 and sum(meta["soft_label"].values()) <= 1 + 1e-5
                )
            elif name.endswith(".png"):
                assert Image.open(io.BytesIO(data)).size == (16, 16)
    # a killed training (checkpoint at 3 of 6) resumed by the CLI gives the same shards
    killed = config(b, iterations=6, checkpoint_every=3)
    killed = dataclasses.replace(killed, model=CNN, num_images=5, shard_size=3, checkpoint=None)
    with pytest.raises(KeyboardInterrupt):
        Trainer(killed, classifier(tiny_classifier)).run(stop_after=4)
    assert main(argv(b)) == 0
    assert shard_hashes(b) == shard_hashes(a)
    # a finished training is reused, not redone; the pool is complete
    assert main(argv(a)) == 0 and shard_hashes(a) == shard_hashes(b)


@pytest.mark.parametrize(
    "extra, words",
    [
        (("--edfq-ema", "1.5"), "ema must be in [0, 1)"),
        (("--edfq-warmup", "9"), "warmup (9) must be shorter"),
        (("--pairing", "balanced"), "pairing 'balanced' is not offered"),
        (("--edfq-lr", "0"), "expected a finite number > 0"),
        (("--edfq-layers", "nope"), "no module 'nope'"),
        (("--k", "11"), "k=11 is more than the 10 classes"),
    ],
)
def test_bad_settings_one_line_exit_2(extra, words, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pool"
    assert main(argv(out, CNN, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not out.exists()


def test_help_lists_the_switches(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--edfq-iterations", "--edfq-label-embed", "--no-edfq-mixer", "--edfq-flow-attention",
                 "--edfq-simloss1", "--edfq-bn-loss"):  # fmt: skip
        assert flag in text
