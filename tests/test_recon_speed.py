"""benchmarks.recon_speed: the Genie-style baseline is a real reconstruction (its quantizers compute
what Genie's do, and its loop trains every parameter group), and the tiny form writes the report,
with a user-written ResNet-20 (`tests.user_models`) timed beside the zoo one."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import accuracy, recon_speed
from benchmarks.recon_speed import RefActQuant, RefWeightQuant, reference_block, reference_loop


def test_weight_quantizer_starts_at_the_float_weight_and_rounds_hard_to_the_grid() -> None:
    w = torch.randn(8, 4, 3, 3)
    q = RefWeightQuant(w, bits=4)
    # AdaRound's start: h(logit) is the fractional part, so the soft weight is the weight itself
    # wherever the grid reaches it (the rounded zero point may clip an extreme value)
    t = w / q.scale.detach() + q.zero_point
    inside = (t >= 0) & (t <= 15)
    assert inside.float().mean() > 0.9
    assert torch.allclose(q().detach()[inside], w[inside], atol=1e-3)
    hard = (q.floor + (q.logit >= 0).float() + q.zero_point).clamp(0, 15)
    assert torch.allclose(hard, hard.round()) and hard.min() >= 0 and hard.max() <= 15


def test_activation_quantizer_keeps_each_element_float_or_on_the_grid() -> None:
    torch.manual_seed(0)
    q = RefActQuant(bits=4, scale=0.1)
    x = torch.rand(4096) * 2.0  # beyond the grid's 1.5 too
    out = q(x)
    kept = out == x
    on_grid = out[~kept] / 0.1
    assert 0.3 < kept.float().mean() < 0.7  # QDrop: about half stay float
    assert torch.allclose(on_grid, on_grid.round(), atol=1e-4) and on_grid.max() <= 15 + 1e-4
    out.sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs() > 0  # LSQ step learns


def test_reference_loop_trains_every_parameter_group() -> None:
    model, _ = accuracy.tiny_resnet20()
    block = model.layer1[0]
    torch.manual_seed(0)
    x = torch.relu(torch.randn(64, 16, 8, 8))
    with torch.no_grad():
        y = block(x)
    ref = reference_block(block, x)
    before = {n: p.detach().clone() for n, p in ref.named_parameters() if ".wq." in n or ".aq." in n}
    assert any(n.endswith("wq.logit") for n in before) and any(n.endswith("aq.scale") for n in before)
    losses = reference_loop(ref, x, x + 0.05 * torch.randn_like(x), y, iters=12, batch=16)
    assert len(losses) == 12 and all(v > 0 for v in losses)
    moved = {n for n, p in ref.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert moved == set(before)  # rounding logits, weight steps and activation steps all updated
    assert torch.equal(block.conv1.weight, model.layer1[0].conv1.weight)  # the float model untouched


def test_tiny_form_writes_one_row_per_block_and_compares_a_user_model(tmp_path) -> None:
    threads = torch.get_num_threads()
    variant = "tests.user_models:resnet20_variant"
    try:
        assert recon_speed.main(["--tiny", "--results", str(tmp_path), "--compare-model", variant]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "recon_speed.json").read_text())
    assert [r["unit"] for r in result["rows"]] == [f"layer{k}.{i}" for k in (1, 2, 3) for i in range(3)]
    for r in result["rows"]:
        assert r["ours_ms"] > 0 and r["reference_ms"] > 0
        assert r["ratio"] == pytest.approx(r["ours_ms"] / r["reference_ms"], rel=0.02)
    assert result["blocks_ratio"] == pytest.approx(
        result["blocks_ours_s"] / result["blocks_reference_s"], rel=0.01
    )
    assert "| **all blocks** |" in (tmp_path / "recon_speed.md").read_text()
    # the user's ResNet-20 is reconstructed block by block like the zoo one, same number of units
    c = result["comparison"]
    assert c["base"]["model"] == "cifar_resnet20-random" and c["other"]["model"] == f"{variant}-random"
    assert (c["base"]["units"], c["base"]["blocks"]) == (c["other"]["units"], c["other"]["blocks"]) == (11, 9)
    assert c["other"]["ms_per_iter"] > 0 and c["base"]["ms_per_iter"] > 0
    assert c["ratio"] == pytest.approx(c["other"]["ms_per_iter"] / c["base"]["ms_per_iter"], rel=0.01)
    assert f"## {variant}-random against cifar_resnet20-random" in (tmp_path / "recon_speed.md").read_text()


def test_compare_model_must_take_the_same_inputs(capsys) -> None:
    assert recon_speed.main(["--tiny", "--compare-model", "mobilenetv1_x0.25"]) == 2
    assert "must match" in capsys.readouterr().err


def test_bad_repetitions_is_one_line_error(capsys) -> None:
    assert recon_speed.main(["--tiny", "--reps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "recon-speed: --reps must be at least 1, got 0"
