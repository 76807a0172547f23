"""The UNet running-state benchmark in its CPU form (tiny preset): rows, timings and profile are well formed."""

import json

import pytest

from benchmarks import unet_speed


def test_tiny_variants_write_rows_and_a_profile(tmp_path) -> None:
    unet_speed.main(
        ["--preset", "tiny", "--batch", "1", "--reps", "2", "--variants", "eager,cl+fuse",
         "--profile", "cl+fuse", "--results", str(tmp_path)]
    )  # fmt: skip
    rows = json.loads((tmp_path / "unet_speed.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["eager", "cl+fuse"]
    for r in rows:
        assert r["device"] == "cpu" and r["cfg_batch"] == 2 and r["ms"] > 0 and r["tflops"] > 0
        assert r["rel_err_vs_eager"] < 1e-4  # fp32: the same function in another memory layout
    kinds = rows[1]["kernels"]
    assert kinds["total_ms"] > 0 and "convolution" in kinds["ms_per_forward"]
    assert rows[0]["kernels"] is None
    assert "| cl+fuse | cpu | 2 |" in (tmp_path / "unet_speed.md").read_text()


def test_unknown_switch_is_one_line_error() -> None:
    with pytest.raises(SystemExit, match="unknown switch 'fast'"):
        unet_speed.main(["--variants", "cl+fast"])
