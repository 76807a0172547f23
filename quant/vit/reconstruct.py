"""Optional block reconstruction of a RepQ-calibrated transformer (Genie-M on ViT blocks).

After `quantize_vit`'s calibration and re-parameterization, each transformer block in turn learns,
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
from torch import nn

from ..modules import MaskPool
from ..ptq import capture, run_unit
from ..quantizers import AdaRoundQuantizer
from ..reconstruct import ReconResult, ReconSettings, index_rows, optimise
from .layers import QuantLinear, set_quant_enabled
from .quantizers import SearchedUniformQuantizer


def transformer_blocks(model: nn.Module) -> list[str]:
    """Names of the model's transformer blocks in execution order (ViT/DeiT `blocks.i`, Swin
    `layers.i.blocks.j`)."""
    names = []
    for name, _ in model.named_modules():
        parent, _, index = name.rpartition(".")
        if index.isdigit() and parent.rsplit(".", 1)[-1] == "blocks":
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
) -> dict[str, ReconResult]:
    """Reconstruct every transformer block of the quantized `qmodel` in place, in order.

    `start_weights` ({Linear name: float weight}, e.g. GPTQ's compensated weights from
    `gptq_round`) sets where a Linear's learned rounding starts: AdaRound's h(alpha) begins at the
    fractional part of that weight on the grid instead of the layer's own weight. The loss target
    stays the float model's block output.

    A block fed straight by the previous one (the next entry of the same `nn.Sequential`) takes its
    inputs from that block's outputs, float and quantized, so each block costs one block forward
    instead of two passes through the whole prefix (quadratic in depth); `chain=False` captures
    every block's inputs through the model (the reference the chained path is tested against).
    """
    results: dict[str, ReconResult] = {}
    blocks = transformer_blocks(qmodel)
    prev_fp = prev_q = None  # the previous block's outputs (float, quantized), kept when they feed this one
    for k, name in enumerate(blocks):
        block = qmodel.get_submodule(name)
        if prev_q is not None:
            x_fp, x_q = prev_fp, prev_q
            set_quant_enabled(block, False)
            y_fp = run_unit(block, x_fp)
            set_quant_enabled(block, True)
        else:
            set_quant_enabled(qmodel, False)
            x_fp, y_fp = capture(qmodel, block, calib, outputs=True)
            set_quant_enabled(qmodel, True)  # only the prefix matters: capture stops at the block
            x_q, _ = capture(qmodel, block, calib, outputs=False)
        starts = {
            rel: start_weights[f"{name}.{rel}"]
            for rel, _ in block.named_modules()
            if start_weights and f"{name}.{rel}" in start_weights
        }
        results[name] = reconstruct_block(
            block, x_q, x_fp, y_fp, settings, generator, progress, desc=f"[{k + 1}/{len(blocks)}] {name}",
            start_weights=starts,
        )  # fmt: skip
        feeds_next = chain and k + 1 < len(blocks) and _feeds(qmodel, name, blocks[k + 1])
        prev_fp, prev_q = (y_fp, run_unit(block, x_q)) if feeds_next else (None, None)
    set_quant_enabled(qmodel, True)
    return results


def _feeds(model: nn.Module, prev: str | None, name: str) -> bool:
    """Whether block `prev`'s output is block `name`'s input: consecutive entries of one Sequential."""
    if prev is None:
        return False
    prev_parent, _, prev_index = prev.rpartition(".")
    parent, _, index = name.rpartition(".")
    return (
        prev_parent == parent
        and isinstance(model.get_submodule(parent), nn.Sequential)  # so the indices are integers
        and int(index) == int(prev_index) + 1
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
) -> ReconResult:
    """One block: learned rounding + steps; on return the rounding is hard and nothing is trainable.

    `start_weights` ({name within the block: weight}) initialises those Linears' rounding (see
    `reconstruct_vit`)."""
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
        progress, desc, gather=index_rows,
    )  # fmt: skip
