"""The training loop of the distillation methods: a fake-quantized student against a float teacher.

Each step draws a fresh batch from the stream (`quant.stream`), runs the float teacher without
gradients and the student with them, and minimises

    kl_weight * KL(fp || q) + act_weight * SimLoss2 + symreg * SymReg
        (+ round_weight * AdaRound's regulariser, with learned rounding, after a 20% warm-up)

with Adam over the float parameters (weights, biases, norms, embeddings: `lr`; with learned
rounding the rounding variables take `lr_round` and the weights stay), and Adam in log space over
the quantizer steps and the SatNL bounds (`lr_scale`, a relative rate: `LogAdam`); every rate
follows a cosine to 0 over the steps. With
`noise_steps` > 0 the first that many steps run with NIPQ's pseudo-quantization noise in place of
rounding (`quant.noise`), the rest quantize hard, as NIPQ's final phase does.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from .distill_losses import ActivationTaps, activation_mse, kl_to_teacher, weight_asymmetry
from .modules import weight_layers
from .quantizers import AdaRoundQuantizer, UniformQuantizer
from .reconstruct import ReconResult, ReconSettings, rounding_beta
from .satnl import Saturating
from .stream import ImageStream


@dataclass(frozen=True)
class TrainPlan:
    """One training run's hyper-parameters (`quant.distill.DistillSettings.plan` fills them)."""

    steps: int
    lr: float
    lr_scale: float
    lr_round: float
    kl_weight: float
    act_weight: float
    symreg: float
    round_weight: float
    noise_steps: int


def set_noise(model: nn.Module, on: bool) -> None:
    """Switch NIPQ's pseudo-quantization noise on or off in every uniform quantizer under `model`."""
    for m in model.modules():
        if isinstance(m, UniformQuantizer):
            m.noise = on


class LogAdam:
    """Adam on the logarithms of positive parameters (quantizer steps, SatNL bounds), written back
    as their exponentials after each step.

    Why: Adam moves every parameter by about its rate, whatever its size, so one rate suits either
    the 2-bit steps (tenths) or the 8-bit ones of the first and last layers (thousandths), never
    both: a rate that trains the former moves the latter by a large fraction of themselves, and the
    edge layers' grids are lost. In log space every update is a relative change, the same at every
    bit width, and the parameter stays positive."""

    def __init__(self, params: list[torch.Tensor], lr: float) -> None:
        self.params = params
        self.logs = [p.detach().clamp_min(1e-8).log().requires_grad_(True) for p in params]
        self.optimizer = torch.optim.Adam(self.logs, lr=lr)
        self.base = lr

    def step(self, lr_scale: float) -> None:
        for p, u in zip(self.params, self.logs, strict=True):
            u.grad = None if p.grad is None else p.grad * p.detach()  # d/d log p = p d/dp
        self.optimizer.param_groups[0]["lr"] = self.base * lr_scale
        self.optimizer.step()
        with torch.no_grad():
            for p, u in zip(self.params, self.logs, strict=True):
                p.copy_(u.exp())


def _optimizers(student: nn.Module, plan: TrainPlan) -> tuple[torch.optim.Adam | None, LogAdam | None, list]:
    """Adam over the float parameters and the rounding variables, `LogAdam` over the steps and
    bounds, and the learned roundings."""
    roundings = [m for m in student.modules() if isinstance(m, AdaRoundQuantizer)]
    steps = [m.scale for m in student.modules() if isinstance(m, (UniformQuantizer, AdaRoundQuantizer))]
    steps = [p for p in steps if isinstance(p, nn.Parameter)]
    steps += [m.bound for m in student.modules() if isinstance(m, Saturating)]
    alphas = [r.alpha for r in roundings]
    frozen = {id(layer.weight) for layer in weight_layers(student) if layer.ada is not None}
    special = {id(p) for p in steps + alphas} | frozen
    floats = [p for p in student.parameters() if id(p) not in special]
    student.requires_grad_(False)
    for p in floats + steps + alphas:
        p.requires_grad_(True)
    groups = [
        g for g in ({"params": floats, "lr": plan.lr}, {"params": alphas, "lr": plan.lr_round}) if g["params"]
    ]
    return (
        torch.optim.Adam(groups) if groups else None,
        LogAdam(steps, plan.lr_scale) if steps else None,
        roundings,
    )


def train_student(
    student: nn.Module,
    teacher: nn.Module,
    stream: ImageStream,
    plan: TrainPlan,
    taps: list[str],
    device: torch.device,
    progress: bool = False,
    desc: str = "train",
) -> dict[str, ReconResult]:
    """Train `student` in place for `plan.steps` batches of `stream`; returns the loss histories:
    `desc` (the total), `desc/kl`, `desc/act` (SimLoss2, where taken). On return nothing is
    trainable, the noise is off and learned roundings are hard."""
    teacher.eval().requires_grad_(False)
    student.eval()  # BN is folded; dropout and drop-path stay off as in the teacher
    optimizer, step_optimizer, roundings = _optimizers(student, plan)
    bases = [g["lr"] for g in optimizer.param_groups] if optimizer is not None else []
    layers = [layer for layer in weight_layers(student) if layer.weight_quantizer.enabled]
    use_taps = plan.act_weight > 0 and bool(taps)
    taps_s = ActivationTaps(student, taps) if use_taps else None
    taps_t = ActivationTaps(teacher, taps) if use_taps else None
    anneal = ReconSettings(iters=plan.steps)  # AdaRound's beta schedule over the training steps
    history = {k: torch.zeros(plan.steps) for k in ("total", "kl", "act")}
    set_noise(student, plan.noise_steps > 0)
    steps = range(plan.steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        steps = bar = tqdm(steps, desc=desc, leave=False, mininterval=1.0)
    start = time.perf_counter()
    try:
        with torch.enable_grad():
            for i in steps:
                if i == plan.noise_steps and plan.noise_steps > 0:
                    set_noise(student, False)  # NIPQ's last phase: hard quantization
                x = stream.next().to(device)
                with torch.no_grad():
                    target = teacher(x)
                    acts_t = taps_t.take() if taps_t is not None else []
                logits = student(x)
                kl = kl_to_teacher(logits, target)
                loss = plan.kl_weight * kl
                if taps_s is not None:
                    act = activation_mse(taps_s.take(), acts_t)
                    loss = loss + plan.act_weight * act
                    history["act"][i] = act.detach()
                if plan.symreg > 0:
                    loss = loss + plan.symreg * weight_asymmetry(layers)
                if roundings and i >= anneal.warmup * plan.steps:
                    beta = rounding_beta(i, anneal)
                    loss = loss + plan.round_weight * sum(r.round_loss(beta) for r in roundings)
                for p in student.parameters():
                    p.grad = None
                loss.backward()
                cosine = 0.5 * (1.0 + math.cos(math.pi * i / plan.steps))
                if optimizer is not None:
                    for group, base in zip(optimizer.param_groups, bases, strict=True):
                        group["lr"] = base * cosine
                    optimizer.step()
                if step_optimizer is not None:
                    step_optimizer.step(cosine)
                history["total"][i] = loss.detach()
                history["kl"][i] = kl.detach()
                if bar is not None and (i % 20 == 0 or i == plan.steps - 1):
                    shown = {"loss": float(loss.detach()), "kl": float(kl.detach())}
                    if taps_s is not None:
                        shown["act"] = float(history["act"][i])
                    bar.set_postfix(
                        {k: f"{v:.4g}" for k, v in shown.items()} | {"epoch": f"{stream.epochs:.1f}"}
                    )
    finally:
        for t in (taps_s, taps_t):
            if t is not None:
                t.remove()
        set_noise(student, False)
        for r in roundings:
            r.soft, r._last_h = False, None
        student.requires_grad_(False)
    seconds = (time.perf_counter() - start) / max(plan.steps, 1)
    if progress:
        print(
            f"{desc}: {plan.steps} steps x {stream.batch_size} images = {stream.drawn} images from "
            f"{stream.size}: {stream.epochs:.1f} epochs",
            file=sys.stderr,
        )
    results = {
        desc: ReconResult(history["total"].tolist(), seconds),
        f"{desc}/kl": ReconResult(history["kl"].tolist(), seconds),
    }
    if use_taps:
        results[f"{desc}/act"] = ReconResult(history["act"].tolist(), seconds)
    return results
