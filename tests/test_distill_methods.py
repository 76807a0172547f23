"""The distill path (`quant.distill`: `kd`, `nipq`) through the front door and `dfq quantize`.

The CNN is a small conv/BN/ReLU classifier trained here in a second on a synthetic 10-class task
(noisy smooth templates), so its logits are confident and near-ties are rare: low-bit rounding
visibly hurts it and training visibly helps. Everything runs a few steps on CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant
from quant import DistillSettings, QuantError
from quant.distill_losses import channel_asymmetry, kl_to_teacher, weight_asymmetry
from quant.modules import weight_layers
from quant.noise import pseudo_quantize
from quant.satnl import Saturating
from quant.stream import ImageStream, first_images

TOY_CONFIG = {
    "input_size": (3, 16, 16),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.25, 0.25, 0.25),
    "crop_pct": 1.0,
    "interpolation": "bilinear",
    "num_classes": 10,
}
TOY_SPEC = {"model": "tests.test_distill_methods:toy_cnn", "checkpoint": None, "num_classes": None}
_TRAINED: dict[str, torch.Tensor] = {}


def _templates() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return F.interpolate(torch.randn(10, 3, 4, 4, generator=g), size=16, mode="bilinear")


def toy_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of the toy task (a class's template at half strength in unit noise) and labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    return _templates()[labels] * 0.5 + torch.randn(n, 3, 16, 16, generator=g), labels


def _toy_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def toy_cnn(num_classes: int | None = None) -> tuple[nn.Module, dict]:
    """The toy classifier, trained once per session (150 Adam steps) and returned as a fresh copy."""
    with torch.random.fork_rng():  # the same toy whatever ran before
        torch.manual_seed(0)
        model = _toy_net()
    if not _TRAINED:
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        for i in range(150):
            x, y = toy_data(64, i)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        _TRAINED.update(model.state_dict())
    model.load_state_dict(_TRAINED)
    return model.eval(), dict(TOY_CONFIG)


@pytest.fixture(scope="module")
def toy() -> nn.Module:
    return toy_cnn()[0]


def _fidelity(q: nn.Module, model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(percent of `x` with the float model's top-1, mean KL(fp || q))."""
    with torch.no_grad():
        ref, out = model(x), q(x)
    return 100.0 * float((out.argmax(1) == ref.argmax(1)).float().mean()), float(kl_to_teacher(out, ref))


# -- the methods --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["kd", "nipq"])
def test_training_lowers_the_loss_against_the_float_model(method: str, toy: nn.Module) -> None:
    """At W2A2 rounding to nearest loses one in seven of the toy's decisions; a few dozen steps of
    either method must bring the held-out KL to the float model well below where training started."""
    calib, held_out = toy_data(256, 7)[0], toy_data(512, 8)[0]
    rtn = quant.quantize(toy, calib, quant.CNNSettings(wbits=2, abits=2, method="rtn"))
    start_agree, start_kl = _fidelity(rtn, toy, held_out)
    s = quant.method_settings(method, wbits=2, abits=2, steps=30, batch_size=32, lr=1e-4, lr_scale=1e-2)
    q = quant.quantize(toy, calib, s)
    agree, kl = _fidelity(q, toy, held_out)
    assert kl < 0.7 * start_kl and agree > start_agree
    assert len(q.history[method]) == 30 and all(np.isfinite(q.history[method]))
    assert ("kd/act" in q.history) == (method == "kd")  # SimLoss2: kd's, not nipq's
    assert not any(p.requires_grad for p in q.parameters())
    assert not any(getattr(m, "noise", False) for m in q.modules())  # hard quantization at the end


@pytest.mark.parametrize("method", ["kd", "nipq"])
def test_w8a8_keeps_the_float_accuracy(method: str, toy: nn.Module) -> None:
    from quant.evaluate import evaluate

    data = toy_data(512, 9)
    q = quant.quantize(
        toy, data[0][:128], quant.method_settings(method, wbits=8, abits=8, steps=8, batch_size=32)
    )
    fp, got = evaluate(toy, data, progress=False), evaluate(q, data, progress=False, reference=toy)
    assert fp["top1"] > 80 and abs(got["top1"] - fp["top1"]) <= 0.5 and got["agree"] >= 99.0


@pytest.mark.parametrize(
    "values",
    [
        {"method": "kd", "satnl": True, "rounding": "adaround"},
        {"method": "nipq", "symreg": 0.1, "init": "minmax"},
        {"method": "kd", "init": "genie-m", "init_iters": 4, "wbits": 3, "abits": 3},
    ],
)
def test_saved_model_reloads_to_identical_logits(values: dict, toy: nn.Module, tmp_path) -> None:
    settings = quant.method_settings(**{"wbits": 4, "abits": 4, "steps": 6, "batch_size": 16, **values})
    calib, x = toy_data(64, 3)[0], toy_data(16, 4)[0]
    q = quant.quantize(toy, calib, settings, model_spec=TOY_SPEC)
    if values.get("init") == "genie-m":
        assert {k for k in q.history if k.startswith("init/")}  # the reconstruction ran first
    q.save(tmp_path / "q.pt")
    loaded = quant.load(tmp_path / "q.pt")  # rebuilt from the spec
    assert loaded.settings == settings and loaded.family == "cnn" and loaded.method == values["method"]
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert any(isinstance(m, Saturating) for m in loaded.modules()) == bool(values.get("satnl"))


def test_kd_on_a_tiny_vit(tmp_path) -> None:
    from tests.test_end_to_end import tiny_vit

    vit = tiny_vit()[0]
    with torch.no_grad():
        vit.head.weight.mul_(20)  # confident logits from the random net
    g = torch.Generator().manual_seed(0)
    calib, x = torch.randn(32, 3, 32, 32, generator=g), torch.randn(16, 3, 32, 32, generator=g)
    settings = quant.method_settings("kd", wbits=4, abits=4, steps=6, batch_size=8, calib_size=16)
    q = quant.quantize(vit, calib, settings)
    assert q.family == "transformer" and len(q.history["kd"]) == 6 and len(q.history["kd/act"]) == 6
    assert all(np.isfinite(q.history["kd"]))
    q.save(tmp_path / "vit.pt")
    with torch.no_grad():
        assert torch.equal(quant.load(tmp_path / "vit.pt", model=tiny_vit()[0])(x), q(x))
        assert _fidelity(q, vit, x)[0] >= 50


# -- the options --------------------------------------------------------------------------------


def test_symreg_evens_out_the_weight_ranges(toy: nn.Module) -> None:
    assert channel_asymmetry(
        torch.tensor([[-1.0, 0.0, 1.0], [0.0, 1.0, 2.0], [-3.0, 0.0, 1.0]])
    ).tolist() == [
        0.0,
        1.0,
        -0.5,
    ]
    calib = toy_data(64, 5)[0]

    def asymmetry(symreg: float) -> float:
        s = quant.method_settings("kd", steps=30, batch_size=16, lr=5e-3, symreg=symreg)
        with torch.no_grad():
            return float(weight_asymmetry(weight_layers(quant.quantize(toy, calib, s))))

    plain, regularized = asymmetry(0.0), asymmetry(10.0)
    assert regularized < 0.5 * plain, (regularized, plain)


def test_satnl_clamps_with_learned_bounds(toy: nn.Module) -> None:
    from quant.satnl import START_QUANTILE, observe, saturate

    calib = toy_data(64, 5)[0]
    start = quant.quantize(toy, calib, quant.method_settings("kd", steps=1, satnl=True, lr=0.0, lr_scale=0.0))
    sat = [m for m in start.modules() if isinstance(m, Saturating)]
    assert len(sat) == 3 and sum(isinstance(m, nn.ReLU) for m in start.modules()) == 3  # each inside one
    assert not any(isinstance(m, Saturating) for m in toy.modules())  # the float model is untouched
    outputs, clamped_outputs = [], []
    hooks = [m.inner.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in sat]
    hooks += [m.register_forward_hook(lambda _m, _i, out: clamped_outputs.append(out)) for m in sat]
    with torch.no_grad():
        start(calib)
        bright = start(calib * 3)  # brighter than anything seen: the clamps must hold
    for h in hooks:
        h.remove()
    bounds = torch.stack([m.bound.detach() for m in sat])
    clamped = [float((out > b).float().mean()) for out, b in zip(outputs[:3], bounds, strict=True)]
    assert all(0 < c <= 1.5 * (1 - START_QUANTILE) for c in clamped)  # the top thousandth saturates
    assert torch.isfinite(bright).all() and any(
        float(o.max()) > float(b) for o, b in zip(outputs[3:], bounds)
    )
    assert all(float(o.max()) <= float(b) for o, b in zip(clamped_outputs[3:], bounds, strict=True))
    # the bounds then train with the steps' rate
    trained = quant.quantize(
        toy, calib, quant.method_settings("kd", steps=5, batch_size=16, satnl=True, lr_scale=1e-2)
    )
    moved = torch.stack([m.bound.detach() for m in trained.modules() if isinstance(m, Saturating)])
    assert not torch.allclose(moved, bounds)
    # on a plain module tree: ReLU6 and GELU too, one bound per place a shared module sits
    relu = nn.ReLU()
    net = nn.Sequential(nn.Linear(4, 4), relu, nn.Linear(4, 4), relu, nn.GELU(), nn.ReLU6())
    assert len(saturate(net)) == 4 and not any(
        type(m) in (nn.ReLU, nn.GELU, nn.ReLU6) for m in net.children()
    )
    observe(net, torch.randn(512, 4))
    assert all(torch.isfinite(m.bound) for m in net.modules() if isinstance(m, Saturating))


def test_pseudo_quantization_noise_follows_the_rounding_errors() -> None:
    torch.manual_seed(0)
    scale, zp = torch.tensor(0.1), torch.tensor(0.0)
    x = torch.randn(20000) * 0.3
    y = pseudo_quantize(x.requires_grad_(), scale, zp, -8, 7)
    inside = (x > -0.8) & (x < 0.7)
    assert torch.equal(y[~inside & (x < 0)].detach(), torch.full_like(y[~inside & (x < 0)], -0.8))
    assert torch.allclose(y[~inside & (x > 0)].detach(), torch.full_like(y[~inside & (x > 0)], 0.7))
    noise = (y - x)[inside].detach() / scale
    assert noise.abs().max() <= 0.5 + 1e-5 and noise.std() > 0.25  # ~uniform errors of a fine grid
    y.sum().backward()
    assert torch.equal(x.grad, inside.float())  # the identity inside the range, zero where truncated
    on_grid = torch.arange(-8, 8).float().repeat(100) * 0.1  # no rounding error: (almost) no noise
    assert (pseudo_quantize(on_grid, scale, zp, -9, 9) - on_grid).abs().max() <= 0.1 / 256 + 1e-6


# -- the data stream ----------------------------------------------------------------------------


def test_stream_reshuffles_each_epoch_and_counts_them() -> None:
    images = torch.arange(12.0).view(12, 1, 1, 1).expand(12, 3, 4, 4).contiguous()
    stream = ImageStream(images, batch_size=4, seed=0)
    first = torch.cat([stream.next() for _ in range(3)])[:, 0, 0, 0]
    second = torch.cat([stream.next() for _ in range(3)])[:, 0, 0, 0]
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(12))  # each image once an epoch
    assert first.tolist() != second.tolist() and stream.epochs == 2.0
    flipped = ImageStream(torch.randn(8, 3, 8, 8), batch_size=8, seed=0, flip_crop=True)
    assert flipped.next().shape == (8, 3, 8, 8)


def test_stream_reads_a_large_pool_shard_by_shard(tmp_path) -> None:
    from quant.data import build_transform, training_images
    from tests.test_reader import write_pool

    pool = write_pool(tmp_path / "pool", num_samples=24, shard_size=5)
    tf = build_transform({"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3})
    dataset = training_images(str(pool), tf, 20)
    assert len(dataset) == 20
    streamed = ImageStream(dataset, batch_size=5, seed=1, buffer=6)  # more images than the buffer
    assert not isinstance(streamed.source, torch.Tensor)
    seen = torch.cat([streamed.next() for _ in range(8)])
    assert streamed.epochs == 2.0
    expected = first_images(dataset, 20)
    matches = {int((expected == img).flatten(1).all(1).nonzero()[0]) for img in seen}
    assert matches == set(range(20))  # every pool image went by in two epochs' worth of batches
    small = ImageStream(dataset, batch_size=5, seed=1)  # fits the buffer: decoded once
    assert isinstance(small.source, torch.Tensor) and small.size == 20
    with pytest.raises(QuantError, match="asked for 30 training images"):
        training_images(str(pool), tf, 30)


# -- settings and the CLI -----------------------------------------------------------------------


def _one_line(fn) -> str:
    with pytest.raises(QuantError) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_presets_and_bad_settings() -> None:
    kd, nipq = quant.method_settings("kd"), quant.method_settings("nipq")
    assert isinstance(kd, DistillSettings) and (kd.noise, kd.act_weight, kd.rounding) == (False, 1.0, "ste")
    assert (nipq.noise, nipq.act_weight, nipq.hard_fraction) == (True, 0.0, 0.1)
    assert DistillSettings(epochs=2, batch_size=10).resolved_steps(25) == 5
    assert "not both" in _one_line(lambda: DistillSettings(steps=3, epochs=1.0))
    assert "rounding must be ste" in _one_line(lambda: DistillSettings(method="nipq", rounding="adaround"))
    assert "steps must be an integer >= 1" in _one_line(lambda: DistillSettings(steps=0))
    assert "unknown init 'best'" in _one_line(lambda: DistillSettings(init="best"))
    assert "symreg must be a finite number" in _one_line(lambda: DistillSettings(symreg=-1.0))
    assert "does not run on the distill path" in _one_line(lambda: DistillSettings(method="genie-m"))


def test_cli_kd_from_a_pool(tmp_path, toy: nn.Module) -> None:
    from launch.cli import main
    from tests.test_reader import write_pool

    pool = write_pool(tmp_path / "pool", num_samples=16, shard_size=5)
    images, labels = toy_data(32, 11)
    pixels = ((images * 0.25 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    np.savez(tmp_path / "eval.npz", images=pixels.numpy(), labels=labels.numpy())
    out = tmp_path / "q"
    argv = [
        "quantize",
        "--model",
        TOY_SPEC["model"],
        "--calib",
        str(pool),
        "--n-calib",
        "16",
        "--method",
        "kd",
    ]
    argv += [
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--symreg",
        "0.1",
        "--satnl",
        "--eval",
        str(tmp_path / "eval.npz"),
    ]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "kd" and result["iters"] == result["steps"] == 4 and result["epochs"] == 2.0
    assert result["satnl"] is True and result["symreg"] == 0.1 and result["n_calib"] == 16
    assert result["init"] == "rtn" and 0 <= result["top1"] <= 100
    loaded = quant.load(out / "quantized.pt")
    assert loaded.settings.satnl and loaded.method == "kd"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--method", "genie-m", "--steps", "5"],
            "--steps applies to the distill methods (kd, nipq), not genie-m",
        ),
        (
            ["--method", "kd", "--equalize"],
            "--equalize applies to the cnn methods (rtn, brecq, adaround, qdrop, genie-m), not kd",
        ),
        (["--method", "kd", "--augment", "2"], "--augment 2 makes fixed copies for reconstruction"),
        (["--method", "kd", "--iters", "5"], "--iters 5 sets the reconstruction of --init genie-m"),
        (["--method", "nipq", "--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
        (["--method", "kd", "--steps", "3", "--epochs", "1"], "not allowed with argument"),
        (["--method", "kd", "--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
    ],
)
def test_cli_refuses_bad_distill_flags(extra: list[str], message: str, tmp_path, capsys) -> None:
    from launch.cli import main

    out = tmp_path / "q"
    argv = ["quantize", "--model", TOY_SPEC["model"], "--calib", "noise", "--n-calib", "4", "--out", str(out)]
    assert main([*argv, *extra, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("dfq quantize: error:")
    assert not out.exists()


def test_cli_refuses_an_init_the_family_lacks(tmp_path, capsys) -> None:
    from launch.cli import main
    from tests.test_quantize import VIT_SPEC

    argv = ["quantize", "--model", VIT_SPEC["model"], "--calib", "noise", "--n-calib", "4", "--method", "kd"]
    assert main([*argv, "--init", "minmax", "--out", str(tmp_path / "q"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "dfq quantize: error: init 'minmax' is not one for a transformer: use one of rtn, repq-vit, genie-m"
    )


# -- the benchmark --------------------------------------------------------------------------------


def test_bench_distill_tiny_writes_rows(tmp_path) -> None:
    from launch.cli import main

    argv = ["bench", "distill", "--tiny", "--results", str(tmp_path), "--methods", "kd,genie-m"]
    assert main([*argv, "--init", "rtn", "--seeds", "3", "--symreg", "0.5"]) == 0
    rows = json.loads((tmp_path / "accuracy.json").read_text())
    kd = [r for r in rows if r["method"] == "kd"]
    genie = [r for r in rows if r["method"] == "genie-m"]
    assert len(kd) == len(genie) == 1 and {r["method"] for r in rows} == {"fp32", "kd", "genie-m"}
    assert kd[0]["seed"] == genie[0]["seed"] == 3 and kd[0]["iters"] == kd[0]["steps"] == 2
    assert (kd[0]["init"], kd[0]["symreg"], kd[0]["wbits"], kd[0]["abits"]) == ("rtn", 0.5, 4, 4)
    assert 0 <= kd[0]["top1"] <= 100 and kd[0]["fp_agree"] is not None
    # from genie-m: kd trains the genie-m row's model, and its seconds include that reconstruction
    argv_g = [
        *argv,
        "--seeds",
        "4",
        "--augment",
        "2",
        "--placement",
        "layer-input",
        "--results",
        str(tmp_path / "g"),
    ]
    assert main(argv_g) == 0
    rows = json.loads((tmp_path / "g" / "accuracy.json").read_text())
    kd, genie = (next(r for r in rows if r["method"] == m) for m in ("kd", "genie-m"))
    assert (kd["init"], kd["init_augment"], genie["augment"]) == ("genie-m", 2, 2)
    assert kd["placement"] == genie["placement"] == "layer-input"
    assert kd["seconds"] >= genie["seconds"] > 0
    # without genie-m's own rows, kd still starts from the reconstruction on the augmented copies
    argv_k = "bench distill --tiny --methods kd --seeds 4 --augment 2 --placement layer-input".split()
    assert main([*argv_k, "--results", str(tmp_path / "k")]) == 0
    rows = json.loads((tmp_path / "k" / "accuracy.json").read_text())
    assert {r["method"] for r in rows} == {"fp32", "kd"}
    only = next(r for r in rows if r["method"] == "kd")
    assert (only["init"], only["init_augment"]) == ("genie-m", 2)
    assert only["top1"] == kd["top1"] and only["seconds"] > 0


def test_distill_rows_are_told_apart_by_their_options() -> None:
    from benchmarks import report

    base = dict(model="m", dataset="d", wbits=4, abits=4, calib="real", method="kd", top1=1.0, iters=100)
    rtn, genie = report.make_row(**base, init="rtn"), report.make_row(**base, init="genie-m", symreg=0.1)
    assert report.row_key(rtn) != report.row_key(genie)
    assert (
        report.method_label(genie) == "kd+symreg (from genie-m)"
        and report.method_label(rtn) == "kd (from rtn)"
    )
    assert report.distill_options(report.make_row(**{**base, "method": "genie-m"})) is None


def test_a_given_start_trains_like_a_start_made_anew(toy: nn.Module) -> None:
    """`quantize(start=)` copies a genie-m model and trains it: the result equals kd's own genie-m
    start trained the same way; the start is left as it was; a start of other bits is refused."""
    calib = toy_data(64, 11)[0]
    s = quant.method_settings("kd", wbits=4, abits=4, init="genie-m", init_iters=3, steps=4, batch_size=16)
    start = quant.quantize(toy, calib, s.cnn_settings())
    before = {k: v.clone() for k, v in start.model.state_dict().items()}
    anew, given = quant.quantize(toy, calib, s), quant.quantize(toy, calib, s, start=start)
    x = toy_data(32, 12)[0]
    with torch.no_grad():
        assert torch.equal(anew(x), given(x))
        assert not torch.equal(start(x), given(x))  # it trained
    assert all(torch.equal(v, start.model.state_dict()[k]) for k, v in before.items())
    other = quant.quantize(toy, calib, quant.CNNSettings(wbits=3, abits=4, method="rtn"))
    with pytest.raises(QuantError, match="wbits 3"):
        quant.quantize(toy, calib, s, start=other)
    with pytest.raises(QuantError, match="kd / nipq"):
        quant.quantize(toy, calib, s.cnn_settings(), start=start)


def test_bench_distill_tiny_vit_starts_kd_from_repq_vit(tmp_path) -> None:
    """The ViT's baseline is the transformer path: kd trains its model, and genie-m is refused."""
    from launch.cli import main

    argv = ["bench", "distill", "--tiny", "--model", "cifar10_vit", "--results", str(tmp_path)]
    assert main([*argv, "--methods", "kd,repq-vit", "--seeds", "1"]) == 0
    rows = json.loads((tmp_path / "accuracy.json").read_text())
    kd, base = (next(r for r in rows if r["method"] == m) for m in ("kd", "repq-vit"))
    assert kd["model"] == base["model"] == "cifar10_vit-random" and kd["init"] == "repq-vit"
    assert "init_augment" not in kd and base["calib_images"] == 64 and base["iters"] == 0
    assert kd["seconds"] >= base["seconds"] > 0
    assert main([*argv, "--methods", "kd,genie-m"]) == 2
    assert main([*argv, "--methods", "kd", "--init", "minmax"]) == 2
