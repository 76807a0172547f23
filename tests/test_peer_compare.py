"""benchmarks.peer_compare: the tiny CI form runs the real settings loop end to end, bn-distill pool
through the engine's Ray actors included, and writes well-formed rows and the side-by-side files."""

from __future__ import annotations

import argparse
import json
import tempfile

import pytest
import torch

from benchmarks import peer_compare, report
from benchmarks.errors import BenchmarkError


def _main(argv: list[str]) -> int:
    """`peer_compare.main`, leaving torch's thread count as it found it (the benchmark sets its own)."""
    threads = torch.get_num_threads()
    try:
        return peer_compare.main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_tiny_form_runs_every_setting(ray_local, tmp_path, monkeypatch) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    argv = ["--tiny", "--distill-cutmix", "0.5", "--distill-ce-weight", "0", "--results", str(tmp_path)]
    assert _main(argv) == 0
    litter = [p.name for p in scratch.iterdir() if p.name.startswith("dfq-")]
    assert litter == []  # the distilled pool and the random checkpoint are removed

    rows = json.loads((tmp_path / "accuracy.json").read_text())
    for row in rows:
        missing = [f for f in report.ROW_FIELDS if f not in row]
        assert not missing, missing
        assert row["model"] == "cifar_resnet20-random" and row["dataset"] == "random-64"
        assert 0.0 <= row["top1"] <= row["top5"] <= 100.0
    quantized = [r for r in rows if r["method"] != "fp32"]
    for row in quantized:  # fidelity to the fp32 model, which is the reference and has none
        assert 0.0 <= row["fp_agree"] <= 100.0 and row["fp_kl"] >= 0.0
    assert [(r["method"], r["wbits"], r["calib"], r["iters"]) for r in quantized] == [
        ("rtn", 4, "real", 0), ("genie-m", 4, "real", 3), ("genie-m", 4, "bn-distill", 2),
        ("rtn", 2, "real", 0), ("genie-m", 2, "real", 2),
    ]  # fmt: skip
    assert all(r["placement"] == "layer-input" for r in quantized)  # the peer's graph
    distilled = next(r for r in quantized if r["calib"] == "bn-distill")
    assert distilled["n_calib"] == 16 and distilled["distill_seconds"] > 0  # distilled by the engine
    assert distilled["augment"] == 2  # reconstructed on the 16 images and a flipped/shifted copy of each
    assert distilled["cutmix"] == 0.5  # each copy with a box from another copy

    side = json.loads((tmp_path / "peer_compare.json").read_text())
    assert [r["setting"] for r in side["rows"]] == [
        "W4A4 rtn real", "W4A4 genie-m real", "W4A4 genie-m bn-distill", "W2A4 rtn real", "W2A4 genie-m real",
    ]  # fmt: skip
    for r in side["rows"]:
        # ours_seconds is rounded to 0.1 s, the ratio is taken before rounding
        assert r["peer_seconds"] > 0 and abs(r["time_ratio"] - r["ours_seconds"] / r["peer_seconds"]) < 0.01
    md = (tmp_path / "peer_compare.md").read_text()
    assert "Tiny CI form" in md and "| W2A4 genie-m real, layer-input | 2 |" in md
    assert "| W4A4 genie-m bn-distill, layer-input | 2 | 16 (x2 flip/shift, cutmix 0.5) |" in md
    data_free = side["rows"][2]
    assert data_free["distill_ce_weight"] == 0.0 and "BN statistics only" in md  # Genie-D's objective
    assert "Fidelity to the fp32 model on the JPEG set" in md and data_free["ours_jpeg_agree"] >= 0.0
    assert "W4A4 genie-m bn-distill at 2 iterations: top-1 agreement" in md  # the budget is named


@pytest.mark.slow
def test_data_free_seeds_each_distil_their_own_pool(ray_local, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    argv = ["--tiny", "--settings", "2", "--seeds", "0,1", "--results", str(tmp_path / "r")]
    assert _main(argv) == 0
    (side,) = json.loads((tmp_path / "r" / "peer_compare.json").read_text())["rows"]
    assert side["pool_seeds"] == [0, 1] and len(side["distill_seconds_per_pool"]) == 2
    rows = [r for r in json.loads((tmp_path / "r" / "accuracy.json").read_text()) if r["method"] == "genie-m"]
    assert {(r["seed"], r["pool_seed"]) for r in rows} == {(0, 0), (1, 1)}
    own_seconds = {r["pool_seed"]: r["distill_seconds"] for r in rows}  # each row its own pool's time
    assert [own_seconds[0], own_seconds[1]] == side["distill_seconds_per_pool"]
    assert "each seed reconstructs from its own pool" in (tmp_path / "r" / "peer_compare.md").read_text()

    # `shared` gives every seed engine seed 0's pool
    args = argparse.Namespace(
        tiny=True,
        pool=None,
        seeds=[0, 1],
        distill_pools="per-seed",
        distill_cutmix=0.5,
        distill_ce_weight=0.1,
        **peer_compare.TINY,
    )
    setup = peer_compare.tiny_setup(args)
    args.distill_pools = "shared"
    shared, extra, runs = peer_compare.distilled_calibration(setup, args)
    assert extra["pool_seeds"] == [0, 0] and len(extra["distill_seconds_per_pool"]) == 1
    assert torch.equal(shared[0], shared[1]) and [runs[s]["pool_seed"] for s in (0, 1)] == [0, 0]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("dfq-peer-pool-")] == []

    # --pool: one kept pool per seed, rerun later, reports the distillation that made each
    kept = [peer_compare.distill_pool(setup, str(tmp_path / f"kept{s}"), args, seed=s) for s in (1, 0)]
    args.pool = [path for path, _ in kept]
    reused, extra, runs = peer_compare.distilled_calibration(setup, args)
    assert torch.equal(reused[1], shared[0])  # distillation is deterministic; the pools in --seeds order
    assert not torch.allclose(reused[0], reused[1])  # engine seed s gives another pool
    assert extra["pool_seeds"] == [1, 0] and runs[0]["pool"] == args.pool[0]
    assert extra["distill_seconds_per_pool"] == [round(t, 1) for _, t in kept]
    assert runs[1]["distill_seconds"] == round(kept[1][1], 1) and "cross-entropy" in extra["distill_recipe"]
    args.pool = args.pool[:1]  # one pool for every seed
    reused, extra, _ = peer_compare.distilled_calibration(setup, args)
    assert torch.equal(reused[0], reused[1]) and extra["pool_seeds"] == [1, 1]
    (tmp_path / "kept0" / peer_compare.DISTILL_RECORD).unlink()  # a pool made elsewhere: no time to report
    args.pool = [str(tmp_path / "kept1"), str(tmp_path / "kept0")]
    _, extra, runs = peer_compare.distilled_calibration(setup, args)
    assert "distill_seconds" not in extra and "distill_seconds" not in runs[0]
    args.pool = [str(tmp_path / "kept1")] * 3
    with pytest.raises(BenchmarkError, match="3 pools for 2 seeds"):
        peer_compare.distilled_calibration(setup, args)


def test_several_seeds_give_one_row_each_and_a_mean(tmp_path, capsys) -> None:
    assert _main(["--tiny", "--settings", "4", "--seeds", "0,1", "--results", str(tmp_path)]) == 0
    rows = [r for r in json.loads((tmp_path / "accuracy.json").read_text()) if r["method"] == "genie-m"]
    assert sorted(r["seed"] for r in rows) == [0, 1]  # one row per seed: the second did not replace the first
    (side,) = json.loads((tmp_path / "peer_compare.json").read_text())["rows"]
    assert side["seeds"] == [0, 1] and len(side["ours_jpeg_per_seed"]) == 2
    assert side["ours_jpeg"] == round(sum(side["ours_jpeg_per_seed"]) / 2, 2)
    md = (tmp_path / "peer_compare.md").read_text()
    assert "mean with the range in brackets" in md
    # the table cell: mean and range, or the one value when every seed agreed
    row = {"ours_jpeg": 77.79, "ours_jpeg_per_seed": [77.77, 78.01, 77.59]}
    assert peer_compare._spread(row, "jpeg") == "77.79 (77.59-78.01)"
    assert peer_compare._spread({"ours_jpeg": 77.57, "ours_jpeg_per_seed": [77.57] * 3}, "jpeg") == "77.57"
    assert peer_compare._spread({"ours_jpeg": 80.17}, "jpeg") == "80.17"  # rows from before seeds


def test_rerunning_one_setting_keeps_the_others_in_the_table(tmp_path) -> None:
    assert _main(["--tiny", "--settings", "4", "--results", str(tmp_path)]) == 0
    assert _main(["--tiny", "--settings", "3,0", "--results", str(tmp_path)]) == 0
    side = json.loads((tmp_path / "peer_compare.json").read_text())["rows"]
    assert [r["setting"] for r in side] == [
        "W4A4 rtn real",
        "W2A4 rtn real",
        "W2A4 genie-m real",
    ]  # SETTINGS order
    assert all(r["device"] and r["date"] for r in side)
    assert _main(["--tiny", "--settings", "4", "--results", str(tmp_path)]) == 0  # replaced, not repeated
    side = json.loads((tmp_path / "peer_compare.json").read_text())["rows"]
    assert [r["setting"] for r in side] == ["W4A4 rtn real", "W2A4 rtn real", "W2A4 genie-m real"]
    assert (tmp_path / "peer_compare.md").read_text().count("| W2A4 genie-m real, layer-input |") == 1


def test_an_iters_budget_gets_its_own_row_without_a_time_ratio(tmp_path) -> None:
    """`--iters N` (e.g. Genie's published 20,000) sits beside the peer-budget row, accuracy only."""
    assert _main(["--tiny", "--settings", "4", "--results", str(tmp_path)]) == 0  # 2000 x 0.001 = 2
    assert _main(["--tiny", "--settings", "4", "--iters", "3", "--results", str(tmp_path)]) == 0
    side = json.loads((tmp_path / "peer_compare.json").read_text())["rows"]
    assert [(r["setting"], r["iters"]) for r in side] == [("W2A4 genie-m real", 2), ("W2A4 genie-m real", 3)]
    assert side[0]["time_ratio"] is not None and side[1]["time_ratio"] is None
    assert side[1]["peer_iters"] == 2000
    md = (tmp_path / "peer_compare.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| W2A4 genie-m real")]
    assert len(lines) == 2 and lines[1].endswith("| - |") and not lines[0].endswith("| - |")
    assert "Rows at 3 iterations a block" in md
    rows = json.loads((tmp_path / "accuracy.json").read_text())
    assert {r["iters"] for r in rows if r["method"] == "genie-m"} == {2, 3}  # kept apart in accuracy.json too


@pytest.mark.parametrize(
    "flag, bad",
    [("--distill-augment", "0")]
    + [("--distill-cutmix", bad) for bad in ("1", "-0.1", "x", "nan")]
    + [("--distill-ce-weight", bad) for bad in ("-1", "inf")]
    + [("--seeds", bad) for bad in ("0,0", "-1", "1,x", "")]
    + [("--pool", bad) for bad in ("/no/such/pool", ",")],
)
def test_bad_value_is_a_one_line_usage_error(flag: str, bad: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        peer_compare.main(["--tiny", flag, bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in err and repr(bad) in err
