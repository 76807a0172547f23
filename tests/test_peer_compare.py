"""benchmarks.peer_compare: the tiny CI form runs the real settings loop end to end, bn-distill pool
through the engine's Ray actors included, and writes well-formed rows and the side-by-side files."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import peer_compare, report


@pytest.mark.slow
def test_tiny_form_runs_every_setting(ray_local, tmp_path) -> None:
    threads = torch.get_num_threads()
    try:
        assert peer_compare.main(["--tiny", "--results", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)

    rows = json.loads((tmp_path / "accuracy.json").read_text())
    for row in rows:
        missing = [f for f in report.ROW_FIELDS if f not in row]
        assert not missing, missing
        assert row["model"] == "cifar_resnet20-random" and row["dataset"] == "random-64"
        assert 0.0 <= row["top1"] <= row["top5"] <= 100.0
    quantized = [r for r in rows if r["method"] != "fp32"]
    assert [(r["method"], r["wbits"], r["calib"], r["iters"]) for r in quantized] == [
        ("rtn", 4, "real", 0), ("genie-m", 4, "real", 3), ("genie-m", 4, "bn-distill", 2),
        ("rtn", 2, "real", 0), ("genie-m", 2, "real", 2),
    ]  # fmt: skip
    assert all(r["placement"] == "layer-input" for r in quantized)  # the peer's graph
    distilled = next(r for r in quantized if r["calib"] == "bn-distill")
    assert distilled["n_calib"] == 16 and distilled["distill_seconds"] > 0  # distilled by the engine

    side = json.loads((tmp_path / "peer_compare.json").read_text())
    assert [r["setting"] for r in side["rows"]] == [
        "W4A4 rtn real", "W4A4 genie-m real", "W4A4 genie-m bn-distill", "W2A4 rtn real", "W2A4 genie-m real",
    ]  # fmt: skip
    for r in side["rows"]:
        # ours_seconds is rounded to 0.1 s, the ratio is taken before rounding
        assert r["peer_seconds"] > 0 and abs(r["time_ratio"] - r["ours_seconds"] / r["peer_seconds"]) < 0.01
    md = (tmp_path / "peer_compare.md").read_text()
    assert "Tiny CI form" in md and "| W2A4 genie-m real, layer-input | 2 |" in md
