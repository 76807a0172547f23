"""Block reconstruction: learn one unit's rounding and steps so its output matches the float model.

One function over one unit, as QDrop's `recon.py` and Genie's `reconstruct_block`:

    loss = || unit_q(x) - y_fp ||^2 (summed over channels, mean over the rest)
           + round_weight * sum_layers sum (1 - |2 h(alpha) - 1|^beta)     (after a 20% warm-up)

- AdaRound: alpha (Adam, `lr_alpha`), beta annealed linearly 20 -> 2 after the warm-up.
- LSQ: every activation step inside the unit (Adam, `lr_act`, cosine-annealed to 0).
- Genie-M: the per-channel weight steps too (`lr_wscale`, cosine-annealed), the integer floor fixed.
- QDrop: the unit's input is an elementwise mix of the quantized-prefix input and the float input,
  and each activation quantizer in the unit keeps an element in float with `drop_prob`.

Everything the loop needs is precomputed as tensors; minibatches are drawn by index from a seeded
`torch.Generator`; nothing reads a value back to the host inside the loop (the loss history is kept
on the device and returned at the end).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .adam import LoopAdam
from .grad_trace import UnitTrace
from .modules import MaskPool, act_quantizers, dense_dot, weight_layers


@dataclass
class ReconSettings:
    """Hyper-parameters of one unit's reconstruction (defaults: QDrop/Genie published values)."""

    iters: int = 20000
    batch_size: int = 32
    lr_alpha: float = 1e-3
    lr_act: float = 4e-5
    lr_wscale: float = 1e-4
    round_weight: float = 0.01
    drop_prob: float = 0.5
    learn_wscale: bool = True
    warmup: float = 0.2
    beta_range: tuple[float, float] = (20.0, 2.0)


def rounding_beta(step: int, s: ReconSettings) -> float:
    """AdaRound's temperature: constant during the warm-up, then linear from start to end."""
    start_decay = s.warmup * s.iters
    if step < start_decay:
        return s.beta_range[0]
    rel = (step - start_decay) / max(s.iters - start_decay, 1)
    return s.beta_range[1] + (s.beta_range[0] - s.beta_range[1]) * max(0.0, 1.0 - rel)


class _SquaredError(torch.autograd.Function):
    """`w * sum((pred - target)^2)` with its gradient `2 w (pred - target) g`, in one pass each way.

    Autograd of the plain expression keeps `diff` and `diff * diff` and spends three passes on the
    backward of the product; here the difference is the only saved tensor. It keeps the layout of
    `pred`, so a channels-last activation's gradient stays channels-last for the ops behind it.
    """

    @staticmethod
    def forward(ctx, pred, target, weight: float):  # type: ignore[override]
        diff = pred - target
        ctx.save_for_backward(diff)
        ctx.weight = weight
        return dense_dot(diff, diff) * weight

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (diff,) = ctx.saved_tensors
        return diff * (grad * (2.0 * ctx.weight)), None, None


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over batch and positions (QDrop's lp_loss).

    Not `F.mse_loss`: its backward returns NCHW gradients for channels-last activations, and every
    elementwise backward op after it (ReLU, LSQ) would then run on mixed layouts, up to 40x slower on CPU.
    """
    return _SquaredError.apply(pred, target, pred.shape[1] / pred.numel())


def _to_nhwc(t: torch.Tensor | None) -> torch.Tensor | None:
    """4-D (N, C, H, W) tensors stored as contiguous (N, H, W, C); others unchanged."""
    if t is None or t.dim() != 4:
        return t
    return t.permute(0, 2, 3, 1).contiguous()


def index_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` of a tensor stored as the unit takes it (ViT tokens, Swin's channels-last maps)."""
    return torch.index_select(t, 0, idx)


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` of a tensor stored by `_to_nhwc`, as an NCHW (channels-last strided) view."""
    rows = torch.index_select(t, 0, idx)
    return rows.permute(0, 3, 1, 2) if rows.dim() == 4 else rows


@dataclass
class ReconResult:
    """Per-iteration reconstruction loss (without the rounding term) and wall time per iteration."""

    loss: list[float]
    seconds_per_iter: float


def reconstruct_unit(
    unit: nn.Module,
    x_q: torch.Tensor,
    x_fp: torch.Tensor,
    y_fp: torch.Tensor,
    settings: ReconSettings,
    generator: torch.Generator,
    progress: bool = False,
    desc: str = "",
    start_weights: dict[nn.Module, torch.Tensor] | None = None,
    trace: UnitTrace | None = None,
) -> ReconResult:
    """Reconstruct `unit` (its quantizers already calibrated and switched on) in place.

    `x_q`: the unit's inputs from the quantized prefix; `x_fp`/`y_fp`: its float inputs and outputs;
    `start_weights` ({layer: weight}, `quant.gptq.unit_start_weights`): where those layers' rounding
    starts; `trace` records the gradient norms (`quant.grad_trace`). On return the weight rounding is
    hard (`alpha >= 0`) and dropping is off.
    """
    s = settings
    starts = start_weights or {}
    layers = weight_layers(unit)
    roundings = [
        ada
        for layer in layers
        if (ada := layer.start_adaround(s.learn_wscale, starts.get(layer))) is not None
    ]
    acts = [q for q in act_quantizers(unit) if q.enabled and q.quant.enabled]
    masks = MaskPool(s.drop_prob, generator, x_q.device) if s.drop_prob > 0.0 else None
    for q in acts:
        q.drop_prob = s.drop_prob
        q.masks = masks
    # Channels-last storage: oneDNN's conv backward is ~2x faster on it on CPU. Minibatches are
    # gathered along dim 0 of the NHWC tensors and viewed back as (channels-last) NCHW.
    x_q, x_fp, y_fp = (_to_nhwc(t) for t in (x_q, x_fp if masks is not None else None, y_fp))
    try:
        return optimise(
            unit, roundings, [q.quant.scale for q in acts], x_q, x_fp, y_fp, s, generator, masks,
            reconstruction_loss, progress, desc, trace=trace,
        )  # fmt: skip
    finally:
        for q in acts:
            q.drop_prob = 0.0
            q.masks = None


def optimise(
    unit: nn.Module,
    roundings: list,
    act_scales: list[torch.Tensor],
    x_q: torch.Tensor,
    x_fp: torch.Tensor | None,
    y_fp: torch.Tensor,
    s: ReconSettings,
    generator: torch.Generator,
    masks: MaskPool | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    progress: bool = False,
    desc: str = "",
    *,
    gather: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    trace: UnitTrace | None = None,
) -> ReconResult:
    """The reconstruction loop shared by the CNN units and the ViT blocks.

    Learns the AdaRound `roundings` (and, with `learn_wscale`, their steps) and the activation
    steps `act_scales` so that `loss_fn(unit(input), y_fp)` falls; the input is a minibatch of `x_q`
    mixed elementwise with `x_fp` by `masks` (QDrop; None = no mix). `gather(t, idx)` takes a
    minibatch of rows; the default reads 4-D tensors stored as `_to_nhwc` leaves them (CNN units);
    callers whose tensors are stored as the unit takes them pass `index_rows`. `trace` records each
    iteration's gradient norms of the roundings, weight steps and activation steps. On return the
    rounding is hard and nothing is trainable.
    """
    scale_groups = [(list(act_scales), s.lr_act)]
    if s.learn_wscale:
        scale_groups.append(([r.scale for r in roundings], s.lr_wscale))
    opt_alpha = LoopAdam([([r.alpha for r in roundings], s.lr_alpha)]) if roundings else None
    opt_scale = LoopAdam(scale_groups) if any(ps for ps, _ in scale_groups) else None

    history = torch.zeros(s.iters, device=x_q.device)
    if trace is not None:
        groups = {"rounding": [r.alpha for r in roundings], "act_step": list(act_scales)}
        if s.learn_wscale:
            groups["weight_step"] = [r.scale for r in roundings]
        trace.bind(groups, s.iters, x_q.device)
    steps = range(s.iters)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc or "reconstruct", leave=False, mininterval=1.0)
    start = time.perf_counter()
    with torch.enable_grad():  # callers may hold no_grad (evaluation code): training needs autograd
        _train(
            unit,
            steps,
            x_q,
            x_fp,
            y_fp,
            s,
            generator,
            masks,
            roundings,
            opt_alpha,
            opt_scale,
            loss_fn,
            history,
            gather or _gather,
            trace,
        )
    elapsed = time.perf_counter() - start

    for r in roundings:
        r.soft, r._last_h = False, None
        r.requires_grad_(False)
    for p in act_scales:
        p.requires_grad_(False)
    return ReconResult(history.tolist(), elapsed / max(s.iters, 1))


def _train(
    unit, steps, x_q, x_fp, y_fp, s, generator, masks, roundings, opt_alpha, opt_scale, loss_fn, history,
    gather, trace,
) -> None:  # fmt: skip
    """The optimisation loop of `optimise` (no host reads inside).

    The steps' learning rates follow a cosine from their initial value to 0 over `iters`
    (`CosineAnnealingLR`'s closed form, applied at each step: the scheduler object costs more per
    step than the smaller units' arithmetic on CPU).
    """
    n = x_q.shape[0]
    bs = min(s.batch_size, n)
    warm = s.warmup * s.iters
    scales = opt_scale.params if opt_scale is not None else []
    for i in steps:
        idx = torch.randint(0, n, (bs,), generator=generator, device=x_q.device)
        inp = gather(x_q, idx)
        if masks is not None:  # QDrop: each input element from the float model with probability drop_prob
            inp = inp.lerp_(gather(x_fp, idx), masks.draw(inp))
        rec = loss_fn(unit(inp), gather(y_fp, idx))
        loss = rec
        if i >= warm and roundings:
            beta = rounding_beta(i, s)
            reg = sum(r.round_loss(beta) for r in roundings)
            loss = rec + s.round_weight * reg
        for o in (opt_alpha, opt_scale):
            if o is not None:
                o.zero_grad()
        loss.backward()
        if trace is not None:
            reg_grads = None
            if i >= warm and roundings and s.round_weight:  # the regulariser's share, to tell it apart
                reg = s.round_weight * sum(r.round_loss(beta, reuse=False) for r in roundings)
                reg_grads = torch.autograd.grad(reg, [r.alpha for r in roundings])
            trace.record(i, reg_grads)
        if opt_alpha is not None:
            opt_alpha.step()
        if opt_scale is not None:
            opt_scale.step(0.5 * (1.0 + math.cos(math.pi * i / s.iters)))
            with torch.no_grad():  # a step must stay positive (QDrop clamps it the same way)
                torch._foreach_clamp_min_(scales, 1e-8)
        history[i] = rec.detach()
