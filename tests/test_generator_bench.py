"""benchmarks.generator_compare: the tiny form generates a pool with each generator through the engine,
quantizes it and writes rows keyed by pool seed and variant, and a summary with the mean over pools."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import generator_compare, report
from benchmarks.errors import BenchmarkError


def _main(argv: list[str]) -> int:
    threads = torch.get_num_threads()
    try:
        return generator_compare.main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_tiny_form_rows_per_pool_and_generator(ray_local, tmp_path) -> None:
    argv = ["--tiny", "--results", str(tmp_path), "--pool-seeds", "0,1", "--bits", "W4A4", "--threads", "1"]
    assert _main(argv) == 0
    rows = [r for r in json.loads((tmp_path / "accuracy.json").read_text()) if r["method"] != "fp32"]
    assert {(r["calib"], r["pool_seed"]) for r in rows} == {
        (g, s) for g in ("bn-distill", "enhancing-dfq") for s in (0, 1)
    }
    for row in rows:
        assert not [f for f in report.ROW_FIELDS if f not in row]
        assert row["gen_seconds"] > 0 and row["variant"] == "default" and row["method"] == "genie-m"
    summary = json.loads((tmp_path / "generators.json").read_text())["rows"]
    assert {s["generator"] for s in summary} == {"bn-distill", "enhancing-dfq"}
    for s in summary:
        assert s["pools"] == 2 and s["top1_min"] <= s["top1_mean"] <= s["top1_max"]
    assert "| enhancing-dfq | default |" in (tmp_path / "generators.md").read_text()


@pytest.mark.slow
def test_k_labels_the_rows_and_reaches_the_pool(ray_local, tmp_path) -> None:
    """`--k 1`: enhancing-dfq pools without class mixing, rows told apart by the variant `k1`."""
    pools = tmp_path / "pools"
    argv = ["--tiny", "--results", str(tmp_path), "--generators", "enhancing-dfq", "--pool-seeds", "0",
            "--bits", "W4A4", "--threads", "1", "--k", "1", "--pools", str(pools)]  # fmt: skip
    assert _main(argv) == 0
    rows = [r for r in json.loads((tmp_path / "accuracy.json").read_text()) if r["method"] != "fp32"]
    assert rows and {(r["variant"], r["k"]) for r in rows} == {("k1", 1)}
    (pool,) = pools.glob("*-enhancing-dfq-k1-*")
    assert json.loads((pool / generator_compare.GEN_RECORD).read_text())["k"] == 1


def test_rows_of_different_pools_do_not_replace_each_other(tmp_path) -> None:
    base = dict(model="m", dataset="d", wbits=4, abits=4, calib="enhancing-dfq", method="genie-m", top1=1.0,
                iters=2, n_calib=8, variant="default", gen_iterations=4)  # fmt: skip
    rows = [report.make_row(**base, pool_seed=s) for s in (0, 1)]
    merged = report.merge_rows(tmp_path / "accuracy.json", rows)
    assert len(merged) == 2


def test_overrides_and_bad_input() -> None:
    assert generator_compare.parse_overrides("mixer=false,sim_weight=0.5,iterations=10,layers=a") == {
        "mixer": False, "sim_weight": 0.5, "iterations": 10, "layers": "a",
    }  # fmt: skip
    with pytest.raises(BenchmarkError, match="not key=value"):
        generator_compare.parse_overrides("mixer")
    with pytest.raises(BenchmarkError, match="'gan'"):
        _main(["--tiny", "--generators", "gan"])
    with pytest.raises(BenchmarkError, match="no BatchNorm"):
        _main(["--model", "cifar10_vit", "--generators", "bn-distill"])


def test_selection_runs_each_selector_and_the_first_images_of_one_pool(tmp_path) -> None:
    import argparse

    from quant.data import load_calibration
    from quant.select import select_samples
    from tests.tiny_pools import write_image_pool

    p = argparse.ArgumentParser()
    generator_compare.add_arguments(p)
    args = p.parse_args(
        ["--tiny", "--select", "energy,bn-sensitivity", "--oversample", "2.5", "--images", "6"]
    )
    assert generator_compare.pool_images(args) == 15
    bench = generator_compare.Bench(args, tmp_path)
    pool = write_image_pool(tmp_path / "pool", num_samples=20, size=32)
    choices = bench.choices(pool, args)
    images = load_calibration(str(pool), bench.transform, 15)
    assert list(choices) == ["none", "energy", "bn-sensitivity"]
    assert torch.equal(choices["none"][0], images[:6])
    for name in ("energy", "bn-sensitivity"):
        kept, fields = choices[name]
        assert torch.equal(kept, images[select_samples(bench.model, images, 6, name).indices])
        assert fields["select"] == name and fields["oversample"] == 2.5 and fields["n_scored"] == 15
    assert not torch.equal(choices["energy"][0], choices["none"][0])
    # rows of one pool and bits with and without selection are distinct measurements
    base = dict(model="m", dataset="d", wbits=4, abits=4, calib="enhancing-dfq", method="genie-m", top1=1.0,
                iters=2, n_calib=6, variant="default", gen_iterations=4, pool_seed=0)  # fmt: skip
    rows = [report.make_row(**base)] + [report.make_row(**base, **fields) for _, fields in choices.values()]
    assert len(report.merge_rows(tmp_path / "accuracy.json", rows)) == 4
    labels = [generator_compare.selection_label(r) for r in rows]
    assert labels == ["-", "none of 2.5x", "energy of 2.5x", "bn-sensitivity of 2.5x"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--select", "energy"], "go together"),
        (["--oversample", "2"], "go together"),
        (["--select", "best", "--oversample", "2"], "'best'"),
        (["--model", "cifar10_vit", "--generators", "enhancing-dfq", "--select", "bn-sensitivity",
          "--oversample", "2"], "no BatchNorm"),
    ],
)  # fmt: skip
def test_selection_refusals(argv: list[str], needle: str) -> None:
    with pytest.raises(BenchmarkError, match=needle):
        _main(["--tiny", *argv])
