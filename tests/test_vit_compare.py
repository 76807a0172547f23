"""benchmarks.vit_compare: the tiny CI form writes well-formed accuracy.json rows and the side-by-side files."""

from __future__ import annotations

import json

import torch

from benchmarks import report, vit_compare


def test_tiny_form_writes_rows_and_side_by_side(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert vit_compare.main(["--tiny", "--threads", "1", "--results", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)

    rows = json.loads((tmp_path / "accuracy.json").read_text())
    assert len(rows) == 2  # fp32 + one bit setting x one draw x one eval set
    for row in rows:
        missing = [f for f in report.ROW_FIELDS if f not in row]
        assert not missing, missing
        assert row["model"] == "cifar10_vit-random"
        assert row["calib"] in report.CALIB_SOURCES and row["method"] in report.METHODS
        assert 0.0 <= row["top1"] <= row["top5"] <= 100.0
        assert row["n_eval"] == 64
    fp = next(r for r in rows if r["method"] == "fp32")
    q = next(r for r in rows if r["method"] == "repq-vit")
    assert (fp["wbits"], fp["abits"], fp["n_calib"]) == (32, 32, 0)
    assert (q["wbits"], q["abits"], q["n_calib"], q["iters"], q["draw"]) == (4, 4, 64, 0, 0)
    assert q["calib_images"] == vit_compare.DRAW_SIZE == 64
    assert q["weight_rounding"] == "gptq" and q["head_rotation"] == "hadamard"
    assert q["fp_top1"] == fp["top1"] and q["seconds"] >= 0

    md = (tmp_path / "vit_compare.md").read_text()
    assert "RepQ-ViT" in md and "| W4A4 |" in md and "distill from the ViT itself" in md
    side = json.loads((tmp_path / "vit_compare.json").read_text())
    assert side["rows"] == rows and side["device"] and side["date"]
    assert side["summary"]["top1"]["W4A4"]["random-64"]["n"] == 1


def test_tiny_form_with_block_reconstruction(tmp_path):
    threads = torch.get_num_threads()
    try:
        args = ["--tiny", "--threads", "1", "--recon-iters", "3", "--results", str(tmp_path)]
        assert vit_compare.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((tmp_path / "accuracy.json").read_text())
    q = next(r for r in rows if r["method"] == "repq-vit")
    assert (q["iters"], q["n_calib"], q["draw"], q["calib_images"]) == (
        3,
        96,
        0,
        64,
    )  # 64-image grids, 96 recon
    md = (tmp_path / "vit_compare.md").read_text()
    assert "| W4A4 +recon 3 |" in md and "`+recon N` rows" in md


def test_peer_draw_size_rows_are_named_apart(tmp_path):
    """`--draw-size 32` (the peer's batch) writes rows of their own, shown in the draw-0 table; the
    default (64) rows keep the plain name and stay out of that table."""
    threads = torch.get_num_threads()
    try:
        for size in ("32", "64"):
            args = ["--tiny", "--threads", "1", "--draw-size", size, "--results", str(tmp_path)]
            assert vit_compare.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((tmp_path / "accuracy.json").read_text())
    assert sorted((r["n_calib"], r["calib_images"]) for r in rows if r["method"] == "repq-vit") == [
        (32, 32),
        (64, 64),
    ]
    md = (tmp_path / "vit_compare.md").read_text()
    table, draw0 = md.split("Draw 0 only")[0], md.split("Draw 0 only")[1].split("Fidelity")[0]
    assert "| W4A4 | 0 |" in table and "| W4A4 32-image | 0 |" in table
    assert "| W4A4 32-image |" in draw0 and "| W4A4 |" not in draw0


def test_summary_over_draws_and_peer_columns():
    base = dict(model="cifar10_vit", calib="real", method="repq-vit", n_calib=64, iters=0, n_eval=1017,
                weight_rounding="gptq", head_rotation="hadamard", calib_images=64)  # fmt: skip
    rows = [
        report.make_row(**base, dataset=vit_compare.LOSSLESS, wbits=4, abits=4, top1=t, top5=99.0,
                        fp_top1=71.88, seconds=s, draw=k)
        for k, (t, s) in enumerate([(69.0, 1.0), (70.0, 2.0), (71.0, 3.0)])
    ]  # fmt: skip
    s = vit_compare.summarise(rows, "cifar10_vit")
    assert s["top1"]["W4A4"][vit_compare.LOSSLESS] == {
        "mean": 70.0, "min": 69.0, "max": 71.0, "n": 3, "draws": [0, 1, 2],
        "by_draw": {0: 69.0, 1: 70.0, 2: 71.0},
    }  # fmt: skip
    assert s["seconds"]["W4A4"]["mean"] == 2.0
    md = vit_compare.compare_markdown(rows, "cifar10_vit")
    assert "70.00 (69.00-71.00) | 69.71 | +0.29" in md
    # rows from before the draw size was recorded calibrated on 32 images: their own line, and the
    # draw-0 table (the peer's very batch) shows only such rows
    peer_size = [{k: v for k, v in r.items() if k != "calib_images"} | {"n_calib": 32} for r in rows]
    assert report.row_key(peer_size[0]) != report.row_key(rows[0])
    md = vit_compare.compare_markdown(rows + peer_size, "cifar10_vit")
    assert "| W4A4 32-image | 0,1,2 | 70.00 (69.00-71.00) | 69.71 | +0.29 |" in md
    assert "| W4A4 32-image | 69.00 | 69.71 |" in md.split("Draw 0 only")[1]
    assert "| W4A4 | 69.00" not in md.split("Draw 0 only")[1]
    # rows from before the head rotation had none: their own line, same peer
    plain = [{k: v for k, v in r.items() if k != "head_rotation"} for r in rows]
    assert "| W4A4 unrotated | 0,1,2 | 70.00 (69.00-71.00) | 69.71 |" in vit_compare.compare_markdown(
        rows + plain, "cifar10_vit"
    )
    # rows from before GPTQ (no weight_rounding field) rounded to nearest: their own line, same peer
    old = [{k: v for k, v in r.items() if k != "weight_rounding"} for r in rows]
    assert report.row_key(old[0]) != report.row_key(rows[0])
    s = vit_compare.summarise(rows + old, "cifar10_vit")
    assert s["top1"]["W4A4"][vit_compare.LOSSLESS]["n"] == 3
    assert s["top1"]["W4A4 nearest"][vit_compare.LOSSLESS]["n"] == 3
    assert "| W4A4 nearest | 0,1,2 | 70.00 (69.00-71.00) | 69.71 |" in vit_compare.compare_markdown(
        rows + old, "cifar10_vit"
    )


def test_fidelity_table_only_for_rows_that_record_it():
    base = dict(model="cifar10_vit", calib="real", method="repq-vit", n_calib=64, n_eval=1017, top5=99.0,
                fp_top1=71.88, seconds=1.0, dataset=vit_compare.LOSSLESS, wbits=4, abits=4, top1=70.0,
                weight_rounding="gptq", head_rotation="hadamard", calib_images=64)  # fmt: skip
    rows = [report.make_row(**base, iters=0, draw=k) for k in range(2)]  # measured before fidelity
    assert "Fidelity to the fp32 model" not in vit_compare.compare_markdown(rows, "cifar10_vit")
    rows += [
        report.make_row(**base, iters=500, draw=k, fp_agree=a, fp_kl=kl)
        for k, (a, kl) in enumerate([(92.0, 0.03), (94.0, 0.02)])
    ]
    s = vit_compare.summarise(rows, "cifar10_vit")
    assert "W4A4" not in s["fidelity"]
    assert s["fidelity"]["W4A4 +recon 500"][vit_compare.LOSSLESS]["agree"]["mean"] == 93.0
    md = vit_compare.compare_markdown(rows, "cifar10_vit")
    assert "| W4A4 +recon 500 | 93.00 (92.00-94.00) | 0.0250 (0.0200-0.0300) |" in md
    assert "| W4A4 | " not in md.split("Fidelity to the fp32 model")[1].split("Notes:")[0]


def test_data_free_rows_get_their_own_section_against_real():
    base = dict(model="cifar10_vit", method="repq-vit", n_calib=64, iters=0, n_eval=1017, top5=99.0,
                fp_top1=71.88, seconds=1.0, dataset=vit_compare.LOSSLESS, wbits=4, abits=4,
                weight_rounding="gptq", head_rotation="hadamard", calib_images=64)  # fmt: skip
    rows = [report.make_row(**base, calib="real", top1=70.0, draw=k) for k in range(2)]
    rows += [
        report.make_row(**base, calib="bn-distill", top1=t, draw=k, input_grid="preprocess")
        for k, t in enumerate((66.0, 67.0))
    ]
    md = vit_compare.other_pools_markdown(rows, "cifar10_vit", "real")
    assert "### bn-distill" in md and "| W4A4 | 66.50 (66.00-67.00) | -3.50 |" in md
    # a pool's default input grid is the preprocessing's; rows fitted to the pool are named apart
    fitted = [report.make_row(**base, calib="bn-distill", top1=60.0, draw=0, input_grid="calibrated")]
    md = vit_compare.other_pools_markdown(rows + fitted, "cifar10_vit", "real")
    assert (
        "| W4A4 | 66.50 (66.00-67.00) | -3.50 |" in md and "| W4A4 calibrated-input | 60.00 | -10.00 |" in md
    )
    assert vit_compare.other_pools_markdown(rows[:2], "cifar10_vit", "real") == ""
