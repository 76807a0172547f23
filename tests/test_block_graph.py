"""quant.block_graph: a user's own residual blocks are found by structure, become `QuantBlock`s that
compute what the float blocks do, chain their inputs, and reconstruct; anything that is not a block
(gating, concatenation, attention, shared weights, containers) is left to the per-layer fallback."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant import CNNSettings, quantize
from quant.block_graph import structural_recipe
from quant.blocks import QuantBlock, QuantLayerUnit, build_quantized_twin, is_block
from quant.fold import fold_batchnorm
from quant.modules import QuantConv2d, set_quant_state
from quant.zoo.cifar_resnet import cifar_resnet
from tests.user_models import BasicBlock, resnet20_variant

BLOCKS = [f"layer{k}.{i}" for k in (1, 2, 3) for i in range(3)]


def _with_stats(model: nn.Module, shape=(3, 32, 32)) -> nn.Module:
    """Random weights with BN statistics from noise (seeded), in eval mode."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, *shape))
    return model.eval()


@pytest.fixture(scope="module")
def variant() -> nn.Module:
    torch.manual_seed(0)
    return _with_stats(resnet20_variant()[0])


def test_variant_has_nine_chained_blocks_like_the_zoo_resnet20(variant) -> None:
    twin, units, chained = build_quantized_twin(variant, torch.randn(2, 3, 32, 32), 4, 4, 8)
    assert units == ["conv1", *BLOCKS, "fc"]
    assert [type(twin.get_submodule(n)).__name__ for n in units] == (
        ["QuantLayerUnit"] + ["QuantBlock"] * 9 + ["QuantLayerUnit"]
    )
    # every block after the first takes the previous block's output as it is (the first follows the
    # stem's functional ReLU, as in the zoo model); the classifier follows a pooling
    assert chained[2:10] == [True] * 8
    _, zoo_units, zoo_chained = build_quantized_twin(
        cifar_resnet(20).eval(), torch.randn(2, 3, 32, 32), 4, 4, 8
    )
    assert len(zoo_units) == len(units) and zoo_chained == chained
    projection, identity = twin.get_submodule("layer2.0"), twin.get_submodule("layer2.1")
    assert any(isinstance(m, QuantConv2d) for m in projection.shortcut.modules())
    assert isinstance(identity.shortcut, nn.Identity)
    assert isinstance(projection.post_act, nn.ReLU) and len(projection.body) == 2


def test_recipe_reuses_the_blocks_own_modules(variant) -> None:
    block = variant.layer2[0]
    steps, shortcut, post_act = structural_recipe(block)
    assert [conv for conv, _ in steps] == [block.conv1, block.conv2]
    assert list(steps[0][1]) == [block.bn1, steps[0][1][1]] and isinstance(steps[0][1][1], nn.ReLU)
    assert steps[1][1] is block.bn2
    assert shortcut is block.shortcut  # the projection Sequential itself, BN folded in it later
    assert isinstance(post_act, nn.ReLU)
    assert isinstance(structural_recipe(variant.layer1[1])[1], nn.Identity)
    assert is_block(block, structural=True) and not is_block(block)  # not a known class
    assert not is_block(variant, structural=True)  # a whole model is never one block


class ModuleReluBlock(nn.Module):
    """torchvision's style: one ReLU module used twice, an in-place add, a bare conv shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        self.down = nn.Conv2d(8, 16, 1, 2)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.down(x)
        return self.relu(out)


class FunctionalActsBlock(nn.Module):
    """Bottleneck with functional activations of several kinds, `torch.add`, shortcut first."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 8, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn(self.a(x)), 0.2)
        out = torch.relu(F.silu(self.b(out)))
        out = F.relu6(self.c(out))
        return F.gelu(torch.add(x, out))


class Pad(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))


class PadBlock(nn.Module):
    """Option A: a parameter-free padding shortcut, no post-add activation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(8, 16, 3, 2, 1), nn.Conv2d(16, 16, 3, 1, 1)
        self.skip = Pad()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x))).add(self.skip(x))


def _separable() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.Hardswish(),
    )  # fmt: skip


@pytest.mark.parametrize(
    "make",
    [
        lambda: BasicBlock(8, 8),
        lambda: BasicBlock(8, 16, 2),
        ModuleReluBlock,
        FunctionalActsBlock,
        PadBlock,
        _separable,
    ],
    ids=["identity", "projection", "module-relu", "functional-acts", "pad", "separable"],
)
@pytest.mark.parametrize("folded", [False, True], ids=["bn", "folded"])
def test_quant_block_from_recipe_computes_the_float_block(make, folded: bool) -> None:
    torch.manual_seed(0)
    block = _with_stats(make(), (8, 12, 12))
    x = torch.randn(4, 8, 12, 12)
    with torch.no_grad():
        want = block(x)
    block = copy.deepcopy(block)
    if folded:
        fold_batchnorm(block, x[:2])
    recipe = structural_recipe(block)
    assert recipe is not None
    qblock = QuantBlock(*recipe, wbits=8, abits=8)
    set_quant_state(qblock, weights=False, acts=False)
    with torch.no_grad():
        got = qblock(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


class SEBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(out, 1)))))
        return F.relu(out * gate + x)


class ConcatBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)


class AttentionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Conv2d(8, 24, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).flatten(2).chunk(3, dim=1)
        attn = torch.softmax(q.transpose(1, 2) @ k, dim=-1)
        return x + self.proj((v @ attn.transpose(1, 2)).reshape(x.shape))


class SharedConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(F.relu(self.conv(x))) + x)


class DataDependentBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        return out + x if x.sum() > 0 else out  # fx cannot trace this


@pytest.mark.parametrize(
    "make",
    [
        SEBlock,
        ConcatBlock,
        AttentionBlock,
        SharedConvBlock,
        DataDependentBlock,
        lambda: nn.Sequential(BasicBlock(8, 8)),  # a stage holding one block: its child is the block
        lambda: nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8)),  # a stage
        lambda: nn.Sequential(_separable(), _separable()),  # a stage of separable blocks
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU()),  # a plain stem
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)),  # one conv
        lambda: resnet20_variant()[0],  # a whole model
    ],
    ids=[
        "se",
        "concat",
        "attention",
        "shared-conv",
        "data-dependent",
        "wrapper",
        "stage",
        "separable-stage",
        "plain-stem",
        "one-conv",
        "model",
    ],
)
def test_what_is_not_a_block_is_refused(make) -> None:
    assert structural_recipe(make().eval()) is None


def test_unrecognised_blocks_stay_per_layer_units() -> None:
    model = nn.Sequential(SEBlock(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).eval()
    twin, units, _ = build_quantized_twin(model, torch.randn(2, 8, 4, 4), 8, 8, 8)
    assert units == ["0.conv1", "0.conv2", "0.fc1", "0.fc2", "2"]
    assert all(isinstance(twin.get_submodule(n), QuantLayerUnit) for n in units)


def test_quantize_reconstructs_the_variant_block_by_block_close_to_fp32(variant) -> None:
    calib = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        q = quantize(variant, calib, CNNSettings(wbits=8, abits=8, method="genie-m", iters=5))
    finally:
        torch.set_num_threads(threads)
    assert list(q.seconds_per_iter) == ["conv1", *BLOCKS, "fc"]  # one reconstruction per block
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = variant(x), q(x)
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99
    assert (got - want).norm() / want.norm() < 0.1
