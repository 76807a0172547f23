"""Cross-layer equalization: which conv pairs qualify, and that rescaling leaves the function unchanged."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import quant
from quant import CNNSettings
from quant.equalize import equalize, find_equalizable_pairs
from quant.errors import QuantError
from quant.fold import fold_batchnorm
from quant.zoo.mobilenetv1 import DepthwiseSeparable, conv_bn


def _skewed_dw_net() -> nn.Sequential:
    """Stem -> two depthwise-separable units -> head, with the MobileNet pathology built in: one
    depthwise BN channel of near-zero variance (a 100x gain) fed by a stem channel of tiny weights."""
    torch.manual_seed(0)
    net = nn.Sequential(
        conv_bn(3, 8, 2), DepthwiseSeparable(8, 16, 1), DepthwiseSeparable(16, 16, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    with torch.no_grad():
        net[0][0].weight[3] *= 0.01
        net[1][1].running_var[3] = 1e-4
    return net.eval()


def _folded(net: nn.Module, x: torch.Tensor) -> nn.Module:
    net = copy.deepcopy(net)
    fold_batchnorm(net, x)
    return net


def test_equalization_finds_the_depthwise_chain_and_keeps_the_function() -> None:
    net = _skewed_dw_net()
    x = torch.randn(4, 3, 32, 32)
    folded = _folded(net, x)
    pairs = find_equalizable_pairs(folded, x)
    # stem -> dw1 -> pw1 -> dw2 -> pw2: every link crosses one LeakyReLU and nothing else reads it
    assert pairs == [("0.0", "1.0"), ("1.0", "1.3"), ("1.3", "2.0"), ("2.0", "2.3")]
    ref = folded(x)
    stem_small = folded[0][0].weight[3].abs().max() / folded[0][0].weight.abs().max()
    assert equalize(folded, x) == 4
    torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-5)
    # the tiny stem channel is grown to its neighbours' scale: its depthwise gain moved into it
    assert folded[0][0].weight[3].abs().max() / folded[0][0].weight.abs().max() > 20 * stem_small
    # the last pair of the sweep ends with equal per-channel ranges on both sides
    r1 = folded[2][0].weight.abs().flatten(1).amax(1)
    r2 = folded[2][3].weight.abs().amax(dim=(0, 2, 3))
    torch.testing.assert_close(r1, r2, rtol=1e-4, atol=1e-6)


class _ReadTwice(nn.Module):
    """conv -> ReLU -> conv, but the ReLU output is also added to the result (a residual read)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.a(x))
        return self.b(y) + y


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(self.b(torch.relu(self.a(x))))))


@pytest.mark.parametrize(
    "net",
    [
        _ReadTwice(),
        _Shared(),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU6(), nn.Conv2d(4, 4, 1)),  # clipping: not homogeneous
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.GELU(), nn.Conv2d(4, 4, 1)),
        nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2)),  # grouped, not depthwise
    ],
    ids=["residual-read", "shared-convs", "relu6", "gelu", "grouped"],
)
def test_pairs_that_would_change_the_function_are_left_alone(net: nn.Module) -> None:
    x = torch.randn(2, 4, 8, 8)
    assert find_equalizable_pairs(net.eval(), x) == []
    before = net(x)
    assert equalize(net, x) == 0
    torch.testing.assert_close(net(x), before)


def test_plain_relu_and_direct_conv_pairs_qualify() -> None:
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 1), nn.Conv2d(5, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    assert find_equalizable_pairs(net, x) == [("0", "2"), ("2", "3")]


def test_equalized_quantization_runs_saves_and_loads(tmp_path) -> None:
    net = _skewed_dw_net()
    calib = torch.randn(32, 3, 32, 32)
    settings = CNNSettings(wbits=8, abits=8, method="rtn", iters=0, equalize=True)
    q = quant.quantize(net, calib, settings)
    with torch.no_grad():
        fp, out = net(calib), q(calib)
    assert (out - fp).pow(2).mean() / fp.pow(2).mean() < 1e-2  # W8A8 stays close to float
    q.save(tmp_path / "q.pt")
    loaded = quant.load(tmp_path / "q.pt", model=_skewed_dw_net())
    assert loaded.settings == settings
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib), out)


def test_equalize_must_be_a_bool() -> None:
    with pytest.raises(QuantError, match="equalize must be true or false, got 'yes'"):
        CNNSettings(equalize="yes")  # type: ignore[arg-type]


def test_cli_equalize_is_recorded_and_saved(tmp_path) -> None:
    """`dfq quantize --equalize` says so in result.json and saves the equalized weights (a float
    model rebuilt from the spec is not equalized, so loading must take the weights from the file)."""
    from launch.cli import main

    argv = [
        "quantize",
        "--model",
        "mobilenetv1_x0.25",
        "--calib",
        "noise",
        "--n-calib",
        "4",
        "--method",
        "rtn",
    ]
    argv += ["--wbits", "8", "--abits", "8", "--no-progress"]
    for flag, out in (([], tmp_path / "plain"), (["--equalize"], tmp_path / "cle")):
        assert main([*argv, *flag, "--out", str(out)]) == 0
        assert json.loads((out / "result.json").read_text())["equalize"] is bool(flag)

    # the float model is rebuilt from the saved spec (`quant.models.load_model`)
    plain = quant.load(tmp_path / "plain" / "quantized.pt")
    cle = quant.load(tmp_path / "cle" / "quantized.pt")
    assert plain.model_spec["model"] == cle.model_spec["model"] == "mobilenetv1_x0.25"
    assert plain.settings.equalize is False and cle.settings.equalize is True
    stem = "stage1.0.0.layer.weight"  # the stem conv (BN folded): equalization rescales its channels
    assert not torch.allclose(plain.model.state_dict()[stem], cle.model.state_dict()[stem])
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.isfinite(cle(x)).all()
