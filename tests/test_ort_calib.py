"""quant.ort_calib: ONNX Runtime static INT8 calibrated from a pool written here by hand (SHARDS.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from onnxruntime.quantization import CalibrationDataReader  # noqa: E402

from quant.data import build_transform, load_calibration  # noqa: E402
from quant.errors import QuantError  # noqa: E402
from quant.export_onnx import export_fp, run_onnx  # noqa: E402
from quant.ort_calib import ShardCalibrationReader, quantize_onnx_static  # noqa: E402
from tests.tiny_pools import tiny_cnn, write_image_pool  # noqa: E402

CFG = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 1.0}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_pool(tmp_path_factory.mktemp("ort") / "pool")


def test_reader_follows_ort_protocol(pool: Path) -> None:
    tf = build_transform(CFG)
    reader = ShardCalibrationReader(str(pool), tf, n=30, input_name="x", batch_size=8)
    assert isinstance(reader, CalibrationDataReader) and len(reader) == 4
    batches = list(reader)  # ORT's calibrators iterate (get_next until None)
    assert [b["x"].shape[0] for b in batches] == [8, 8, 8, 6] and reader.get_next() is None
    assert all(set(b) == {"x"} and b["x"].dtype == np.float32 for b in batches)
    # the same images, in the same order, as the PyTorch quantizer's calibration set
    expect = load_calibration(str(pool), tf, 30).numpy()
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), expect)
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["x"], expect[:8])
    # a data config is a transform too, and preprocessed images can be fed directly
    assert ShardCalibrationReader(str(pool), CFG, 2, "x").get_next()["x"].shape == (1, 3, 16, 16)
    direct = ShardCalibrationReader(torch.from_numpy(expect), None, 30, "x", batch_size=16)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in direct]), expect)


def test_reader_errors(pool: Path) -> None:
    with pytest.raises(QuantError, match="asked for 49 calibration images but .* has only 48"):
        list(ShardCalibrationReader(str(pool), CFG, 49, "x", batch_size=16))
    with pytest.raises(QuantError, match="batch_size"):
        ShardCalibrationReader(str(pool), CFG, 4, "x", batch_size=0)
    with pytest.raises(QuantError, match="no manifest.json|does not exist"):
        ShardCalibrationReader(str(pool / "nope"), CFG, 4, "x").get_next()


def test_static_int8_from_pool_stays_close_to_fp(pool: Path, tmp_path: Path) -> None:
    model = tiny_cnn()
    fp_path = export_fp(model, torch.zeros(1, 3, 16, 16), tmp_path / "fp.onnx")
    reader = ShardCalibrationReader(str(pool), build_transform(CFG), n=32, input_name="input", batch_size=8)
    out = quantize_onnx_static(fp_path, tmp_path / "int8.onnx", reader)

    graph = onnx.load(str(out)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 3 and "BatchNormalization" not in ops
    weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(weights) == 3  # the three conv weights, int8
    scales = {t.name: t for t in graph.initializer}
    per_channel = [
        n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in {w.name for w in weights}
    ]
    assert all(len(scales[n.input[1]].dims) == 1 for n in per_channel)  # one scale per output channel

    x = load_calibration(str(pool), build_transform(CFG), 48)  # the held-out 16 are never calibrated on
    with torch.no_grad():
        ref = model(x).numpy()
    got = run_onnx(out, x, batch_size=16)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.99, cos.min()  # measured 0.9999 (min over 48 images)
    # top-1 agrees wherever the float model is not near a tie (random weights make close logits)
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * np.abs(got - ref).max()
    assert clear.sum() >= 8 and (got.argmax(1) == ref.argmax(1))[clear].all()
    np.testing.assert_allclose(run_onnx(fp_path, x), ref, atol=1e-4)  # the float export itself


def test_bad_arguments(pool: Path, tmp_path: Path) -> None:
    reader = ShardCalibrationReader(str(pool), CFG, 4, "input")
    with pytest.raises(QuantError, match="calibrate_method 'kl'"):
        quantize_onnx_static(tmp_path / "m.onnx", tmp_path / "o.onnx", reader, calibrate_method="kl")
    with pytest.raises(QuantError, match="does not exist"):
        quantize_onnx_static(tmp_path / "m.onnx", tmp_path / "o.onnx", reader)
