"""quant.integrations: each installed PTQ tool calibrated from a tiny pool written by hand (SHARDS.md).

Per tool: its W8A8 flow on the pool gives a quantized model whose outputs stay close to the float
model's on the pool's images (16 of them never calibrated on), and calibrating it on a constant
image instead gives clearly worse outputs, so the pool's images are what set its ranges.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import quant.integrations as integrations
from quant.data import build_transform, load_calibration
from quant.errors import QuantError
from quant.integrations.feed import source_loader
from tests.tiny_pools import tiny_cnn, write_image_pool

CFG = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 1.0}
N_CALIB = 32


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_pool(tmp_path_factory.mktemp("tools") / "pool")


@pytest.fixture(scope="module")
def images(pool: Path) -> torch.Tensor:
    return load_calibration(str(pool), build_transform(CFG), 48)


def _rel_error(model: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        got, ref = model(x), reference(x)
    return float((got - ref).norm() / ref.norm())


def test_registry_names_tools_and_refuses_unknown_or_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(integrations.TOOLS) == {"ort", "pt2e", "nncf", "modelopt", "inc", "mct", "aimet"}
    assert all((8, 8) in t.bits for t in integrations.TOOLS.values())
    installed = integrations.installed()
    assert installed == [
        n for n in integrations.TOOLS if importlib.util.find_spec(integrations.TOOLS[n].package)
    ]
    with pytest.raises(QuantError, match="unknown PTQ tool 'tensorrt'"):
        integrations.tool_module("tensorrt")
    monkeypatch.setattr(integrations, "is_installed", lambda name: False)
    with pytest.raises(QuantError, match=r"pip install 'dfq\[mct\]'"):
        integrations.tool_module("mct")


def test_source_loader_feeds_the_calibration_images(pool: Path, images: torch.Tensor) -> None:
    loader = source_loader(str(pool), CFG, 20, batch_size=8)
    batches = [x for x, _ in loader]
    assert [len(b) for b in batches] == [8, 8, 4] and len(loader) == 3
    torch.testing.assert_close(torch.cat(batches), images[:20], rtol=0, atol=0)  # quant's own calibration set
    torch.testing.assert_close(torch.cat([x for x, _ in loader]), images[:20], rtol=0, atol=0)  # re-iterable
    noise = torch.cat([x for x, _ in source_loader("noise", CFG, 5, batch_size=2)])
    assert noise.shape == (5, 3, 16, 16) and 0.8 < float(noise.std()) < 1.2
    given = torch.cat([x for x, _ in source_loader(images, CFG, 10, batch_size=4)])
    torch.testing.assert_close(given, images[:10], rtol=0, atol=0)
    with pytest.raises(QuantError, match="asked for 60 calibration images but .* has only 48"):
        list(source_loader(str(pool), CFG, 60, batch_size=8))
    with pytest.raises(QuantError, match="integer >= 1, got 0"):
        source_loader(str(pool), CFG, 0)
    with pytest.raises(QuantError, match="float"):
        source_loader(torch.zeros(4, 3, 16, 16, dtype=torch.uint8), CFG, 4)


def _tool(name: str):
    tool = integrations.TOOLS[name]
    pytest.importorskip(tool.package)
    return integrations.tool_module(name)


@pytest.mark.parametrize("name", list(integrations.TOOLS))
def test_w8a8_from_pool_close_to_fp_and_calibration_matters(
    name: str, pool: Path, images: torch.Tensor
) -> None:
    module = _tool(name)
    model = tiny_cnn()
    qmodel = module.quantize_int8(model, CFG, str(pool), N_CALIB, batch_size=8)
    qmodel.eval()
    with torch.no_grad():
        got, ref = qmodel(images), model(images)
    assert got.shape == ref.shape and not torch.equal(got, ref)  # quantized, not the float model
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
    assert float(cos.min()) > 0.98, (name, float(cos.min()))
    err_pool = _rel_error(qmodel, model, images)
    # calibrated on a constant image (mid-grey: 0 after Normalize), the ranges miss the pool's activations
    constant = torch.zeros(N_CALIB, 3, 16, 16)
    err_constant = _rel_error(
        module.quantize_int8(model, CFG, constant, N_CALIB, batch_size=8), model, images
    )
    assert err_constant > 3 * err_pool, (name, err_pool, err_constant)


def test_bits_outside_a_tools_flows_are_refused() -> None:
    module = _tool("ort")
    with pytest.raises(QuantError, match="ort has no W4A4 flow here: use W8A8"):
        module.quantize_int8(tiny_cnn(), CFG, "noise", 4, wbits=4, abits=4)


@pytest.mark.parametrize("name", [n for n, t in integrations.TOOLS.items() if (4, 8) in t.bits])
def test_w4a8_is_coarser_than_w8a8(name: str, pool: Path, images: torch.Tensor) -> None:
    module = _tool(name)
    model = tiny_cnn()
    err8 = _rel_error(module.quantize_int8(model, CFG, str(pool), N_CALIB, batch_size=8), model, images)
    err4 = _rel_error(
        module.quantize_int8(model, CFG, str(pool), N_CALIB, batch_size=8, wbits=4), model, images
    )
    assert 1.3 * err8 < err4 < 0.5, (name, err8, err4)  # coarser weights, still a working model


def test_mct_data_generation_gives_images_of_the_input_size() -> None:
    module = _tool("mct")
    images, seconds = module.generate_images(tiny_cnn(), CFG, 6, n_iter=2, batch_size=4)
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.float32 and seconds > 0
    assert float(images.std()) > 0.1  # optimised images, not a constant
    no_bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    with pytest.raises(QuantError, match="needs BatchNorm2d"):
        module.generate_images(no_bn, CFG, 2, n_iter=1)


def test_mct_datagen_pools_are_seeded_one_per_seed() -> None:
    """`dfq bench tools --mct-datagen N --mct-datagen-seeds ...`: each seed is one pool, the same
    seed gives the same images, and rows keep it as pool_seed."""
    _tool("mct")
    from benchmarks.tool_compare import mct_datagen_sources

    pools = mct_datagen_sources("4", tiny_cnn(), CFG, 4, 2, seeds="3,3,4")
    assert [(label, extra["pool_seed"]) for label, _, extra in pools] == [
        ("mct-datagen-4-2it", s) for s in (3, 3, 4)
    ]
    (_, a, _), (_, b, _), (_, c, _) = pools
    assert torch.equal(a, b) and not torch.equal(a, c)
