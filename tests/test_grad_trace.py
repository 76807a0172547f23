"""The gradient-norm trace of block reconstruction (`quant.grad_trace`, `dfq quantize
--trace-grad-norm`): it records the gradient norms the optimiser really steps on, one series per
reconstructed unit, and never changes the quantized model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import quant
from quant import CNNSettings, QuantError
from quant import reconstruct as recon_module
from quant.grad_trace import (
    ROUNDING_DATA,
    SERIES,
    TOTAL,
    TOTAL_DATA,
    load_trace,
    plot_trace_comparison,
    save_trace,
    summarize,
)
from tests.test_end_to_end import tiny_bn_cnn, tiny_vit

ITERS = 12


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    return tiny_bn_cnn()[0]


def _calib(n: int = 32, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _check_trace(trace: dict, units: list[str], iters: int, groups: set[str]) -> None:
    """Well formed: one unit entry per reconstructed unit, in order, each series `iters` long,
    finite and non-negative, the totals = the groups' norms combined, `rounding_data` = `rounding`
    during the warm-up (no regulariser yet), tail means as defined; `groups` are those some unit has
    (a unit without activation quantizers has no `act_step`)."""
    json.loads(json.dumps(trace))  # plain JSON
    assert trace["format"] == "dfq-grad-norm/1" and trace["tail_fraction"] == 0.1
    assert [u["name"] for u in trace["units"]] == units
    tail, warm = math.ceil(0.1 * iters), math.ceil(0.2 * iters)
    series = groups | {ROUNDING_DATA, TOTAL, TOTAL_DATA}
    for u in trace["units"]:
        s = u["series"]
        assert set(s) <= series and {"rounding", ROUNDING_DATA, TOTAL, TOTAL_DATA} <= set(s)
        assert u["iters"] == iters
        for values in s.values():
            assert len(values) == iters and all(math.isfinite(v) and v >= 0 for v in values)
        for i in range(iters):
            combined = math.sqrt(sum(s[g][i] ** 2 for g in groups & set(s)))
            assert s[TOTAL][i] == pytest.approx(combined, rel=1e-5)
            data = [ROUNDING_DATA, *({"weight_step", "act_step"} & set(s))]
            assert s[TOTAL_DATA][i] == pytest.approx(math.sqrt(sum(s[g][i] ** 2 for g in data)), rel=1e-5)
        assert s[ROUNDING_DATA][:warm] == s["rounding"][:warm]
        for g, values in s.items():
            assert u["tail_mean"][g] == pytest.approx(sum(values[-tail:]) / tail)
    assert set().union(*(u["series"] for u in trace["units"])) == series
    assert trace["groups"] == [g for g in SERIES if g in series]
    assert any(v > 0 for u in trace["units"] for v in u["series"][TOTAL])
    overall = trace["summary"]["tail_mean"]
    assert overall[TOTAL] == pytest.approx(sum(u["tail_mean"][TOTAL] for u in trace["units"]) / len(units))
    assert trace["summary"]["units"] == len(units)


def test_trace_leaves_the_quantized_model_unchanged(cnn: nn.Module) -> None:
    settings = CNNSettings(wbits=3, abits=4, iters=ITERS, seed=5)
    plain = quant.quantize(cnn, _calib(), settings)
    traced = quant.quantize(cnn, _calib(), settings, trace_grad_norm=True)
    assert plain.grad_norm is None
    a, b = plain.model.state_dict(), traced.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert plain.history == traced.history
    _check_trace(traced.grad_norm, list(traced.history), ITERS, {"rounding", "weight_step", "act_step"})


def test_trace_records_the_gradients_the_optimiser_steps_on(monkeypatch, cnn: nn.Module) -> None:
    """Each recorded norm equals the norm of the gradients the Adam steps read at that iteration
    (the roundings' optimiser holds the rounding group, the steps' optimiser the two step groups),
    and `rounding_data` the norm of the reconstruction term's own gradient of the roundings."""
    seen: list[float] = []
    data: list[float] = []
    optimisers: list = []
    real_adam, real_loss = recon_module.LoopAdam, recon_module.reconstruction_loss

    class Spy(real_adam):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            optimisers.append(self)

        def step(self, lr_scale: float = 1.0) -> None:
            grads = [p.grad for p in self.params if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            super().step(lr_scale)

    def loss_spy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        rec = real_loss(pred, target)
        alphas = optimisers[-2].params  # this unit's rounding optimiser (created before the steps')
        grads = torch.autograd.grad(rec, alphas, retain_graph=True)
        data.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return rec

    monkeypatch.setattr(recon_module, "LoopAdam", Spy)
    monkeypatch.setattr(recon_module, "reconstruction_loss", loss_spy)
    iters = 10
    settings = CNNSettings(wbits=4, abits=4, iters=iters, round_weight=1.0)
    q = quant.quantize(cnn, _calib(), settings, trace_grad_norm=True)
    units = q.grad_norm["units"]
    assert len(seen) == 2 * iters * len(units) and len(data) == iters * len(units)
    for k, u in enumerate(units):
        s = u["series"]
        for i in range(iters):
            alpha, scales = seen[2 * (k * iters + i) : 2 * (k * iters + i) + 2]
            assert s["rounding"][i] == pytest.approx(alpha, rel=1e-5)
            steps = math.hypot(s["weight_step"][i], s.get("act_step", [0.0] * iters)[i])
            assert steps == pytest.approx(scales, rel=1e-5)
            # the regulariser's gradient is taken out of the float32 total: exact to its resolution
            tolerance = 1e-6 * s["rounding"][i] + 1e-4 * data[k * iters + i]
            assert s[ROUNDING_DATA][i] == pytest.approx(data[k * iters + i], abs=tolerance)
        # after the warm-up the regulariser's gradient is in `rounding` and not in `rounding_data`
        assert any(abs(a - b) > 1e-3 * a for a, b in zip(s["rounding"][2:], s[ROUNDING_DATA][2:]))


def test_groups_follow_the_method_and_the_vit_path_traces_its_blocks(cnn: nn.Module) -> None:
    q = quant.quantize(cnn, _calib(16), CNNSettings(method="adaround", iters=5), trace_grad_norm=True)
    _check_trace(q.grad_norm, list(q.history), 5, {"rounding", "act_step"})  # no learned weight step

    vit, _ = tiny_vit()
    settings = quant.TransformerSettings(wbits=4, abits=4, iters=3, calib_size=8)
    qv = quant.quantize(vit, _calib(8), settings, trace_grad_norm=True)
    assert list(qv.history) == ["blocks.0"]
    _check_trace(qv.grad_norm, ["blocks.0"], 3, {"rounding", "weight_step", "act_step"})


def test_cli_writes_the_trace_its_plot_and_the_summary(tmp_path, capsys) -> None:
    from launch.cli import main

    out = tmp_path / "run"
    argv = ["quantize", "--model", "tests.test_end_to_end:tiny_bn_cnn", "--calib", "noise", "--n-calib", "16"]
    assert main([*argv, "--iters", "6", "--trace-grad-norm", "--out", str(out), "--no-progress"]) == 0
    trace = json.loads((out / "grad_norm.json").read_text())
    result = json.loads((out / "result.json").read_text())
    _check_trace(trace, [u["name"] for u in trace["units"]], 6, {"rounding", "weight_step", "act_step"})
    assert len(trace["units"]) == 3  # two convs and the classifier
    assert result["grad_norm"] == str(out / "grad_norm.json")
    assert result["grad_norm_tail"] == pytest.approx(trace["summary"]["tail_mean"][TOTAL])
    assert (out / "grad_norm.png").read_bytes()[:4] == b"\x89PNG"

    elsewhere = tmp_path / "traces" / "a.json"
    assert (
        main([*argv, "--iters", "2", "--trace-grad-norm", str(elsewhere), "--out", str(out), "--no-progress"])
        == 0
    )
    assert load_trace(elsewhere)["units"] and elsewhere.with_suffix(".png").exists()
    capsys.readouterr()

    assert main([*argv, "--method", "rtn", "--trace-grad-norm", "--out", str(tmp_path / "rtn")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--trace-grad-norm" in err and "--iters" in err
    assert not (tmp_path / "rtn").exists()


def test_comparison_plot_and_summary(tmp_path) -> None:
    def fake(level: float) -> dict:
        units = [
            {
                "name": f"u{k}",
                "iters": 20,
                "series": {"rounding": [level * (k + 1)] * 20, TOTAL: [level * (k + 1)] * 20},
            }
            for k in range(3)
        ]
        return summarize({"format": "dfq-grad-norm/1", "units": units})

    low = save_trace(fake(0.5), tmp_path / "low.json")
    summary = plot_trace_comparison({"mixup": low, "single": fake(2.0)}, tmp_path / "cmp.png")
    assert summary == {"mixup": pytest.approx(1.0), "single": pytest.approx(4.0)}
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(QuantError, match="not a dfq-grad-norm/1 trace"):
        plot_trace_comparison({"bad": {"units": []}}, tmp_path / "x.png")
    with pytest.raises(QuantError, match="no traces"):
        plot_trace_comparison({}, tmp_path / "x.png")
