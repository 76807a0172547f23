"""Optional block reconstruction of a RepQ-calibrated transformer (Genie-M on ViT blocks).

After `quantize_transformer`'s calibration and re-parameterization, each transformer block in turn learns,
against the float model's output of that block:

- the rounding of every Linear weight (AdaRound) and its per-channel step (Genie-M),
- the steps of the block's uniform activation grids (LSQ): the Linear inputs (per tensor after
  re-parameterization) and the q/k/v operands of the attention products; the post-softmax log
  grids keep their calibrated base,

with QDrop's input mix (each element of the block input from the float model with probability
`drop_prob`). The loss is the squared error summed over channels (the last dim), averaged over
images and tokens. Blocks are done in order, each from the outputs of the already reconstructed,
quantized prefix; the patch embedding and the head keep their calibrated grids.
"""

from __future__ import annotations

import torch
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn
from torchvision.models.vision_transformer import EncoderBlock

from ..capture import walk_units
from ..grad_trace import GradNormTrace, UnitTrace
from ..modules import MaskPool, QuantLinear
from ..quantizers import AdaRoundQuantizer
from ..reconstruct import ReconResult, ReconSettings, index_rows, optimise
from .quantizers import SearchedUniformQuantizer
from .torch_attention import QuantMultiheadAttention, QuantTransformerEncoderLayer

_BLOCK_TYPES = (
    Block,
    SwinTransformerBlock,
    EncoderBlock,
    nn.TransformerEncoderLayer,
    QuantTransformerEncoderLayer,
)


def _replayable(block: nn.Module) -> bool:
    """Whether `block` computes its output from its first input alone, batch first: its PyTorch
    attention is `batch_first` and was called without masks (the walk replays `block(x)` on rows)."""
    return all(
        m.batch_first and not getattr(m, "saw_mask", False)
        for m in block.modules()
        if isinstance(m, (nn.MultiheadAttention, QuantMultiheadAttention))
    )


def transformer_blocks(model: nn.Module) -> list[str]:
    """Names of the model's transformer blocks in execution order (taken as registration order):
    ViT/DeiT `blocks.i`, Swin `layers.i.blocks.j`, torchvision `EncoderBlock`s, and
    `nn.TransformerEncoderLayer`s (or their explicit form) that `_replayable` allows."""
    names: list[str] = []
    for name, module in model.named_modules():
        if not name or (names and name.startswith(names[-1] + ".")):
            continue  # the model itself, or inside a block already taken
        parent, _, index = name.rpartition(".")
        by_name = index.isdigit() and parent.rsplit(".", 1)[-1] == "blocks"
        if (by_name or isinstance(module, _BLOCK_TYPES)) and _replayable(module):
            names.append(name)
    return names


def _block_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    diff = pred - target
    return diff.mul(diff).sum(-1).mean()


def reconstruct_vit(
    qmodel: nn.Module,
    calib: torch.Tensor,
    settings: ReconSettings,
    generator: torch.Generator,
    progress: bool = False,
    chain: bool = True,
    start_weights: dict[str, torch.Tensor] | None = None,
    trace: GradNormTrace | None = None,
) -> dict[str, ReconResult]:
    """Reconstruct every transformer block of the quantized `qmodel` in place, in order.

    `start_weights` ({Linear name: float weight}, e.g. GPTQ's compensated weights from
    `gptq_round`) sets where a Linear's learned rounding starts: AdaRound's h(alpha) begins at the
    fractional part of that weight on the grid instead of the layer's own weight. The loss target
    stays the float model's block output.

    A block fed straight by the previous one (the next entry of the same `nn.Sequential`) takes its
    inputs from that block's outputs (`quant.capture.walk_units`); `chain=False` captures every
    block's inputs through the model (the reference the chained path is tested against). `trace`
    gets each block's gradient norms (`quant.grad_trace`).
    """
    results: dict[str, ReconResult] = {}
    blocks = transformer_blocks(qmodel)
    chained = [chain and _feeds(qmodel, prev, name) for prev, name in zip([None, *blocks], blocks)]
    for step in walk_units(qmodel, blocks, calib, chained):
        name = step.name
        starts = {
            rel: start_weights[f"{name}.{rel}"]
            for rel, _ in step.unit.named_modules()
            if start_weights and f"{name}.{rel}" in start_weights
        }
        results[name] = reconstruct_block(
            step.unit, step.x_q, step.x_fp, step.y_fp, settings, generator, progress,
            desc=f"[{step.index + 1}/{len(blocks)}] {name}", start_weights=starts,
            trace=trace.unit(name) if trace is not None else None,
        )  # fmt: skip
    return results


def _feeds(model: nn.Module, prev: str | None, name: str) -> bool:
    """Whether block `prev`'s output is block `name`'s input: consecutive children of one plain
    `nn.Sequential`, or of the `layers` ModuleList an `nn.TransformerEncoder` runs in order."""
    if prev is None:
        return False
    prev_parent, _, prev_child = prev.rpartition(".")
    parent_name, _, child = name.rpartition(".")
    if prev_parent != parent_name:
        return False
    parent = model.get_submodule(parent_name)
    children = [n for n, _ in parent.named_children()]
    if children.index(child) != children.index(prev_child) + 1:
        return False
    if isinstance(parent, nn.Sequential):
        return type(parent).forward is nn.Sequential.forward
    owner_name, _, attr = parent_name.rpartition(".")
    owner = model.get_submodule(owner_name) if parent_name else None
    return (
        isinstance(parent, nn.ModuleList)
        and isinstance(owner, nn.TransformerEncoder)
        and type(owner).forward is nn.TransformerEncoder.forward
        and attr == "layers"
    )


def reconstruct_block(
    block: nn.Module,
    x_q: torch.Tensor,
    x_fp: torch.Tensor,
    y_fp: torch.Tensor,
    settings: ReconSettings,
    generator: torch.Generator,
    progress: bool = False,
    desc: str = "",
    start_weights: dict[str, torch.Tensor] | None = None,
    trace: UnitTrace | None = None,
) -> ReconResult:
    """One block: learned rounding + steps; on return the rounding is hard and nothing is trainable.

    `start_weights` ({name within the block: weight}) initialises those Linears' rounding (see
    `reconstruct_vit`); `trace` records the gradient norms."""
    s = settings
    start_weights = start_weights or {}
    linears = [
        (name, m)
        for name, m in block.named_modules()
        if isinstance(m, QuantLinear) and m.weight_quantizer.enabled
    ]
    roundings = []
    for name, layer in linears:
        start = start_weights.get(name, layer.weight).detach()
        if start.shape != layer.weight.shape:
            raise ValueError(
                f"start weight for {name}: shape {tuple(start.shape)} != {tuple(layer.weight.shape)}"
            )
        layer.ada = AdaRoundQuantizer(layer.weight_quantizer, start, learn_scale=s.learn_wscale)
        roundings.append(layer.ada)
    acts = [
        m
        for m in block.modules()
        if isinstance(m, SearchedUniformQuantizer) and m.enabled and bool(m.initialized)
    ]
    for q in acts:  # LSQ: the calibrated step becomes a parameter
        q.learn_scale = True
        q.set_grid(q.scale, q.zero_point)
    masks = MaskPool(s.drop_prob, generator, x_q.device) if s.drop_prob > 0 else None
    return optimise(
        block, roundings, [q.scale for q in acts], x_q, x_fp, y_fp, s, generator, masks, _block_loss,
        progress, desc, gather=index_rows, trace=trace,
    )  # fmt: skip
