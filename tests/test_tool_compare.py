"""benchmarks.tool_compare (`dfq bench tools`): the tiny form writes well-formed rows, a failing tool
becomes a row with its error, and a CPU row never replaces a GPU row."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")

from benchmarks import tool_compare  # noqa: E402


def test_tiny_form_writes_rows_markdown_and_plot(tmp_path) -> None:
    assert tool_compare.main(["--tiny", "--tools", "ort", "--results", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "tools.json").read_text())
    fp = [r for r in rows if r["tool"] == "fp32"]
    quantized = [r for r in rows if r["tool"] == "ort"]
    assert len(fp) == 1 and fp[0]["n_eval"] == 24
    assert {r["calib"] for r in quantized} == {"noise", "random"}
    for r in quantized:
        assert {*tool_compare.KEY, "top1", "fp_agree", "seconds", "device", "date"} <= r.keys()
        assert (r["wbits"], r["abits"], r["n_calib"], r["dataset"]) == (8, 8, 16, "random-24")
        assert 0 <= r["top1"] <= 100 and 0 <= r["fp_agree"] <= 100 and r["seconds"] > 0
    md = (tmp_path / "tools.md").read_text()
    assert "## tiny-cnn-random on random-24" in md and "| ort | noise |  | W8A8 | 16 |" in md
    assert (tmp_path / "tools.png").stat().st_size > 0


def test_failing_tool_is_a_row_with_its_error(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import quant.integrations as integrations

    def broken(tool, *args, **kwargs):
        raise RuntimeError("graph capture failed\nsecond line")

    monkeypatch.setattr(integrations, "quantize_int8", broken)
    tool_compare.main(["--tiny", "--tools", "ort", "--results", str(tmp_path)])
    rows = [r for r in json.loads((tmp_path / "tools.json").read_text()) if r["tool"] == "ort"]
    assert rows and all(
        r["error"] == "RuntimeError: graph capture failed" and r["top1"] is None for r in rows
    )
    assert "failed: RuntimeError: graph capture failed" in (tmp_path / "tools.md").read_text()


def test_cpu_rows_never_replace_gpu_rows(tmp_path) -> None:
    base = dict(tool="nncf", calib="real", model="m", dataset="d", wbits=8, abits=8, n_calib=4, top1=1.0)
    gpu = {**base, "fp_agree": 90.0, "seconds": 1.0, "device": "cuda:NVIDIA H100", "date": "2026-01-01"}
    tool_compare.merge_rows(tmp_path / "tools.json", [gpu])
    cpu = tool_compare.make_row(**{**base, "top1": 2.0, "fp_agree": 91.0, "seconds": 9.0})
    assert cpu["device"].startswith("cpu")
    merged = tool_compare.merge_rows(tmp_path / "tools.json", [cpu])
    assert sorted(r["top1"] for r in merged) == [1.0, 2.0]  # both kept, keyed by device kind
    again = tool_compare.merge_rows(tmp_path / "tools.json", [{**cpu, "top1": 3.0}])
    assert sorted(r["top1"] for r in again) == [1.0, 3.0]  # a CPU re-run replaces only the CPU row


def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from launch.cli import main

    bad = (
        (["--tools", "tensorrt", "--eval", "x=y"], "--tools: unknown tensorrt"),
        (["--bits", "W2A2", "--eval", "x=y"], "--bits 'W2A2'"),
        (["--tools", "ort", "--calib", "=pool/", "--eval", "x=y"], "--calib '=pool/': expected NAME=SOURCE"),
        (["--tools", "ort", "--calib", f"p={tmp_path / 'nope'}", "--eval", "x=y"], "nope does not exist"),
    )
    for argv, message in bad:
        assert main(["bench", "tools", "--model", "tests.user_models:resnet20_variant", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_small_pool_calibrates_on_what_it_holds(tmp_path) -> None:
    import torch

    from tests.tiny_pools import write_image_pool

    pool = write_image_pool(tmp_path / "pool", num_samples=10, shard_size=4)
    assert tool_compare.calibration_count(str(pool), 1024) == 10  # a 256-image pool in a 1,024 run
    assert tool_compare.calibration_count(str(pool), 6) == 6
    assert tool_compare.calibration_count("noise", 7) == 7
    assert tool_compare.calibration_count(torch.zeros(3, 3, 8, 8), 9) == 3
