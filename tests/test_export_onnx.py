"""quant.export_onnx: our fake-quantized CNN as a QDQ ONNX graph, checked in ONNX Runtime.

Three levels: the integer weights dequantize to exactly the fake-quant weights; every activation
Clip -> Q -> DQ in ONNX Runtime equals our fake_quant of ONNX Runtime's own input (so the only
differences left are float summation order in the convs); and the logits stay close end to end.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

import quant  # noqa: E402
from quant import CNNSettings, TransformerSettings  # noqa: E402
from quant.errors import QuantError  # noqa: E402
from quant.export_onnx import export_qdq, qdq_copy, run_onnx  # noqa: E402
from quant.modules import QuantAct, QuantConv2d, QuantLinear  # noqa: E402
from quant.quantizers import fake_quant  # noqa: E402
from quant.zoo.cifar_resnet import BasicBlock  # noqa: E402


class TinyNet(nn.Module):
    """A conv stem, two CIFAR BasicBlocks (identity and option-A padding shortcut), a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, 2))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.adaptive_avg_pool2d(self.layer(x), 1)
        return self.fc(torch.flatten(x, 1))


@pytest.fixture(scope="module")
def float_model() -> nn.Module:
    torch.manual_seed(0)
    model = TinyNet().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8))
    return model.eval()


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def w4a4(float_model: nn.Module, calib: torch.Tensor) -> nn.Module:
    return quant.quantize(float_model, calib, CNNSettings(wbits=4, abits=4, method="rtn"))


def _inputs(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(2))


def _dequant(init: dict, node: onnx.NodeProto) -> np.ndarray:
    q, s, z = (init[name].astype(np.float32) for name in node.input[:3])
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    shape = [1] * q.ndim
    if s.ndim == 1:
        shape[axis] = -1
    return (q - z.reshape(shape)) * s.reshape(shape)


def test_weights_are_integers_that_dequantize_exactly(w4a4: nn.Module, tmp_path: Path) -> None:
    result = export_qdq(w4a4, _inputs(4), tmp_path / "q.onnx", check=False)
    graph = onnx.load(str(result.path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    layers = {n: m for n, m in w4a4.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    assert result.weight_layers == len(layers) == 6
    for name, layer in layers.items():
        q, s, z = (init[f"{name}.onnx_{k}"] for k in ("qweight", "wscale", "wzero_point"))
        lo, hi = layer.weight_quantizer.qmin, layer.weight_quantizer.qmax
        assert q.dtype == np.int8 and z.dtype == np.int8 and s.dtype == np.float32
        assert q.min() >= lo and q.max() <= hi and s.shape == z.shape == (q.shape[0],)
        node = next(
            n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"{name}.onnx_qweight"
        )
        with torch.no_grad():
            np.testing.assert_array_equal(_dequant(init, node), layer.quantized_weight().numpy())
    bits = sorted(m.weight_quantizer.bits for m in layers.values())
    assert bits == [4, 4, 4, 4, 8, 8]  # first and last layer at 8 bits, the peers' convention


def test_activation_qdq_matches_fake_quant_exactly(w4a4: nn.Module, tmp_path: Path) -> None:
    """Feed each Q/DQ pair's ONNX Runtime input through our fake_quant: ORT's output is identical."""
    path = export_qdq(w4a4, _inputs(4), tmp_path / "q.onnx", check=False).path
    model = onnx.load(str(path))
    nodes = {n.output[0]: n for n in model.graph.node}
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    acts = [m for m in w4a4.modules() if isinstance(m, QuantAct) and m.enabled]
    pairs = []
    for dq in (n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in nodes):
        q = nodes[dq.input[0]]
        clip = nodes.get(q.input[0])
        has_clip = clip is not None and clip.op_type == "Clip"
        x_name = clip.input[0] if has_clip else q.input[0]
        scale, zp = init[q.input[1]], init[q.input[2]]
        assert zp.dtype == np.uint8 and scale.shape == ()
        pairs.append((x_name, dq.output[0], float(scale), int(zp), has_clip))
    assert len(pairs) == len(acts) == 6
    assert "Identity" not in {n.op_type for n in model.graph.node}  # grids are initializers, not aliases
    # 4-bit grids carry a Clip to [qmin, qmax]; 8-bit ones saturate in uint8 and need none
    assert sorted(p[4] for p in pairs) == sorted(a.bits < 8 for a in acts)
    for name in {n for p in pairs for n in p[:2]}:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(tmp_path / "debug.onnx"))
    session = ort.InferenceSession(str(tmp_path / "debug.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, {"input": _inputs().numpy()})))
    for x_name, y_name, scale, zp, has_clip in pairs:
        bits = 4 if has_clip else 8
        x = torch.from_numpy(values[x_name])
        expect = fake_quant(x, torch.tensor(scale), torch.tensor(float(zp)), 0, 2**bits - 1)
        np.testing.assert_array_equal(values[y_name], expect.numpy())


def test_logits_match_the_fake_quant_model(w4a4: nn.Module, tmp_path: Path) -> None:
    x = _inputs()
    result = export_qdq(w4a4, x, tmp_path / "q.onnx")
    assert result.act_quantizers == 6 and result.argmax_agreement == 1.0
    # as ONNX specifies the graph (ORT optimiser off): float summation order only
    assert result.max_abs_diff < 1e-5 * result.logit_scale
    # ORT's integer kernels (int32 bias, fused requantization) move 4-bit logits a little
    assert (
        result.argmax_agreement_optimized >= 0.95
        and result.max_abs_diff_optimized < 0.05 * result.logit_scale
    )
    with torch.no_grad():
        np.testing.assert_array_equal(qdq_copy(w4a4)[0](x).numpy(), w4a4(x).numpy())
    # the batch axis is dynamic: another batch size runs too
    assert run_onnx(result.path, x[:3]).shape == (3, 10)


def test_genie_m_export(float_model: nn.Module, calib: torch.Tensor, tmp_path: Path) -> None:
    """Learned rounding (hard AdaRound decisions) and learned weight steps export the same way."""
    settings = CNNSettings(wbits=4, abits=4, method="genie-m", iters=6, batch_size=4)
    qmodel = quant.quantize(float_model, calib, settings)
    assert any(m.ada is not None for m in qmodel.modules() if isinstance(m, (QuantConv2d, QuantLinear)))
    result = export_qdq(qmodel, _inputs(), tmp_path / "genie.onnx")
    assert result.weight_layers == 6 and result.argmax_agreement == 1.0
    assert result.max_abs_diff < 1e-5 * result.logit_scale


def test_refuses_what_it_cannot_export(float_model: nn.Module, w4a4: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(QuantError, match="no active quantizer"):
        export_qdq(float_model, _inputs(2), tmp_path / "f.onnx")
    soft = copy.deepcopy(w4a4)
    layer = next(m for m in soft.modules() if isinstance(m, QuantConv2d))
    layer.start_adaround(learn_scale=False)  # soft rounding: not a fixed integer weight yet
    with pytest.raises(QuantError, match="still soft"):
        export_qdq(soft, _inputs(2), tmp_path / "s.onnx")


def test_layer_input_placement_exports(float_model: nn.Module, calib: torch.Tensor, tmp_path: Path) -> None:
    """Genie's graph (float identity skips) exports too: fewer Q/DQ pairs, same agreement."""
    settings = CNNSettings(wbits=4, abits=4, method="rtn", placement="layer-input")
    qmodel = quant.quantize(float_model, calib, settings)
    result = export_qdq(qmodel, _inputs(), tmp_path / "li.onnx")
    assert result.argmax_agreement == 1.0 and result.max_abs_diff < 1e-5 * result.logit_scale


@pytest.mark.parametrize("recon", [0, 20])
def test_vit_exports_as_qdq(recon: int, tmp_path: Path) -> None:
    """The ViT path: every Linear/patch-embedding weight as integers + DequantizeLinear, every uniform
    activation grid as Q/DQ, the post-softmax log grid as its float emulation; logits agree."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10
    ).eval()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    qvit = quant.quantize(
        vit, x, TransformerSettings(wbits=4, abits=4, iters=recon)
    )  # reconstructs on all 16
    assert qvit.family == "transformer" and len(qvit.history) == (2 if recon else 0)
    result = export_qdq(qvit, x, tmp_path / "vit.onnx")
    # 2 blocks x (qkv, proj, fc1, fc2) + patch embedding + head
    assert result.weight_layers == 10
    # the 10 layers' inputs + q and k of each block's q @ k^T + v of attn @ v (attn itself: log grid)
    assert result.act_quantizers == 10 + 2 * 3
    assert result.argmax_agreement == 1.0 and result.max_abs_diff < 1e-4 * result.logit_scale
    graph = onnx.load(str(result.path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("DequantizeLinear") == 10 + 16 and ops.count("QuantizeLinear") == 16
