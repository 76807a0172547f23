"""`quant.quantize`, the front door: the CNN path end to end on tiny random CNNs (closeness at W8A8,
layer conventions, settings validation, determinism), save/load of both paths, the dispatch on the
model, the methods registry, and `dfq quantize` on a ViT."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import quant
from quant import METHODS, CNNSettings, QuantError, TransformerSettings
from quant import cnn as cnn_path
from quant.blocks import QuantBlock, QuantLayerUnit
from quant.capture import capture
from quant.modules import QuantAct, QuantConv2d, QuantLinear
from quant.zoo import REGISTRY
from tests.test_reconstruct import with_bn_stats


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    return with_bn_stats(REGISTRY["cifar_resnet20"][0]())


def _calib(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def _quantize_walked(
    model: nn.Module, calib: torch.Tensor, settings: CNNSettings
) -> tuple[quant.QuantizedModel, list[str], list[bool]]:
    """`quant.quantize` of a CNN, and the unit names and chained flags its walk was given."""
    seen: dict = {}
    real = cnn_path.walk_units

    def spy(qmodel, names, data, chained, *args, **kwargs):
        seen.update(names=list(names), chained=list(chained))
        return real(qmodel, names, data, chained, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cnn_path, "walk_units", spy)
        q = quant.quantize(model, calib, settings)
    return q, seen["names"], seen["chained"]


def test_w8a8_resnet20_stays_close_to_fp32(resnet20: nn.Module) -> None:
    x = _calib(16, seed=7)
    q = quant.quantize(resnet20, _calib(), CNNSettings(wbits=8, abits=8, iters=5))
    assert isinstance(q, quant.QuantizedModel) and q.family == "cnn" and q.method == "genie-m"
    with torch.no_grad():
        assert _cos(q(x), resnet20(x)) > 0.99
        q4 = quant.quantize(resnet20, _calib(), CNNSettings(wbits=2, abits=4, method="rtn"))
        assert _cos(q4(x), resnet20(x)) < _cos(q(x), resnet20(x))  # bits matter: the test can fail
    assert set(q.history) == {
        "conv1",
        *(f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)),
        "linear",
    }
    assert all(len(curve) == 5 for curve in q.history.values())
    assert set(q.seconds_per_iter) == set(q.history)
    assert all(v > 0 for v in q.seconds_per_iter.values())
    assert q4.history == {} and q4.seconds_per_iter == {}  # rtn does not reconstruct
    assert not any(isinstance(m, (QuantAct, QuantBlock)) for m in resnet20.modules())  # input untouched


@pytest.mark.parametrize("name", ["timm_resnet", "timm_mobilenetv2", "tv_mobilenetv2"])
def test_w8a8_other_families_stay_close(name: str, tiny_classifier: nn.Module) -> None:
    import timm
    import torchvision

    torch.manual_seed(0)  # the random init too: W8A8 closeness of a random deep net depends on it
    if name == "timm_resnet":
        model = tiny_classifier
    elif name == "timm_mobilenetv2":
        model = with_bn_stats(timm.create_model("mobilenetv2_035", num_classes=10))
    else:
        model = with_bn_stats(torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=10))
    q = quant.quantize(model, _calib(32), CNNSettings(wbits=8, abits=8, method="rtn"))
    blocks = [m for m in q.modules() if isinstance(m, QuantBlock)]
    assert len(blocks) >= 4  # the residual / inverted-residual blocks were recognised
    x = _calib(8, seed=5)
    with torch.no_grad():
        assert _cos(q(x), model(x)) > 0.99


def _wbits(unit: nn.Module) -> set[int]:
    return {m.wbits for m in unit.modules() if isinstance(m, (QuantConv2d, QuantLinear))}


@pytest.mark.parametrize("first_last", [8, 6, None])
def test_first_and_last_layers_bits(resnet20: nn.Module, first_last: int | None) -> None:
    settings = CNNSettings(wbits=3, abits=4, method="rtn", first_last_bits=first_last)
    q, names, _ = _quantize_walked(resnet20, _calib(32), settings)
    units = [q.model.get_submodule(n) for n in names]
    edge = first_last or 3
    edge_a = first_last or 4
    assert isinstance(units[0], QuantLayerUnit) and units[0].in_quant is None  # image input stays float
    assert _wbits(units[0]) == {edge} and _wbits(units[-1]) == {edge}
    assert all(_wbits(u) == {3} for u in units[1:-1])
    assert units[1].in_quant is not None and units[1].in_quant.bits == edge_a  # second layer's input
    assert units[-1].in_quant is not None and units[-1].in_quant.bits == edge_a  # classifier input
    assert units[-2].out_quant.bits == edge_a
    assert all(u.out_quant.bits == 4 for u in units[1:-2])


def test_reconstruction_targets_come_from_the_float_model(monkeypatch, resnet20: nn.Module) -> None:
    """Each unit learns to reproduce the *float model's* output from a mix of quantized and float
    inputs (QDrop): the targets must not be taken with the quantized prefix switched on."""
    calib = _calib(32)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    real = cnn_path.reconstruct_unit

    def spy(unit, x_q, x_fp, y_fp, *args, **kwargs):
        seen[kwargs.get("desc", "")] = (x_q.clone(), x_fp.clone(), y_fp.clone())
        return real(unit, x_q, x_fp, y_fp, *args, **kwargs)

    monkeypatch.setattr(cnn_path, "reconstruct_unit", spy)
    q, _, chained = _quantize_walked(resnet20, calib, CNNSettings(wbits=2, abits=4, iters=2))
    x_q, x_fp, y_fp = next(v for k, v in seen.items() if k.endswith("layer2.0"))
    feats = {}
    handle = resnet20.layer2[0].register_forward_hook(lambda m, i, o: feats.update(x=i[0], y=o))
    with torch.no_grad():
        resnet20(calib)
    handle.remove()
    torch.testing.assert_close(x_fp, feats["x"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y_fp, feats["y"], atol=1e-4, rtol=1e-4)
    assert (x_q - x_fp).abs().mean() > 1e-3  # the quantized prefix's input really differs
    # layer2.0 is fed straight by layer1.2, so its inputs were chained from that unit's outputs rather
    # than captured: they must equal what the finished quantized prefix gives
    q_in, _ = capture(q.model, q.model.get_submodule("layer2.0"), calib, outputs=False)
    torch.testing.assert_close(x_q, q_in, atol=1e-5, rtol=1e-5)
    assert chained[:3] == [False, False, True]  # conv1, layer1.0 after F.relu, layer1.1


def test_inputs_are_chained_only_when_nothing_ran_between_units() -> None:
    """A unit's quantized input may be taken from the previous unit's output only if no op ran in
    between; an in-place activation keeps the tensor object, so the version counter must be checked."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()  # fmt: skip
    q, _, chained = _quantize_walked(model, _calib(16), CNNSettings(wbits=8, abits=8, method="rtn"))
    assert chained == [False, False, True, False]  # conv0 | in-place ReLU | conv2 -> conv3 | pool
    x = _calib(4, seed=3)
    with torch.no_grad():
        assert _cos(q(x), model(x)) > 0.999


def test_layer_input_placement_keeps_identity_skips_float(resnet20: nn.Module, tmp_path) -> None:
    settings = CNNSettings(wbits=4, abits=4, iters=2, placement="layer-input")
    q, names, _ = _quantize_walked(resnet20, _calib(), settings)
    units = [q.model.get_submodule(n) for n in names]
    blocks = [u for u in units if isinstance(u, QuantBlock)]
    assert blocks and all(b.out_quant is None and b.in_quant is not None for b in blocks)
    assert all(b.float_skip for b in blocks)  # option-A shortcuts have no conv: the add sees float x
    assert units[1].in_quant.bits == 8 and all(b.in_quant.bits == 4 for b in blocks[1:])
    # quantizing the skip input too (block-output) changes the result: the option is real
    x = _calib(8, seed=9)
    other = quant.quantize(resnet20, _calib(), CNNSettings(wbits=4, abits=4, iters=2))
    with torch.no_grad():
        assert not torch.allclose(q(x), other(x))
    q.save(tmp_path / "q.pt")
    loaded = quant.load(tmp_path / "q.pt", model=REGISTRY["cifar_resnet20"][0]())
    assert loaded.settings.placement == "layer-input"
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_save_load_round_trip_gives_identical_logits(monkeypatch, resnet20: nn.Module, tmp_path) -> None:
    settings = CNNSettings(wbits=4, abits=4, iters=4)
    spec = {"model": "cifar_resnet20", "checkpoint": None, "num_classes": None}
    q = quant.quantize(resnet20, _calib(), settings, model_spec=spec)
    path = tmp_path / "q.pt"
    q.save(path)
    from quant import models

    seen = []
    real = models.load_model

    def build(spec, checkpoint=None, num_classes=None, preprocess=None):
        seen.append({"model": spec, "checkpoint": checkpoint, "num_classes": num_classes})
        assert preprocess is None  # a spec without "preprocess": the model's own config
        return real(spec, checkpoint=checkpoint, num_classes=num_classes)  # fresh random weights

    monkeypatch.setattr(models, "load_model", build)
    loaded = quant.load(path)  # the float model rebuilt from the spec: everything must come from the file
    assert seen == [spec]
    assert loaded.settings == settings and loaded.family == "cnn" and loaded.model_spec == spec
    assert loaded.history.keys() == q.history.keys()
    x = _calib(8, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
        assert torch.equal(quant.load(path, model=REGISTRY["cifar_resnet20"][0]())(x), q(x))
    assert len(seen) == 1  # a given float model is used as it is


def test_load_refuses_what_it_cannot_rebuild(resnet20: nn.Module, tmp_path) -> None:
    q = quant.quantize(resnet20, _calib(8), CNNSettings(method="rtn"))  # no model spec
    q.save(tmp_path / "q.pt")
    with pytest.raises(QuantError, match="without a model spec"):
        quant.load(tmp_path / "q.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(QuantError, match="not a quantized model file"):
        quant.load(tmp_path / "other.pt", model=resnet20)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"wbits": 1},
        {"abits": 9},
        {"wbits": 4.0},
        {"first_last_bits": 16},
        {"method": "gptq"},
        {"method": "repq-vit"},  # a transformer method
        {"placement": "everywhere"},
        {"iters": -1},
        {"method": "rtn", "iters": 5},  # rtn does not reconstruct
        {"batch_size": 0},
        {"drop_prob": 1.0},
        {"lr_alpha": -1e-3},
        {"round_weight": float("nan")},
        {"learn_weight_step": "yes"},
        {"device": "nonsense"},
    ],
)
def test_bad_config_raises(kwargs: dict) -> None:
    with pytest.raises(QuantError):
        CNNSettings(**kwargs)


def test_bad_calibration_raises(resnet20: nn.Module) -> None:
    with pytest.raises(QuantError):
        quant.quantize(resnet20, torch.empty(0, 3, 32, 32), CNNSettings(method="rtn"))


def test_same_seed_same_model_other_seed_differs(resnet20: nn.Module) -> None:
    x = _calib(8, seed=3)
    outs = []
    for seed in (0, 0, 1):
        settings = CNNSettings(wbits=2, abits=4, iters=6, seed=seed)
        with torch.no_grad():
            outs.append(quant.quantize(copy.deepcopy(resnet20), _calib(), settings)(x))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


# -- both paths: save and load ---------------------------------------------------------------------

VIT_SPEC = {"model": "tests.test_end_to_end:tiny_vit", "checkpoint": None, "num_classes": None}


def _tiny_vit() -> nn.Module:
    from tests.test_end_to_end import tiny_vit

    return tiny_vit()[0]


@pytest.mark.parametrize("iters", [2, 0])
def test_saved_vit_reloads_to_identical_logits(iters: int, tmp_path) -> None:
    """W4A4 with learned roundings (reconstruction) and without (GPTQ's hard rounding): the reloaded
    model computes exactly the saved one, rebuilt from the model spec or from a given float model
    (whose own weights must not matter)."""
    vit = _tiny_vit()
    g = torch.Generator().manual_seed(6)
    calib, x = torch.randn(16, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)
    settings = TransformerSettings(wbits=4, abits=4, iters=iters)
    q = quant.quantize(vit, calib, settings, model_spec=VIT_SPEC)
    assert q.family == "transformer" and set(q.history) == ({"blocks.0"} if iters else set())
    adas = [m.ada for m in q.modules() if isinstance(m, QuantLinear)]
    assert adas and all(a is not None and not a.soft for a in adas)  # learned / GPTQ hard rounding
    q.save(tmp_path / "vit.pt")
    other = _tiny_vit()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g))  # other float weights: all must come from the file
    with torch.no_grad():
        out = q(x)
        assert not torch.equal(out, vit(x))  # it did quantize
        for loaded in (quant.load(tmp_path / "vit.pt"), quant.load(tmp_path / "vit.pt", model=other)):
            assert loaded.settings == settings and loaded.family == "transformer"
            assert loaded.model_spec == VIT_SPEC and loaded.history.keys() == q.history.keys()
            assert not any(p.requires_grad for p in loaded.parameters())
            assert torch.equal(loaded(x), out)


# -- the dispatch ----------------------------------------------------------------------------------


def _one_line_quant_error(fn) -> str:
    with pytest.raises(QuantError) as info:
        fn()
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_dispatch_on_the_model(monkeypatch, resnet20: nn.Module) -> None:
    """Settings None: a CNN takes the CNN path with genie-m's settings, a timm ViT the transformer
    path with repq-vit's; a method name picks that method's preset."""
    from quant import api

    calls = []
    real = api.quantize_cnn

    def spy(model, calib, settings, progress, trace=None):
        calls.append(settings)
        return real(model, calib, CNNSettings(method="rtn"), progress, trace)  # not 20k iterations a unit

    monkeypatch.setattr(api, "quantize_cnn", spy)
    q = quant.quantize(resnet20, _calib(4))
    assert calls == [CNNSettings()] and calls[0].method == "genie-m" and calls[0].iters == 20000
    assert q.family == "cnn" and q.method == "genie-m" and q.settings == CNNSettings()
    monkeypatch.undo()

    rtn = quant.quantize(resnet20, _calib(4), "rtn")
    assert rtn.family == "cnn" and rtn.settings == CNNSettings(method="rtn") and rtn.settings.iters == 0
    vit = _tiny_vit()
    calib = _calib(4)
    qvit = quant.quantize(vit, calib)
    assert qvit.family == "transformer" and qvit.method == "repq-vit"
    assert qvit.settings == TransformerSettings() and qvit.calibration_seconds > 0
    assert quant.quantize(vit, calib, "repq-vit").settings == TransformerSettings()


def test_dispatch_refusals_are_one_line(resnet20: nn.Module) -> None:
    vit, x = _tiny_vit(), _calib(4)
    assert "CNNSettings" in _one_line_quant_error(lambda: quant.quantize(vit, x, CNNSettings(method="rtn")))
    assert "'rtn' is for cnns" in _one_line_quant_error(lambda: quant.quantize(vit, x, "rtn"))
    assert "'genie-m' is for cnns" in _one_line_quant_error(
        lambda: quant.quantize(vit, x, quant.settings_for("transformer", "genie-m"))
    )
    assert "TransformerSettings" in _one_line_quant_error(
        lambda: quant.quantize(resnet20, x, TransformerSettings())
    )
    assert "'repq-vit' is for transformers" in _one_line_quant_error(
        lambda: quant.quantize(resnet20, x, "repq-vit")
    )
    assert "unknown method 'gptq'" in _one_line_quant_error(lambda: quant.quantize(resnet20, x, "gptq"))
    no_layers = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.ReLU())
    assert "no conv or linear" in _one_line_quant_error(lambda: quant.quantize(no_layers, x))
    assert "no conv or linear" in _one_line_quant_error(lambda: quant.model_family(no_layers))


# -- the methods registry --------------------------------------------------------------------------


def test_cli_method_choices_come_from_the_registry(monkeypatch, capsys) -> None:
    from launch.cli import main
    from quant.methods import Method

    with pytest.raises(SystemExit) as info:
        main(["quantize", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert set(METHODS) == {"rtn", "brecq", "adaround", "qdrop", "genie-m", "repq-vit", "kd", "nipq"}
    assert "{" + ",".join(METHODS) + "}" in " ".join(text.split())  # the --method choices, all of them
    # a method registered later is offered too: the CLI builds its choices from the registry
    monkeypatch.setitem(METHODS, "test-preset", Method("test-preset", "cnn", "a test preset", {"iters": 0}))
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    choices = "{" + ",".join(METHODS) + "}"  # the description lists the methods too: check the choices
    assert choices.endswith(",test-preset}") and choices in " ".join(capsys.readouterr().out.split())


def test_cnn_presets_yield_the_settings_they_promise() -> None:
    expected = {
        # method: (iters, drop_prob, learn_weight_step, round_weight)
        "rtn": (0, 0.0, False, 0.0),
        "brecq": (20000, 0.0, False, 0.01),
        "adaround": (20000, 0.0, False, 0.01),
        "qdrop": (20000, 0.5, False, 0.01),
        "genie-m": (20000, 0.5, True, 1.0),
    }
    assert {n for n, m in METHODS.items() if m.family == "cnn"} == set(expected)
    for name, (iters, drop, learn, weight) in expected.items():
        for settings in (
            quant.method_settings(name),
            CNNSettings(method=name),
            quant.settings_for("cnn", name),
        ):
            assert isinstance(settings, CNNSettings) and settings.method == name
            got = (settings.iters, settings.drop_prob, settings.learn_weight_step, settings.round_weight)
            assert got == (iters, drop, learn, weight), name
            recon = settings.recon_settings()  # what reconstruction runs with
            assert (recon.drop_prob, recon.learn_wscale, recon.round_weight) == (drop, learn, weight)
    assert CNNSettings() == quant.method_settings("genie-m")  # the CNN default
    transformer = quant.method_settings("repq-vit")
    assert isinstance(transformer, TransformerSettings) and transformer.iters == 0
    # values given explicitly win over the preset
    assert quant.method_settings("qdrop", iters=7, drop_prob=0.25).iters == 7
    assert CNNSettings(method="qdrop", drop_prob=0.25).drop_prob == 0.25
    assert CNNSettings(method="genie-m", learn_weight_step=False).learn_weight_step is False
    with pytest.raises(QuantError, match="unknown method 'nope'"):
        quant.method_settings("nope")
    with pytest.raises(QuantError, match="CNNSettings has no setting 'calib_size'"):
        quant.method_settings("qdrop", calib_size=8)


# -- `dfq quantize` on a transformer ---------------------------------------------------------------


def test_cli_quantizes_a_vit_and_saves_what_it_evaluated(monkeypatch, tmp_path) -> None:
    """`dfq quantize` on a ViT writes a `quantized.pt` that `quant.load` reads back (rebuilding the float
    model from the spec) to exactly the logits of the model the run evaluated."""
    import numpy as np

    from launch.cli import main
    from quant import evaluate

    g = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, images=g.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), labels=np.arange(12) % 10)
    evaluated = []
    real = evaluate.evaluate

    def spy(model, *args, **kwargs):
        evaluated.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate", spy)
    out = tmp_path / "q"
    argv = ["quantize", "--model", VIT_SPEC["model"], "--calib", str(data), "--n-calib", "12"]
    argv += ["--calib-size", "8", "--eval", str(data), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["family"] == "transformer" and result["method"] == "repq-vit+rot+gptq"
    assert result["calib_images"] == 8 and result["iters"] == 0 and result["n_eval"] == 12
    run_model = evaluated[-1]  # evaluated against the float model, which was evaluated first
    assert isinstance(run_model, quant.QuantizedModel) and len(evaluated) == 2
    loaded = quant.load(out / "quantized.pt")
    preprocess = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0}
    preprocess["interpolation"] = "bilinear"  # the run's own, so a rebuild needs no flags
    assert loaded.model_spec == {**VIT_SPEC, "preprocess": preprocess}
    assert loaded.settings == run_model.settings
    assert loaded.settings.calib_size == 8
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), run_model(x))
    from quant.data import build_transform, open_dataset

    dataset = open_dataset(str(data), build_transform(_tiny_vit_config()))
    again = real(loaded, dataset, batch_size=256, progress=False, reference=_tiny_vit())  # as the run did
    assert (again["top1"], again["agree"], again["kl"]) == (
        result["top1"],
        result["fp_agree"],
        result["fp_kl"],
    )


def _tiny_vit_config() -> dict:
    from tests.test_end_to_end import tiny_vit

    return tiny_vit()[1]


def test_cli_refuses_a_cnn_flag_on_a_vit(tmp_path, capsys) -> None:
    from launch.cli import main

    out = tmp_path / "q"
    argv = ["quantize", "--model", VIT_SPEC["model"], "--calib", "noise", "--n-calib", "4", "--out", str(out)]
    assert main([*argv, "--placement", "layer-input", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dfq quantize: error: --placement applies to cnns; {VIT_SPEC['model']} is a transformer"
    assert not out.exists()  # refused before any work
