"""`dfq export RUN_DIR --format onnx`: a run saved by `dfq quantize --out` becomes a QDQ ONNX file that
ONNX Runtime runs to the torch quantized model's logits; bad input is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

import quant  # noqa: E402
from launch.cli import main  # noqa: E402


def tiny_cnn() -> nn.Module:
    """A bare 16 px conv/BN/ReLU classifier (no data config: the run gives the flags)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )  # fmt: skip
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(16, 3, 16, 16) * 0.7 + 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`dfq quantize` (W4A4, learned rounding) on a tiny CNN, saved by --out."""
    tmp = tmp_path_factory.mktemp("export")
    g = np.random.default_rng(0)
    data = tmp / "d.npz"
    np.savez(data, images=g.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), labels=np.arange(8) % 10)
    out = tmp / "run"
    argv = ["quantize", "--model", "tests.test_export_cli:tiny_cnn", "--calib", str(data), "--n-calib", "8"]
    argv += ["--input-size", "16", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--iters", "2"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    return out


def _export(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["export", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_export_runs_in_onnx_runtime_as_the_quantized_model(run_dir: Path, capsys) -> None:
    report = _export(capsys, str(run_dir), "--format", "onnx")
    path = run_dir / "quantized.onnx"
    assert report["onnx"] == str(path) and path.is_file() and report["check_data"] == "random"
    assert report["weight_layers"] == 3 and report["act_quantizers"] >= 2 and report["check_images"] == 16
    # the check the exporter ran: ONNX semantics equal the torch model up to float summation order
    assert report["argmax_agreement"] == 1.0 and report["max_abs_diff"] < 1e-5 * report["logit_scale"]
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops

    # our own check, on other images and another batch size, against the saved run reloaded
    qmodel = quant.load(run_dir / "quantized.pt")
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = qmodel(x).numpy()
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
    assert (got.argmax(1) == want.argmax(1)).all()


def test_export_to_a_file_checked_on_real_images(run_dir: Path, tmp_path: Path, capsys) -> None:
    g = np.random.default_rng(1)
    data = tmp_path / "check.npz"
    np.savez(data, images=g.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8), labels=np.zeros(6, int))
    out = tmp_path / "sub" / "model.onnx"
    report = _export(capsys, str(run_dir), "--out", str(out), "--data", str(data), "--n-check", "6")
    assert report["onnx"] == str(out) and out.is_file()
    assert report["check_data"] == str(data) and report["check_images"] == 6
    assert report["argmax_agreement"] == 1.0


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["{tmp}/missing"], "run directory {tmp}/missing does not exist"),
        (["{tmp}/empty"], "{tmp}/empty holds no quantized.pt"),
        (["{tmp}/file.txt"], "{tmp}/file.txt is not a directory"),
        (["{tmp}/corrupt"], "cannot read {tmp}/corrupt/quantized.pt: not a file torch.save wrote"),
        (["{run}", "--format", "tflite"], "argument --format: invalid choice: 'tflite'"),
        (["{run}", "--out", "{tmp}"], "--out {tmp} is a directory"),
        (["{run}", "--data", "{tmp}/nothing.npz"], "check data '{tmp}/nothing.npz' does not exist"),
        (["{run}", "--n-check", "0"], "'0'"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    argv: list[str], words: str, run_dir: Path, tmp_path: Path, capsys
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "quantized.pt").write_bytes(b"not a torch file")

    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp_path)).replace("{run}", str(run_dir))

    capsys.readouterr()
    assert main(["export", *map(fill, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("dfq export: error: ") and fill(words) in err
    assert not list(tmp_path.glob("**/*.onnx"))
