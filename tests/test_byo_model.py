"""Models brought as people bring them: `--model path/to/net.py:factory`, a factory returning a bare
module, and the flags that state its preprocessing (`--input-size`, `--mean`, `--std`, `--num-classes`).

A model without a data config is refused naming the flags (no silent ImageNet 224 px); with them it
quantizes, evaluates and reloads from anywhere; a wrong input size is one line, not a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import quant
from launch.cli import main
from quant.errors import QuantError
from quant.models import Preprocess, check_forward, load_model, resolve_spec, spec_args

#: a user's model file: a 16 px CNN whose flattened head only fits 16 px inputs, no data config
NET_PY = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
        )
        self.head = nn.Linear(8 * 8 * 8, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


def build():
    """A bare module, BN statistics from seeded noise."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Net().train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(16, 3, 16, 16) * 0.7 + 0.2)
    return model.eval()


def conv_head():
    """No Linear layer: the class count cannot be guessed from the structure."""
    return nn.Sequential(nn.Conv2d(3, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def with_config(num_classes=10):
    return build(), {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.25,) * 3}


def a_timm_model():
    import timm

    return timm.create_model("test_resnet", num_classes=10)


NOT_CALLABLE = 3
'''
FLAGS = ["--input-size", "16", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]


@pytest.fixture()
def net(tmp_path: Path) -> Path:
    path = tmp_path / "user" / "net.py"
    path.parent.mkdir()
    path.write_text(NET_PY)
    return path


@pytest.fixture()
def npz(tmp_path: Path) -> Path:
    g = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, images=g.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8), labels=np.arange(12) % 10)
    return path


def _one_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- the CLI ---------------------------------------------------------------------------------------


def test_bare_module_from_a_file_quantizes_evaluates_and_reloads_anywhere(
    net: Path, npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative `net.py:build` spec with the flags: quantized, evaluated on 16 px images; the run
    records the flags and saves a spec that `quant.load` rebuilds from another directory."""
    monkeypatch.chdir(net.parent)
    out = tmp_path / "q"
    argv = ["quantize", "--model", "net.py:build", "--calib", str(npz), "--n-calib", "8", "--iters", "2"]
    assert main([*argv, *FLAGS, "--eval", str(npz), "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["preprocess_flags"] == {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.25] * 3}
    assert result["data_config"]["input_size"] == [3, 16, 16] and result["data_config"]["num_classes"] == 10
    assert result["n_eval"] == 12 and 0 <= result["top1"] <= 100 and result["family"] == "cnn"

    monkeypatch.chdir(tmp_path)  # the saved spec names the file absolutely: no flags, no cwd needed
    loaded = quant.load(out / "quantized.pt")
    assert loaded.model_spec["model"] == f"{net}:build"
    assert loaded.model_spec["preprocess"]["input_size"] == [3, 16, 16]
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    float_model, _ = load_model(**spec_args(loaded.model_spec))
    with torch.no_grad():
        assert loaded(x).shape == (4, 10)
        assert torch.nn.functional.cosine_similarity(loaded(x).flatten(), float_model(x).flatten(), 0) > 0.9


def test_without_flags_the_model_is_refused_naming_them(
    net: Path, npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "q"
    base = ["quantize", "--calib", str(npz), "--out", str(out)]
    assert main([*base, "--model", f"{net}:build"]) == 2
    err = _one_line(capsys)
    assert "comes without its preprocessing: give --input-size, --mean, --std (" in err
    assert "--num-classes" not in err  # its Linear head says 10
    assert main([*base, "--model", f"{net}:conv_head"]) == 2
    assert "give --input-size, --mean, --std, --num-classes (" in _one_line(capsys)
    assert main([*base, "--model", f"{net}:build", "--input-size", "16"]) == 2  # partly given
    assert "give --mean, --std (" in _one_line(capsys)
    assert not out.exists()


def test_a_wrong_input_size_is_one_line(net: Path, npz: Path, tmp_path: Path, capsys) -> None:
    argv = ["quantize", "--model", f"{net}:build", "--calib", str(npz), "--out", str(tmp_path / "q")]
    flags = ["--input-size", "32", *FLAGS[2:]]
    assert main([*argv, *flags]) == 2
    err = _one_line(capsys)
    assert "forward fails on one 3x32x32 image" in err and "mat1 and mat2 shapes" in err
    assert main([*argv, *FLAGS, "--num-classes", "5"]) == 2  # not passed to build(): checked instead
    assert "gives 10 logits for one image, num_classes is 5" in _one_line(capsys)


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--input-size", "0", "input size S or 3,H,W"),
        ("--input-size", "3,32", "input size S or 3,H,W"),
        ("--input-size", "16x16", "input size S or 3,H,W"),
        ("--input-size", "1,28,28", "3 channels"),
        ("--mean", "0.5,0.5", "3 comma-separated numbers"),
        ("--mean", "a,b,c", "3 comma-separated numbers"),
        ("--mean", "nan,0,0", "3 comma-separated numbers"),
        ("--std", "0,0.2,0.2", "numbers > 0"),
        ("--std=", "-1,1,1", "numbers > 0"),  # a leading '-' needs the = form
        ("--num-classes", "0", "integer >= 1"),
    ],
)
@pytest.mark.parametrize("command", ["quantize", "generate"])
def test_bad_flag_values_exit_2_naming_them(
    command: str, flag: str, value: str, words: str, tmp_path: Path, capsys
) -> None:
    argv = {
        "quantize": ["quantize", "--model", "cifar_resnet20", "--calib", "noise"],
        "generate": ["generate", "--generator", "bn-distill", "--model", "cifar_resnet20"],
    }[command]
    given = [flag + value] if flag.endswith("=") else [flag, value]
    assert main([*argv, "--out", str(tmp_path / "o"), *given]) == 2
    err = _one_line(capsys)
    name = flag.rstrip("=")
    assert err.startswith(f"dfq {command}: error: argument {name}") and repr(value) in err and words in err
    assert not (tmp_path / "o").exists()


def test_preprocessing_flags_belong_to_classifier_generators(tmp_path: Path, capsys) -> None:
    argv = ["generate", "--preset", "tiny", "--out", str(tmp_path / "pool"), "--mean", "0.5,0.5,0.5"]
    assert main(argv) == 2
    assert "--mean is for classifier-based generators, not --generator diffusion" in _one_line(capsys)


def test_bn_distill_on_a_file_factory_with_flags(ray_local, net: Path, tmp_path: Path, capsys) -> None:
    """The flags reach the Ray actor (which loads the file by its absolute path) and the pool's
    config; resuming with other flags is refused in one line."""
    pool = tmp_path / "pool"
    argv = ["generate", "--generator", "bn-distill", "--model", f"{net}:build", "--out", str(pool)]
    argv += ["--num-images", "4", "--shard-size", "4", "--batch-size", "4", "--steps", "2", "--workers", "1"]
    assert main([*argv, "--no-progress"]) == 2  # no data config: refused before Ray
    assert "give --input-size, --mean, --std (" in _one_line(capsys)
    assert main([*argv, *FLAGS, "--num-classes", "10", "--no-progress"]) == 0
    config = json.loads((pool / "manifest.json").read_text())["config"]
    assert config["preprocess"] == {
        "input_size": [3, 16, 16],
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "num_classes": 10,
    }
    from quant.reader import iter_samples

    samples = list(iter_samples(str(pool)))
    assert len(samples) == 4 and all(s["image"].size == (16, 16) for s in samples)
    capsys.readouterr()
    other = [*FLAGS[:4], "--std", "0.5,0.5,0.5"]
    assert main([*argv, *other, "--num-classes", "10", "--no-progress"]) == 2
    err = _one_line(capsys)
    assert "other settings" in err and "preprocess" in err


# -- quant.models ----------------------------------------------------------------------------------


def test_file_spec_errors_are_one_line(tmp_path: Path, net: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_package_xyz\n")
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def f(:\n")
    with pytest.raises(QuantError, match=r"^model file .*missing\.py does not exist$"):
        load_model(f"{tmp_path}/missing.py:build")
    with pytest.raises(
        QuantError, match="cannot import model file .*broken.py: ModuleNotFoundError: No module"
    ):
        load_model(f"{broken}:build")
    with pytest.raises(QuantError, match="cannot import model file .*syntax.py: SyntaxError"):
        load_model(f"{syntax}:f")
    with pytest.raises(QuantError, match=r"names no factory: give .*net\.py:<function>$"):
        load_model(str(net))
    for attr in ("nothing", "NOT_CALLABLE"):
        with pytest.raises(QuantError, match=f"^model file .*net.py has no callable '{attr}'$"):
            load_model(f"{net}:{attr}")


def test_which_factory_results_count_as_a_data_config(net: Path) -> None:
    """A returned config or a timm model's pretrained_cfg is one; timm's resolver answering
    ImageNet's defaults for a plain module is not (the model is refused)."""
    model, cfg = load_model(f"{net}:with_config")
    assert cfg["input_size"] == (3, 16, 16) and cfg["num_classes"] == 10 and cfg["crop_pct"] == 1.0
    check_forward(model, cfg)
    import timm
    from timm.data import resolve_data_config

    _, cfg = load_model(f"{net}:a_timm_model")
    own = resolve_data_config({}, model=timm.create_model("test_resnet"))
    assert cfg["input_size"] == own["input_size"] != (3, 224, 224) and cfg["num_classes"] == 10
    assert resolve_data_config({}, model=nn.Linear(2, 2))["input_size"] == (3, 224, 224)  # the trap
    with pytest.raises(QuantError, match="without its preprocessing"):
        load_model(f"{net}:build")


def test_flags_override_a_real_config_and_module_names_stay_apart(net: Path, tmp_path: Path) -> None:
    _, own = load_model("cifar_resnet20")
    _, cfg = load_model("cifar_resnet20", preprocess=Preprocess(input_size=(3, 40, 40), std=(1.0, 1.0, 1.0)))
    assert cfg["input_size"] == (3, 40, 40) != own["input_size"] and cfg["std"] == (1.0,) * 3
    assert cfg["mean"] == own["mean"] and cfg["crop_pct"] == own["crop_pct"]  # the zoo's own, kept
    other = tmp_path / "other" / "net.py"  # same file name, other folder: its own module
    other.parent.mkdir()
    other.write_text("from torch import nn\n\ndef build():\n    return nn.Linear(2, 2)\n")
    a, _ = load_model(f"{net}:build", preprocess=Preprocess((3, 16, 16), (0.5,) * 3, (0.25,) * 3))
    b, _ = load_model(f"{other}:build", preprocess=Preprocess((3, 1, 2), (0.5,) * 3, (0.25,) * 3))
    assert type(a).__module__ != type(b).__module__ and isinstance(b, nn.Linear)
    assert resolve_spec("net.py:build").startswith("/") and resolve_spec("pkg.mod:f") == "pkg.mod:f"
    with pytest.raises(QuantError, match=r"mean \(0.5, 0.5\) has 2 values for 3 input channels"):
        load_model(f"{net}:build", preprocess=Preprocess((3, 16, 16), (0.5, 0.5), (0.25,) * 3))
