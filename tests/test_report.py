"""Result rows (benchmarks/report.py): which rows are the same measurement, and how tables label them."""

from __future__ import annotations

import json

import pytest

from benchmarks import report


def _row(**kw) -> dict:
    base = dict(model="m", dataset="d", wbits=8, abits=8, calib="noise", method="rtn", n_calib=8, iters=0)
    base.update(top1=50.0, top5=70.0, fp_top1=52.0, seconds=1.0)
    return report.make_row(**{**base, **kw})


def test_equalized_rows_are_their_own_measurement(tmp_path) -> None:
    path = tmp_path / "accuracy.json"
    report.merge_rows(path, [_row(equalize=False)])
    merged = report.merge_rows(path, [_row(equalize=True, top1=51.0)])
    assert sorted(report.method_label(r) for r in merged) == ["rtn", "rtn+cle"]
    # rerunning a setting replaces its row, and rows written before the field existed count as off
    legacy = {k: v for k, v in _row().items() if k != "equalize"}
    path.write_text(json.dumps([legacy, _row(equalize=True)]))
    merged = report.merge_rows(path, [_row(equalize=False, top1=49.0)])
    assert [(bool(r.get("equalize")), r["top1"]) for r in merged] == [(True, 50.0), (False, 49.0)]


def test_layer_input_placement_is_named_in_the_label() -> None:
    assert report.method_label(_row(method="genie-m", placement="layer-input", equalize=True)) == (
        "genie-m+cle (layer-input)"
    )


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError, match="method 'magic' not one of"):
        _row(method="magic")


def test_vit_weight_rounding_rows_are_their_own_measurement(tmp_path) -> None:
    """GPTQ and nearest-rounding ViT rows coexist; rows from before the field are nearest."""
    vit = dict(method="repq-vit", calib="real", draw=0)
    legacy = _row(**vit)
    gptq = _row(**vit, weight_rounding="gptq", top1=51.0)
    nearest = _row(**vit, weight_rounding="nearest", top1=49.0)
    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps([legacy]))
    merged = report.merge_rows(path, [gptq])
    assert sorted(report.method_label(r) for r in merged) == ["repq-vit", "repq-vit+gptq"]
    merged = report.merge_rows(path, [nearest])  # a rerun with nearest replaces the legacy row
    assert sorted(r["top1"] for r in merged) == [49.0, 51.0]
    # a reconstruction row's rounding is where it started (legacy ones: nearest); CNN rows have none
    assert report.weight_rounding(_row(**vit, iters=500)) == "nearest"
    assert report.weight_rounding(_row(**vit, iters=500, weight_rounding="gptq")) == "gptq"
    assert report.weight_rounding(_row(method="genie-m", weight_rounding="gptq")) is None
    # the input grid too: rows from before the option were fitted ("calibrated")
    pre = _row(**vit, weight_rounding="gptq", input_grid="preprocess", top1=52.0)
    assert report.row_key(pre) != report.row_key(gptq) and report.input_grid(_row(**vit)) == "calibrated"
    assert report.input_grid(_row(method="genie-m")) is None
    assert report.method_label(pre) == "repq-vit+gptq (preprocess input)"
    assert (
        report.method_label(_row(**vit, iters=500, weight_rounding="gptq"))
        == "repq-vit+gptq+genie-m (grids on 32)"
    )
    # and the calibration batch: rows from before the field read 32 images; a 64-image row is apart
    wide = _row(**vit, weight_rounding="gptq", calib_images=64, top1=54.0)
    assert report.calib_images(gptq) == 32 and report.calib_images(wide) == 64
    assert (
        report.row_key(wide) != report.row_key(gptq) and report.calib_images(_row(method="genie-m")) is None
    )
    # and the head rotation: rows from before it had none
    rot = _row(**vit, weight_rounding="gptq", head_rotation="hadamard", top1=53.0)
    assert report.row_key(rot) != report.row_key(gptq) and report.head_rotation(gptq) == "none"
    assert report.head_rotation(_row(method="genie-m")) is None
    assert report.method_label(rot) == "repq-vit+rot+gptq"


def test_cnn_reconstruction_start_is_part_of_the_measurement(tmp_path) -> None:
    """GPTQ-start and nearest-start CNN rows coexist; rows from before the field started from nearest."""
    cnn = dict(method="genie-m", calib="real", iters=100, placement="layer-input")
    legacy = _row(**cnn)
    gptq = _row(**cnn, gptq_start=True, top1=51.0)
    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps([legacy]))
    merged = report.merge_rows(path, [gptq])
    assert sorted(report.method_label(r) for r in merged) == [
        "genie-m (layer-input)",
        "genie-m+gptq (layer-input)",
    ]
    merged = report.merge_rows(path, [_row(**cnn, gptq_start=False, top1=49.0)])  # replaces the legacy row
    assert sorted(r["top1"] for r in merged) == [49.0, 51.0]
    assert report.weight_rounding(_row(method="rtn", gptq_start=True)) is None  # nothing learned, no start
