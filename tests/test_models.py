"""quant.models: every spec kind, checkpoint formats, and one-line errors. Random weights only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from quant.errors import QuantError
from quant.models import load_model


def tiny_factory(num_classes: int = 3) -> tuple[nn.Module, dict]:
    """A module:factory target that returns its own data config."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes)
    )
    config = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}
    return model, {**config, "interpolation": "bilinear", "num_classes": num_classes}


def bare_factory() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 7))


def _check(model: nn.Module, cfg: dict, classes: int) -> None:
    assert not model.training
    assert cfg["num_classes"] == classes
    assert {"input_size", "mean", "std", "crop_pct", "interpolation"} <= set(cfg)
    with torch.no_grad():
        assert model(torch.randn(2, *cfg["input_size"])).shape == (2, classes)


def test_zoo_names() -> None:
    model, cfg = load_model("cifar_resnet20")
    _check(model, cfg, 10)
    assert cfg["input_size"] == (3, 32, 32)
    model, cfg = load_model("mobilenetv1_x0.25")
    assert cfg["num_classes"] == 1000 and cfg["crop_pct"] == pytest.approx(0.875)
    with pytest.raises(QuantError, match="has 10 classes, not 100"):
        load_model("cifar_resnet20", num_classes=100)


@pytest.mark.parametrize("spec", ["timm:test_resnet", "test_resnet"])
def test_timm(spec: str) -> None:
    model, cfg = load_model(spec, num_classes=5)
    assert cfg["input_size"][0] == 3 and cfg["mean"] and cfg["interpolation"]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert cfg["num_classes"] == 5 and not model.training


@pytest.mark.parametrize("spec", ["tv:resnet18", "torchvision:resnet18"])
def test_torchvision(spec: str) -> None:
    model, cfg = load_model(spec, num_classes=4)
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == pytest.approx(224 / 256)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    assert cfg["num_classes"] == 4 and not model.training


def test_module_factory() -> None:
    model, cfg = load_model("test_models:tiny_factory", num_classes=6)
    _check(model, cfg, 6)
    with pytest.raises(QuantError, match="without its preprocessing: give --input-size, --mean, --std \\("):
        load_model("test_models:bare_factory")  # no data config: no silent ImageNet 224 px
    with pytest.raises(QuantError, match="no callable 'nothing'"):
        load_model("test_models:nothing")
    with pytest.raises(QuantError, match="import failed"):
        load_model("no_such_module_xyz:f")


@pytest.mark.parametrize("spec", ["foo", "timm:foo", "tv:foo"])
def test_unknown_model(spec: str) -> None:
    msg = f"unknown model '{spec}': not a dfq zoo name, timm model, torchvision model or module:factory"
    with pytest.raises(QuantError, match=msg):
        load_model(spec)


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model", "model_state_dict", "ddp"])
def test_checkpoint_formats(tmp_path: Path, wrap: str) -> None:
    torch.manual_seed(0)
    ref, _ = load_model("cifar_resnet20")
    state = ref.state_dict()
    if wrap == "ddp":
        obj = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "best_prec1": 91.0}
    else:
        obj = state if wrap == "raw" else {wrap: state, "epoch": 3}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    model, _ = load_model("cifar_resnet20", checkpoint=str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref.eval()(x))


def test_checkpoint_old_batchnorm_without_counter(tmp_path: Path) -> None:
    """Pre-1.0 checkpoints (the CIFAR ResNets) lack num_batches_tracked; that is not a mismatch."""
    ref, _ = load_model("cifar_resnet20")
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state}, tmp_path / "old.th")
    load_model("cifar_resnet20", checkpoint=str(tmp_path / "old.th"))


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(QuantError, match="checkpoint .*missing.pth does not exist"):
        load_model("cifar_resnet20", checkpoint=str(tmp_path / "missing.pth"))
    other, _ = load_model("cifar_resnet32")
    torch.save(other.state_dict(), tmp_path / "r32.pth")
    with pytest.raises(QuantError, match=r"does not match the model: unexpected \d+: layer1\.3\.") as e:
        load_model("cifar_resnet20", checkpoint=str(tmp_path / "r32.pth"))
    assert "\n" not in str(e.value)
    state, _ = load_model("cifar_resnet20")
    bad = dict(state.state_dict())
    bad["linear.weight"] = torch.zeros(5, 64)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(QuantError, match=r"shape 1: linear.weight \(5, 64\) vs \(10, 64\)"):
        load_model("cifar_resnet20", checkpoint=str(tmp_path / "shape.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(QuantError, match="cannot read checkpoint"):
        load_model("cifar_resnet20", checkpoint=str(tmp_path / "junk.pth"))
