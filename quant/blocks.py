"""Split a CNN into reconstruction units and build its fake-quantized twin.

A *unit* is what block reconstruction optimises at once (BRECQ/QDrop/Genie):

- a residual or depthwise-separable block, rewritten as `QuantBlock`: a chain of quantized
  conv(+BN folded)+act steps with an activation quantizer after every intra-block activation, an
  optional shortcut (identity, option-A padding, or a quantized downsample conv), the activation after
  the add, and an output quantizer where the block's output would be stored (QDrop placement).
  Known by class: `quant.zoo` CIFAR `BasicBlock` and MobileNetV1 `DepthwiseSeparable`; timm
  `BasicBlock`, `Bottleneck`, `InvertedResidual`, `DepthwiseSeparableConv`; torchvision `BasicBlock`,
  `Bottleneck`, `InvertedResidual`. Any other module whose traced graph is such a block (a user's own
  ResNet block, say) is found by structure (`quant.block_graph`).
- any other conv or linear layer, as `QuantLayerUnit` (the generic fallback, Genie-style): the layer
  with a quantizer on its *input*, added only where that input is not already quantized by the unit
  before it (e.g. after a functional ReLU or a pooling).

The model's own `forward` is kept (units replace submodules in a deep copy), so functional code such
as `F.relu(self.bn1(self.conv1(x)))` keeps working. Unit order and which inputs need a quantizer are
found by running the model once and following tensors. Peer layer conventions: the first unit's
weights and the last unit's weights at `first_last_bits`, the first unit's input left in float, and
the tensors entering the second and the last unit quantized at `first_last_bits`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .equalize import equalize as equalize_layers
from .fold import fold_batchnorm, set_submodule
from .modules import QuantAct, QuantConv2d, QuantLinear, cnn_weight_quantizer, quantize_layer

Step = tuple[nn.Conv2d, "nn.Module | None"]

#: Where activations are quantized (see `build_quantized_twin`).
PLACEMENTS = ("block-output", "layer-input")


class QuantUnit(nn.Module):
    """A reconstruction unit: `in_quant` (if its input needs one) and `out_quant` (if it stores one)."""

    in_quant: QuantAct | None
    out_quant: QuantAct | None


class QuantBlock(QuantUnit):
    """conv-act-quant steps, optional shortcut add, optional post-add activation, output quantizer."""

    def __init__(
        self,
        steps: list[Step],
        shortcut: nn.Module | None,
        post_act: nn.Module | None,
        wbits: int,
        abits: int,
        placement: str = "block-output",
    ) -> None:
        super().__init__()
        self.in_quant = None
        layers = []
        for i, (conv, act) in enumerate(steps):
            layer = quantize_layer(conv, wbits, act)
            if i < len(steps) - 1:
                layer.out_quant = QuantAct(abits)
            layers.append(layer)
        self.body = nn.Sequential(*layers)
        self.shortcut = _quantize_convs(shortcut, wbits) if shortcut is not None else None
        self.post_act = post_act
        # layer-input: the block stores nothing itself; an identity or padding shortcut then carries
        # the unquantized input (only layers quantize their inputs), a conv shortcut the quantized one.
        self.out_quant = QuantAct(abits) if placement == "block-output" else None
        self.float_skip = placement == "layer-input" and not any(
            isinstance(m, (nn.Conv2d, nn.Linear))
            for m in (shortcut.modules() if shortcut is not None else ())
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip_in = x
        if self.in_quant is not None:
            x = self.in_quant(x)
        out = self.body(x)
        if self.shortcut is not None:
            out = out + self.shortcut(skip_in if self.float_skip else x)
        if self.post_act is not None:
            out = self.post_act(out)
        if self.out_quant is not None:
            out = self.out_quant(out)
        return out


class QuantLayerUnit(QuantUnit):
    """One conv or linear layer as its own unit (the fallback), with an optional input quantizer."""

    def __init__(self, layer: nn.Module, wbits: int) -> None:
        super().__init__()
        self.in_quant = None
        self.out_quant = None
        self.layer = quantize_layer(layer, wbits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_quant is not None:
            x = self.in_quant(x)
        return self.layer(x)


def _quantize_convs(module: nn.Module, wbits: int) -> nn.Module:
    """Quantize every conv inside a shortcut path (a downsample conv, or nothing for identity/padding)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return quantize_layer(module, wbits)
    for name, child in list(module.named_children()):
        setattr(module, name, _quantize_convs(child, wbits))
    return module


def _chain(*mods: nn.Module | None) -> nn.Module | None:
    """The non-trivial modules among `mods` in order (folded BNs are Identity and drop out)."""
    kept = [m for m in mods if m is not None and not isinstance(m, nn.Identity)]
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else nn.Sequential(*kept)


def _is_identityish(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity) or type(m).__name__ in ("DropPath", "DropBlock2d")


# -- recognisers: (block) -> (steps, shortcut, post_act), or None if the block has a variant we
#    do not rewrite (it then falls back to per-layer units) ---------------------------------------


def _zoo_basic(b: nn.Module):
    return [(b.conv1, _chain(b.bn1, nn.ReLU())), (b.conv2, _chain(b.bn2))], b.shortcut, nn.ReLU()


def _zoo_dws(b: nn.Sequential):
    return [(b[0], _chain(b[1], b[2])), (b[3], _chain(b[4], b[5]))], None, None


def _tv_basic(b: nn.Module):
    steps = [(b.conv1, _chain(b.bn1, b.relu)), (b.conv2, _chain(b.bn2))]
    return steps, b.downsample if b.downsample is not None else nn.Identity(), b.relu


def _tv_bottleneck(b: nn.Module):
    steps = [(b.conv1, _chain(b.bn1, b.relu)), (b.conv2, _chain(b.bn2, b.relu)), (b.conv3, _chain(b.bn3))]
    return steps, b.downsample if b.downsample is not None else nn.Identity(), b.relu


def _tv_inverted(b: nn.Module):
    steps: list[Step] = []
    mods = list(b.conv)
    i = 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, nn.Sequential) and isinstance(m[0], nn.Conv2d):  # Conv2dNormActivation
            steps.append((m[0], _chain(*list(m)[1:])))
            i += 1
        elif isinstance(m, nn.Conv2d):
            steps.append((m, _chain(mods[i + 1] if i + 1 < len(mods) else None)))
            i += 2
        else:
            return None
    return steps, nn.Identity() if b.use_res_connect else None, None


def _timm_basic(b: nn.Module):
    if not _is_identityish(b.drop_block) or (b.se is not None and not _is_identityish(b.se)):
        return None
    steps = [(b.conv1, _chain(b.bn1, b.act1, b.aa)), (b.conv2, _chain(b.bn2))]
    return steps, b.downsample if b.downsample is not None else nn.Identity(), b.act2


def _timm_bottleneck(b: nn.Module):
    if not _is_identityish(b.drop_block) or (b.se is not None and not _is_identityish(b.se)):
        return None
    steps = [
        (b.conv1, _chain(b.bn1, b.act1)),
        (b.conv2, _chain(b.bn2, b.act2, b.aa)),
        (b.conv3, _chain(b.bn3)),
    ]
    return steps, b.downsample if b.downsample is not None else nn.Identity(), b.act3


def _timm_inverted(b: nn.Module):
    if b.conv_s2d is not None or not _is_identityish(b.se) or not _is_identityish(b.drop_path):
        return None
    steps = [(b.conv_pw, _chain(b.bn1)), (b.conv_dw, _chain(b.bn2, b.aa)), (b.conv_pwl, _chain(b.bn3))]
    return steps, nn.Identity() if b.has_skip else None, None


def _timm_dws(b: nn.Module):
    if b.conv_s2d is not None or not _is_identityish(b.se) or not _is_identityish(b.drop_path):
        return None
    steps = [(b.conv_dw, _chain(b.bn1, b.aa)), (b.conv_pw, _chain(b.bn2))]
    return steps, nn.Identity() if b.has_skip else None, None


def _recognisers() -> list[tuple[type, object]]:
    from .zoo.cifar_resnet import BasicBlock as ZooBasicBlock
    from .zoo.mobilenetv1 import DepthwiseSeparable as ZooDepthwiseSeparable

    found: list[tuple[type, object]] = [(ZooBasicBlock, _zoo_basic), (ZooDepthwiseSeparable, _zoo_dws)]
    try:
        from timm.models import _efficientnet_blocks as eb
        from timm.models import resnet as timm_resnet

        found += [
            (timm_resnet.BasicBlock, _timm_basic),
            (timm_resnet.Bottleneck, _timm_bottleneck),
            (eb.InvertedResidual, _timm_inverted),
            (eb.DepthwiseSeparableConv, _timm_dws),
        ]
    except ImportError:  # timm is optional for the quantizer itself
        pass
    try:
        from torchvision.models import mobilenetv2 as tv_mbv2
        from torchvision.models import resnet as tv_resnet

        found += [
            (tv_resnet.BasicBlock, _tv_basic),
            (tv_resnet.Bottleneck, _tv_bottleneck),
            (tv_mbv2.InvertedResidual, _tv_inverted),
        ]
    except ImportError:
        pass
    return found


def is_block(module: nn.Module, structural: bool = False) -> bool:
    """Whether `module` is of a block type we rewrite (exact type match: subclasses may differ), or,
    with `structural`, has a block's graph (`quant.block_graph`). The twin's root is asked without it:
    a whole model is never matched by structure."""
    if any(type(module) is cls for cls, _ in _recognisers()):
        return True
    if not structural:
        return False
    from .block_graph import structural_recipe

    return structural_recipe(module) is not None


def block_recipe(module: nn.Module):
    """(steps, shortcut, post_act) for a recognised block type; for any other module, what its traced
    graph gives if it is a residual or separable block (`quant.block_graph`); else None. A recognised
    type whose recipe declines (an SE or drop-block variant) is not read by structure."""
    for cls, recipe in _recognisers():
        if type(module) is cls:
            return recipe(module)
    from .block_graph import structural_recipe

    return structural_recipe(module)


# -- building the twin ------------------------------------------------------------------------


@dataclass
class UnitInfo:
    """A unit in execution order, with the quantizer (if any) that produced its input in the trace."""

    name: str
    input_quant: str | None
    #: the input is exactly the previous unit's output (no functional op between them)
    chained: bool = False


def _replace_units(
    root: nn.Module, module: nn.Module, prefix: str, wbits: int, abits: int, placement: str
) -> None:
    for name, child in list(module.named_children()):
        full = f"{prefix}{name}"
        recipe = block_recipe(child)
        if recipe is not None:
            steps, shortcut, post_act = recipe
            set_submodule(root, full, QuantBlock(steps, shortcut, post_act, wbits, abits, placement))
        elif isinstance(child, (nn.Conv2d, nn.Linear)):
            set_submodule(root, full, QuantLayerUnit(child, wbits))
        else:
            _replace_units(root, child, f"{full}.", wbits, abits, placement)


def trace_units(model: nn.Module, example: torch.Tensor) -> list[UnitInfo]:
    """Run `model` once (quantizers off) and list its units in call order with their input's origin."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[torch.Tensor, str]] = {}
    order: list[UnitInfo] = []
    seen: set[nn.Module] = set()
    handles = []

    def after_quant(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        produced[id(out)] = (out, names[mod])

    last_out: list[tuple[torch.Tensor, int] | None] = [None]

    def before_unit(mod: nn.Module, inp: tuple) -> None:
        if mod in seen:
            return
        seen.add(mod)
        hit = produced.get(id(inp[0]))
        src = hit[1] if hit is not None and hit[0] is inp[0] else None
        # chained: the very tensor the previous unit returned, not modified in place since (an
        # in-place activation between two units keeps the object but bumps its version counter)
        prev = last_out[0]
        chained = prev is not None and prev[0] is inp[0] and inp[0]._version == prev[1]
        order.append(UnitInfo(names[mod], src, chained=chained))

    def after_unit(_mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        last_out[0] = (out, out._version)

    for m in model.modules():
        if isinstance(m, QuantAct):
            handles.append(m.register_forward_hook(after_quant))
        elif isinstance(m, QuantUnit):
            handles.append(m.register_forward_pre_hook(before_unit))
            handles.append(m.register_forward_hook(after_unit))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order


def _set_unit_wbits(unit: nn.Module, bits: int) -> None:
    for m in unit.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            m.weight_quantizer = cnn_weight_quantizer(bits)


def build_quantized_twin(
    model: nn.Module,
    example: torch.Tensor,
    wbits: int,
    abits: int,
    first_last_bits: int | None,
    placement: str = "block-output",
    equalize: bool = False,
) -> tuple[nn.Module, list[str], list[bool]]:
    """Deep-copy `model`, fold BN, rewrite blocks/layers into quantized units (all quantizers off).

    `equalize` cross-layer equalizes conv pairs after folding (`quant.equalize`).

    `placement` says which tensors are quantized. `block-output` (QDrop/BRECQ): every tensor a block
    stores, so the residual stream itself is low-bit. `layer-input` (Genie's `QuantizableLayer`): the
    input of every conv/linear; a skip connection without a conv then adds the unquantized tensor,
    which is gentler at low activation bits and is what Genie's code does on models whose shortcut is
    not an `nn.Identity` module (e.g. the CIFAR ResNets).

    Returns the twin, its unit names in execution order, and for each unit whether its input is
    exactly the previous unit's output (`quant.capture.walk_units` chains those). Deterministic for a
    given architecture, input shape and placement, so `quant.load` rebuilds the tree that was saved.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown activation placement {placement!r}: use {' or '.join(PLACEMENTS)}")
    twin = copy.deepcopy(model).eval()
    twin.requires_grad_(False)
    if is_block(twin) or isinstance(twin, (nn.Conv2d, nn.Linear)):
        twin = nn.Sequential(twin)  # the root itself is a unit: give it a parent to be replaced in
    fold_batchnorm(twin, example)
    if equalize:
        equalize_layers(twin, example)
    _replace_units(twin, twin, "", wbits, abits, placement)
    order = trace_units(twin, example)
    if not order:
        raise TypeError("no conv or linear layer found to quantize")
    fl_w = first_last_bits if first_last_bits is not None else wbits
    fl_a = first_last_bits if first_last_bits is not None else abits
    for i, info in enumerate(order):
        unit = twin.get_submodule(info.name)
        is_edge_input = i == 1 or (i == len(order) - 1 and i > 0)
        bits = fl_a if is_edge_input else abits
        if i == 0:
            continue  # the image is already 8-bit: the first layer's input stays as it is
        if info.input_quant is None:
            unit.in_quant = QuantAct(bits)
        elif is_edge_input:
            _replace_quant(twin, info.input_quant, bits)
    if len(order) > 1:
        # QDrop's convention: the last stored activation before the classifier is 8-bit too.
        prev = twin.get_submodule(order[-2].name)
        if getattr(prev, "out_quant", None) is not None:
            prev.out_quant = QuantAct(fl_a)
    _set_unit_wbits(twin.get_submodule(order[0].name), fl_w)
    _set_unit_wbits(twin.get_submodule(order[-1].name), fl_w)
    twin.requires_grad_(False)
    return twin, [info.name for info in order], [info.chained for info in order]


def _replace_quant(root: nn.Module, name: str, bits: int) -> None:
    set_submodule(root, name, QuantAct(bits))
