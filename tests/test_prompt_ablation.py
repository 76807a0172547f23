"""benchmarks.prompt_ablation (`dfq bench prompts`): the tiny form builds every variant's pool through
the engine, quantizes it, and writes rows, a table whose numbers are the rows', traces and the pool
diagnostics; the pools hold the k and pairing their variants name."""

from __future__ import annotations

import json
import math
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import prompt_ablation, report
from benchmarks.errors import BenchmarkError

FIELDS = ("variant", "k", "generator", "wbits", "abits", "pool_seed", "seed", "top1", "dataset", "pool")


def _main(argv: list[str]) -> int:
    threads = torch.get_num_threads()
    try:
        return prompt_ablation.main(argv)
    finally:
        torch.set_num_threads(threads)


def pool_records(pool: Path) -> list[dict]:
    records = []
    for shard in sorted(pool.glob("*.tar")):
        with tarfile.open(shard) as tar:
            records += [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    return records


def md_cells(text: str) -> dict[tuple[str, str], tuple[float, float, float]]:
    """(variant, bits) -> (mean, min, max) from the first table of prompt_ablation.md."""
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| variant |"))
    bits = re.findall(r"(W\dA\d) \| Δ random", lines[head])
    cells = {}
    for line in lines[head + 2 :]:
        if not line.startswith("|"):
            break
        parts = [p.strip() for p in line.strip("|").split("|")]
        for j, b in enumerate(bits):
            m = re.fullmatch(r"(-?[\d.]+) \((-?[\d.]+)-(-?[\d.]+)\)", parts[1 + 2 * j])
            if m:
                cells[(parts[0], b)] = tuple(float(x) for x in m.groups())
    return cells


@pytest.mark.slow
def test_tiny_form_bn_distill_every_variant(ray_local, tmp_path) -> None:
    results, pools = tmp_path / "results", tmp_path / "pools"
    argv = ["--tiny", "--results", str(results), "--pools", str(pools), "--pool-seeds", "0", "--seeds", "0,1",
            "--bits", "W4A4", "--threads", "1", "--trace", "--diagnose", "real"]  # fmt: skip
    assert _main(argv) == 0
    data = json.loads((results / "prompt_ablation.json").read_text())
    rows = data["rows"]
    assert {r["variant"] for r in rows} == set(prompt_ablation.VARIANTS)
    assert len(rows) == len(prompt_ablation.VARIANTS) * 2  # one eval set, two quantization seeds
    for r in rows:
        assert not [f for f in (*FIELDS, *report.ROW_FIELDS) if f not in r], r
        assert r["k"] == prompt_ablation.VARIANTS[r["variant"]].k and r["generator"] == "bn-distill"
    # the pools hold what their variants say: k classes a sample, paired as named
    model = torch.load(pools / "resnet20-random.pt", weights_only=True)
    w = torch.nn.functional.normalize(model["linear.weight"].double(), dim=1)
    sim = (w @ w.T).numpy()
    pair_sim = {}
    for name, v in prompt_ablation.VARIANTS.items():
        pool = Path(next(r["pool"] for r in rows if r["variant"] == name))
        records = pool_records(pool)
        assert len(records) == 8 and all(len(set(s["class_ids"])) == v.k for s in records)
        assert all(s["pairing"] == v.pairing and s["k"] == v.k for s in records)
        if v.k == 2:
            pair_sim[name] = np.mean([sim[s["class_ids"][0], s["class_ids"][1]] for s in records])
    assert pair_sim["similar"] > pair_sim["dissimilar"]
    # the table's numbers are the rows': mean (min-max) over pools and seeds
    by_cell: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        by_cell[(r["variant"], f"W{r['wbits']}A{r['abits']}")].append(r["top1"])
    cells = md_cells((results / "prompt_ablation.md").read_text())
    assert set(cells) == set(by_cell)
    for key, (mean, lo, hi) in cells.items():
        assert (mean, lo, hi) == pytest.approx(
            (np.mean(by_cell[key]), min(by_cell[key]), max(by_cell[key])), abs=0.006
        )
    assert (results / "prompt_ablation.png").stat().st_size > 0
    # accuracy.json sees the rows, variants told apart
    acc = [r for r in json.loads((results / "accuracy.json").read_text()) if r["method"] != "fp32"]
    assert len({report.row_key(r) for r in acc}) == len(rows)
    # gradient-norm traces: one run per variant and pool, a positive tail mean, the plot
    trace = json.loads((results / "grad_norm.json").read_text())
    assert {r["variant"] for r in trace["runs"]} == set(prompt_ablation.VARIANTS)
    assert all(r["tail_mean"]["total"] > 0 and r["top1"] is not None and r["device"] for r in trace["runs"])
    assert (results / "grad_norm.png").stat().st_size > 0
    # diagnostics: every pool (the mixing variants share the single pool) and the rank correlations
    corr = data["rank_correlation"]
    assert len(data["diagnostics"]) == 5 and corr["pools"] == 5
    assert all(math.isfinite(d["frechet"]) for d in data["diagnostics"])
    assert "Spearman" in (results / "prompt_ablation.md").read_text()


@pytest.mark.slow
def test_tiny_form_diffusion_pairs_by_text_similarity(ray_local, tmp_path) -> None:
    """The paper's own ablation in miniature: the tiny SD preset, its CLIP text similarity pairing."""
    results, pools = tmp_path / "results", tmp_path / "pools"
    argv = ["--tiny", "--generator", "diffusion", "--variants", "single,similar,single+cutmix", "--bits", "W4A4",
            "--results", str(results), "--pools", str(pools), "--pool-seeds", "0", "--threads", "1"]  # fmt: skip
    assert _main(argv) == 0
    rows = json.loads((results / "prompt_ablation.json").read_text())["rows"]
    assert {(r["variant"], r["calib"]) for r in rows} == {
        ("single", "sd-single"),
        ("similar", "sd-mixup"),
        ("single+cutmix", "sd-single"),
    }
    similar = pool_records(Path(next(r["pool"] for r in rows if r["variant"] == "similar")))
    assert all(s["generator"] == "diffusion" and s["pairing"] == "similar" and len(s["class_ids"]) == 2
               for s in similar)  # fmt: skip
    assert set(md_cells((results / "prompt_ablation.md").read_text())) == {
        (v, "W4A4") for v in ("single", "similar", "single+cutmix")
    }


def test_spearman() -> None:
    assert prompt_ablation.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert prompt_ablation.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert prompt_ablation.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert prompt_ablation.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)  # ties
    assert prompt_ablation.spearman([1, 2], [1, 2]) is None
    assert prompt_ablation.spearman([1, 1, 1], [1, 2, 3]) is None


def test_markdown_marks_differences_beyond_the_spread() -> None:
    base = dict(model="m", generator="bn-distill", dataset="d", wbits=4, abits=4, device="cpu", date="x")
    rows = [{**base, "variant": "random", "top1": t} for t in (50.0, 52.0)]
    rows += [{**base, "variant": "similar", "top1": t} for t in (55.0, 57.0)]
    rows += [{**base, "variant": "k3", "top1": t} for t in (51.0, 53.0)]
    text = prompt_ablation.markdown({"rows": rows})
    assert "| similar | 56.00 (55.00-57.00) | +5.00* | 2 |" in text
    assert "| k3 | 52.00 (51.00-53.00) | +1.00 | 2 |" in text  # ranges overlap: no mark


def test_bad_input_is_one_line() -> None:
    with pytest.raises(BenchmarkError, match="unknown variant 'k4'"):
        _main(["--tiny", "--variants", "single,k4"])
    with pytest.raises(BenchmarkError, match="unknown bits 'W5A5'"):
        _main(["--tiny", "--bits", "W5A5"])
    with pytest.raises(BenchmarkError, match="needs Stable Diffusion weights"):
        _main(["--generator", "diffusion", "--sd-model", "/nonexistent/sd"])
    with pytest.raises(BenchmarkError, match="single\\+mixup mixes the CNN path's augmented copies"):
        _main(["--augment", "1"])
    with pytest.raises(BenchmarkError, match="no BatchNorm"):
        _main(["--model", "cifar10_vit", "--generator", "bn-distill"])


def test_merge_folds_runs_of_several_machines_into_one_table(tmp_path) -> None:
    """One pool seed a machine, then `--merge`: every row, pool diagnostic and traced run lands once
    in the target and the table and correlations are computed over all of them."""
    base = dict(model="m", generator="bn-distill", dataset="d", wbits=4, abits=4, seed=0, device="cpu",
                date="x", iters=10, n_calib=8, method="genie-m", calib="bn-distill")  # fmt: skip
    top1 = {("random", 0): 60.0, ("single", 0): 50.0, ("random", 1): 62.0, ("single", 1): 51.0}
    sources = []
    for seed in (0, 1):
        src = tmp_path / f"lane{seed}"
        src.mkdir()
        rows = [{**base, "variant": v, "pool_seed": seed, "pool": f"/p/{v}-s{seed}", "top1": top1[(v, seed)]}
                for v in ("random", "single")]  # fmt: skip
        diags = [{"pool": f"/p/{v}-s{seed}", "reference": "real", "frechet": 100 - top1[(v, seed)],
                  "fidelity_top1": top1[(v, seed)] / 100} for v in ("random", "single")]  # fmt: skip
        prompt_ablation.merge_rows(src / "prompt_ablation.json", rows, diags)
        runs = [{"variant": v, "pool_seed": seed, "bits": "W4A4", "dataset": "d", "units": 3,
                 "tail_mean": {"total": 1.0 / top1[(v, seed)]}, "top1": top1[(v, seed)]}
                for v in ("random", "single")]  # fmt: skip
        (src / "grad_norm.json").write_text(json.dumps(prompt_ablation.trace_summary(runs, "W4A4", rows)))
        sources.append(src)
    out = tmp_path / "merged"
    assert _main(["--results", str(out), "--merge", ",".join(map(str, sources))]) == 0
    assert _main(["--results", str(out), "--merge", str(sources[0])]) == 0  # merging again adds nothing
    data = json.loads((out / "prompt_ablation.json").read_text())
    assert len(data["rows"]) == 4 and len(data["diagnostics"]) == 4
    assert data["rank_correlation"]["pools"] == 4
    assert data["rank_correlation"]["rho"]["frechet_vs_top1"] == pytest.approx(-1.0)
    assert md_cells((out / "prompt_ablation.md").read_text())[("random", "W4A4")] == (61.0, 60.0, 62.0)
    trace = json.loads((out / "grad_norm.json").read_text())
    assert len(trace["runs"]) == 4 and trace["by_variant"]["single"]["runs"] == 2
    assert trace["spearman_norm_vs_top1"] == pytest.approx(-1.0)
    assert trace["device"] == "cpu" and all(r["device"] == "cpu" and r["date"] == "x" for r in trace["runs"])
    before = (out / "prompt_ablation.json").read_text()
    with pytest.raises(BenchmarkError, match="holds no prompt_ablation.json"):
        _main(["--results", str(out), "--merge", f"{sources[0]},{tmp_path / 'nowhere'}"])
    odd = json.loads((sources[1] / "grad_norm.json").read_text())
    (sources[1] / "grad_norm.json").write_text(json.dumps({**odd, "bits": "W2A4"}))
    with pytest.raises(BenchmarkError, match="traced W2A4"):
        _main(["--results", str(out), "--merge", ",".join(map(str, sources))])
    assert (out / "prompt_ablation.json").read_text() == before  # a refused merge writes nothing
