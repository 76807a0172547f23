"""Sample selection (`quant.select`, `dfq quantize --select`): the energy filter keeps the lowest
free energies, the BN-sensitivity filter keeps a subset whose BN statistics are closer to the running
ones than random or inverted choices, class balance keeps each class's share, and the CLI records the
choice and refuses bad combinations in one line."""

from __future__ import annotations

import json

import pytest
import torch

import quant
from engine.bn_distill_loss import bn_stats_loss
from quant.select import bn_distance, class_quotas, energy_scores, select_samples
from tests.test_end_to_end import tiny_bn_cnn
from tests.tiny_pools import write_image_pool

MODEL = "tests.test_end_to_end:tiny_bn_cnn"


def _pool_images(n: int = 60, seed: int = 0) -> torch.Tensor:
    """Images like the BN statistics' data, a third of them off (brighter, higher contrast)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.7 + 0.2
    off = torch.arange(n) % 3 == 0
    x[off] = x[off] * 2.5 + 1.0
    return x


def test_energy_keeps_the_lowest_free_energies() -> None:
    model, _ = tiny_bn_cnn()
    x = _pool_images()
    with torch.no_grad():
        direct = -torch.logsumexp(model(x).double(), dim=1)
    assert torch.allclose(energy_scores(model, x, batch_size=7), direct, atol=1e-5)
    chosen = select_samples(model, x, 20, "energy")
    assert chosen.indices.tolist() == sorted(torch.argsort(direct)[:20].tolist())
    assert chosen.n_scored == 60 and chosen.method == "energy"
    s = chosen.summary
    # the summary is rounded to 4 decimals
    assert s["energy_kept_max"] <= float(direct[~torch.isin(torch.arange(60), chosen.indices)].min()) + 1e-4
    assert s["energy_kept_max"] == pytest.approx(float(direct[chosen.indices].max()), abs=1e-4)
    assert s["energy_kept_mean"] < s["energy_first_mean"]


def test_bn_distance_is_the_bn_distill_loss() -> None:
    model, _ = tiny_bn_cnn()
    x = _pool_images(24)
    with torch.no_grad():
        assert bn_distance(model, x, batch_size=5) == pytest.approx(float(bn_stats_loss(model, x)), rel=1e-4)


def test_bn_sensitivity_beats_random_and_inverted_subsets() -> None:
    model, _ = tiny_bn_cnn()
    x = _pool_images()
    n = 20
    chosen = select_samples(model, x, n, "bn-sensitivity")
    kept = bn_distance(model, x[chosen.indices])
    assert chosen.summary["bn_distance_kept"] == pytest.approx(kept, rel=1e-6)
    assert chosen.summary["bn_distance_first"] == pytest.approx(bn_distance(model, x[:n]), rel=1e-6)
    g = torch.Generator().manual_seed(1)
    randoms = [bn_distance(model, x[torch.randperm(len(x), generator=g)[:n]]) for _ in range(20)]
    assert kept < min(randoms)
    # inverted: the n samples GenQ's one-shot sensitivity ranks worst
    with torch.no_grad():
        full = bn_distance(model, x)
        sens = torch.tensor([full - bn_distance(model, x[torch.arange(len(x)) != i]) for i in range(len(x))])
    assert kept < bn_distance(model, x[torch.argsort(sens, descending=True)[:n]])


def test_class_quotas_are_shares_by_largest_remainder() -> None:
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    assert class_quotas(labels, 5) == {0: 3, 1: 2, 2: 0}  # 3.0, 1.5, 0.5: the tie goes to label 1
    assert class_quotas(labels, 10) == {0: 6, 1: 3, 2: 1}
    assert sum(class_quotas(torch.randint(0, 7, (97,)), 31).values()) == 31


@pytest.mark.parametrize("method", ["energy", "bn-sensitivity"])
def test_balance_keeps_each_class_share(method: str) -> None:
    model, _ = tiny_bn_cnn()
    x = _pool_images()
    labels = torch.arange(60) % 3  # class 0 is exactly the off third: an unbalanced pick skews it
    free = select_samples(model, x, 21, method, labels=labels)
    chosen = select_samples(model, x, 21, method, labels=labels, balance=True)
    assert torch.bincount(labels[chosen.indices]).tolist() == [7, 7, 7]
    assert torch.bincount(labels[free.indices], minlength=3).tolist() != [7, 7, 7]
    if method == "energy":  # within a class, still the lowest energies
        e = energy_scores(model, x)
        for c in range(3):
            members = torch.nonzero(labels == c).flatten()
            assert set(chosen.indices[labels[chosen.indices] == c].tolist()) == set(
                members[torch.argsort(e[members])[:7]].tolist()
            )


def test_api_refusals() -> None:
    model, _ = tiny_bn_cnn()
    x = _pool_images(8)
    with pytest.raises(quant.QuantError, match="unknown selector 'best'"):
        select_samples(model, x, 4, "best")
    with pytest.raises(quant.QuantError, match="cannot keep 9 of 8"):
        select_samples(model, x, 9)
    with pytest.raises(quant.QuantError, match="labels"):
        select_samples(model, x, 4, balance=True)
    no_bn = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(quant.QuantError, match="BatchNorm"):
        select_samples(no_bn, x, 4, "bn-sensitivity")


# ------------------------------------------------------------------------------------------ CLI
def _argv(pool, out, *extra: str) -> list[str]:
    return ["quantize", "--model", MODEL, "--calib", str(pool), "--method", "rtn", "--out", str(out),
            "--no-progress", *extra]  # fmt: skip


def test_cli_quantizes_on_the_selection_and_records_it(monkeypatch, tmp_path, capsys) -> None:
    from launch.cli import main
    from quant.data import build_transform, load_calibration

    pool = write_image_pool(tmp_path / "pool", num_samples=48)
    seen: dict = {}
    real = quant.quantize

    def spy(model, calib, settings, **kwargs):
        seen["calib"] = calib.clone()
        return real(model, calib, settings, **kwargs)

    monkeypatch.setattr(quant, "quantize", spy)
    out = tmp_path / "q"
    assert main(_argv(pool, out, "--n-calib", "12", "--select", "energy", "--oversample", "3")) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["select"] == "energy" and result["oversample"] == 3.0 and result["n_scored"] == 36
    assert result["n_calib"] == 12 and result["select_balance"] is False
    assert set(result["select_summary"]) >= {"energy_pool_mean", "energy_first_mean", "energy_kept_mean"}

    model, config = tiny_bn_cnn()
    pool_images = load_calibration(str(pool), build_transform(config), 36)
    expected = pool_images[torch.sort(torch.argsort(energy_scores(model, pool_images))[:12]).values]
    assert torch.equal(seen["calib"], expected)

    assert main(_argv(pool, tmp_path / "b", "--n-calib", "10", "--select", "bn-sensitivity",
                      "--oversample", "2.5", "--select-balance")) == 0  # fmt: skip
    result = json.loads((tmp_path / "b" / "result.json").read_text())
    assert result["n_scored"] == 25 and result["select_balance"] is True
    assert result["select_summary"]["bn_distance_kept"] < result["select_summary"]["bn_distance_first"]

    assert main(_argv(pool, tmp_path / "n", "--n-calib", "4")) == 0
    result = json.loads((tmp_path / "n" / "result.json").read_text())
    assert result["select"] is None and result["oversample"] == 1.0
    capsys.readouterr()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--select", "energy"], "--oversample R > 1"),
        (["--oversample", "2"], "give --select"),
        (["--select-balance"], "--select-balance applies to --select"),
        (["--select", "energy", "--oversample", "0.5"], "'0.5'"),
        (["--select", "best", "--oversample", "2"], "'best'"),
        (["--select", "energy", "--oversample", "5"], "scores 50 images but"),
        (["--select", "energy", "--oversample", "2", "--calib", "noise"], "not noise"),
        (["--select", "bn-sensitivity", "--oversample", "2", "--model", "tests.test_end_to_end:tiny_vit"],
         "needs BatchNorm layers"),
    ],
)  # fmt: skip
def test_cli_refuses_bad_selection_in_one_line(extra: list[str], needle: str, tmp_path, capsys) -> None:
    from launch.cli import main

    pool = write_image_pool(tmp_path / "pool", num_samples=48)
    out = tmp_path / "q"
    assert main([*_argv(pool, out, "--n-calib", "10"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()
