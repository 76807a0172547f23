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

import math
import time

import torch
from torch import nn

from ..modules import MaskPool
from ..ptq import capture
from ..quantizers import AdaRoundQuantizer
from ..reconstruct import ReconResult, ReconSettings, rounding_beta
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
) -> dict[str, ReconResult]:
    """Reconstruct every transformer block of the quantized `qmodel` in place, in order."""
    results: dict[str, ReconResult] = {}
    blocks = transformer_blocks(qmodel)
    for k, name in enumerate(blocks):
        block = qmodel.get_submodule(name)
        set_quant_enabled(qmodel, False)
        x_fp, y_fp = capture(qmodel, block, calib, outputs=True)
        set_quant_enabled(qmodel, True)  # only the prefix matters: capture stops at the block
        x_q, _ = capture(qmodel, block, calib, outputs=False)
        results[name] = reconstruct_block(
            block, x_q, x_fp, y_fp, settings, generator, progress, desc=f"[{k + 1}/{len(blocks)}] {name}"
        )
    set_quant_enabled(qmodel, True)
    return results


def reconstruct_block(
    block: nn.Module,
    x_q: torch.Tensor,
    x_fp: torch.Tensor,
    y_fp: torch.Tensor,
    settings: ReconSettings,
    generator: torch.Generator,
    progress: bool = False,
    desc: str = "",
) -> ReconResult:
    """One block: learned rounding + steps; on return the rounding is hard and nothing is trainable."""
    s = settings
    linears = [m for m in block.modules() if isinstance(m, QuantLinear) and m.weight_quantizer.enabled]
    roundings = []
    for layer in linears:
        layer.ada = AdaRoundQuantizer(
            layer.weight_quantizer, layer.weight.detach(), learn_scale=s.learn_wscale
        )
        roundings.append(layer.ada)
    acts = [
        m
        for m in block.modules()
        if isinstance(m, SearchedUniformQuantizer) and m.enabled and bool(m.initialized)
    ]
    for q in acts:  # LSQ: the calibrated step becomes a parameter
        q.learn_scale = True
        q.set_grid(q.scale, q.zero_point)
    groups = [{"params": [q.scale for q in acts], "lr": s.lr_act}]
    if s.learn_wscale:
        groups.append({"params": [r.scale for r in roundings], "lr": s.lr_wscale})
    groups = [g for g in groups if g["params"]]
    opt_alpha = torch.optim.Adam([r.alpha for r in roundings], lr=s.lr_alpha) if roundings else None
    opt_scale = torch.optim.Adam(groups) if groups else None
    base_lrs = [g["lr"] for g in groups]
    masks = MaskPool(s.drop_prob, generator, x_q.device) if s.drop_prob > 0 else None
    history = torch.zeros(s.iters, device=x_q.device)
    steps = range(s.iters)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc or "reconstruct", leave=False, mininterval=1.0)
    n, bs = x_q.shape[0], min(s.batch_size, x_q.shape[0])
    start = time.perf_counter()
    with torch.enable_grad():
        for i in steps:
            idx = torch.randint(0, n, (bs,), generator=generator, device=x_q.device)
            inp = x_q[idx]
            if masks is not None:  # QDrop: each input element from the float model with probability p
                inp = inp.lerp_(x_fp[idx], masks.draw(inp))
            rec = _block_loss(block(inp), y_fp[idx])
            loss = rec
            if i >= s.warmup * s.iters and roundings:
                loss = rec + s.round_weight * sum(r.round_loss(rounding_beta(i, s)) for r in roundings)
            for o in (opt_alpha, opt_scale):
                if o is not None:
                    o.zero_grad(set_to_none=True)
            loss.backward()
            for o in (opt_alpha, opt_scale):
                if o is not None:
                    o.step()
            if opt_scale is not None:
                cos = 0.5 * (1.0 + math.cos(math.pi * (i + 1) / s.iters))
                for group, base in zip(opt_scale.param_groups, base_lrs):
                    group["lr"] = base * cos
                with torch.no_grad():
                    for group in groups:
                        torch._foreach_clamp_min_(group["params"], 1e-8)
            history[i] = rec.detach()
    elapsed = time.perf_counter() - start
    for r in roundings:
        r.soft, r._last_h = False, None
        r.requires_grad_(False)
    for q in acts:
        q.scale.requires_grad_(False)
    return ReconResult(history.tolist(), elapsed / max(s.iters, 1))
