"""Optional block reconstruction on top of the RepQ-ViT calibration (quant.vit.reconstruct), tiny models."""

from __future__ import annotations

import pytest
import torch

import quant
from quant import CNNSettings, TransformerSettings
from quant.errors import QuantError
from quant.modules import set_quant_state
from quant.vit.reconstruct import transformer_blocks
from tests.test_vit import _make, _one_thread  # noqa: F401  (the autouse one-thread fixture)


def _block_error(q, model, name: str, x: torch.Tensor) -> float:
    """Squared error of one block's quantized output against the float model's, on the same input."""
    block = q.get_submodule(name)
    seen = {}
    h = block.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    with torch.no_grad():
        set_quant_state(q, False)
        q(x)
        x_fp, y_fp = seen["x"], seen["y"]
        set_quant_state(q, True)
        out = block(x_fp)
    h.remove()
    return (out - y_fp).pow(2).sum(-1).mean().item()


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_block_names_in_execution_order(name: str) -> None:
    blocks = transformer_blocks(_make(name))
    assert blocks == (["blocks.0", "blocks.1"] if name == "vit" else
                      ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0", "layers.1.blocks.1"])  # fmt: skip


def test_reconstruction_lowers_block_error_and_leaves_hard_rounding() -> None:
    model = _make("vit")
    g = torch.Generator().manual_seed(3)
    calib, held_out = torch.randn(64, 3, 32, 32, generator=g), torch.randn(16, 3, 32, 32, generator=g)
    cfg = dict(wbits=3, abits=4, seed=0)
    # the start reconstruction refines: nearest rounding on the calibrated grids (GPTQ is the
    # no-reconstruction default and runs only when iters is 0)
    base = quant.quantize(model, calib, TransformerSettings(**cfg, gptq=False)).model
    result = quant.quantize(model, calib, TransformerSettings(**cfg, iters=300))  # all 64 images
    rec = result.model
    assert set(result.history) == {"blocks.0", "blocks.1"}
    for curve in result.history.values():
        assert len(curve) == 300 and all(torch.isfinite(torch.tensor(curve)))
    # on held-out inputs, each block (hard rounding, no dropping) now tracks the float block better
    for block in ("blocks.0", "blocks.1"):
        assert _block_error(rec, model, block, held_out) < 0.95 * _block_error(base, model, block, held_out)
    with torch.no_grad():
        ref = model(held_out)
        assert (rec(held_out) - ref).pow(2).mean() < 0.7 * (base(held_out) - ref).pow(2).mean()
    linears = [m for m in rec.modules() if getattr(m, "ada", None) is not None]
    assert linears and all(not m.ada.soft and not m.ada.alpha.requires_grad for m in linears)
    w = linears[0].ada()
    assert torch.allclose(w / linears[0].ada.scale, (w / linears[0].ada.scale).round(), atol=1e-4)
    assert not any(p.requires_grad for p in rec.parameters())


def test_quantize_reconstructs_a_transformer_only_when_asked() -> None:
    """The transformer default (repq-vit: `iters` 0, not the CNN recipe's 20k) does not reconstruct;
    `iters` turns it on; reconstruction reads every calibration image. The CNN path's settings (and
    so its 20k-iteration default) are refused for a transformer."""
    from quant.vit import reconstruct as vit_reconstruct

    model = _make("vit")
    calib = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    plain = quant.quantize(model, calib, TransformerSettings(wbits=4, abits=4))
    assert plain.settings.iters == 0 and plain.history == {} and plain.seconds_per_iter == {}
    assert quant.quantize(model, calib).settings == TransformerSettings()  # settings None: the same default
    seen = []
    real = vit_reconstruct.reconstruct_vit

    def spy(qmodel, data, *args, **kwargs):
        seen.append(data.shape[0])
        return real(qmodel, data, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("quant.vit.calibrate.reconstruct_vit", spy)
        rec = quant.quantize(model, calib, TransformerSettings(wbits=4, abits=4, iters=3, calib_size=16))
    assert seen == [40]  # every calibration image, not the first calib_size (16)
    assert set(rec.history) == {"blocks.0", "blocks.1"}
    assert all(len(curve) == 3 for curve in rec.history.values())
    assert all(v > 0 for v in rec.seconds_per_iter.values())
    with pytest.raises(QuantError):
        quant.quantize(model, calib, CNNSettings(wbits=4, abits=4))


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_chained_block_inputs_equal_captured_ones(name: str) -> None:
    """Taking a block's inputs from the previous block's outputs (ViT blocks, blocks within a Swin
    stage) gives the reconstruction the same data as capturing them through the model; Swin's stage
    boundary (PatchMerging between) falls back to capturing."""
    from quant.reconstruct import ReconSettings
    from quant.vit.reconstruct import _feeds, reconstruct_vit

    model = _make(name)
    calib = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    cfg = TransformerSettings(wbits=4, abits=4, seed=0)
    runs = []
    for chain in (True, False):
        q = quant.quantize(model, calib, cfg).model
        settings = ReconSettings(iters=4, batch_size=8, round_weight=1.0)
        hist = reconstruct_vit(q, calib, settings, torch.Generator().manual_seed(0), chain=chain)
        with torch.no_grad():
            runs.append(({n: torch.tensor(r.loss) for n, r in hist.items()}, q(calib)))
    (h1, out1), (h2, out2) = runs
    assert h1.keys() == h2.keys()
    for n in h1:
        assert torch.allclose(h1[n], h2[n], rtol=1e-4, atol=1e-6), n
    assert torch.allclose(out1, out2, rtol=1e-4, atol=1e-5)
    blocks = transformer_blocks(model)
    fed = [_feeds(model, a, b) for a, b in zip([None, *blocks], blocks)]
    assert fed == ([False, True] if name == "vit" else [False, True, False, True])
