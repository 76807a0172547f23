"""The training loop of the distillation methods: a fake-quantized student against a float teacher.

Each step draws a fresh batch from the stream (`quant.stream`), runs the float teacher without
gradients and the student with them, and minimises

    kl_weight * KL(fp || q) + act_weight * SimLoss2 + symreg * SymReg
        (+ round_weight * AdaRound's regulariser, with learned rounding, after a 20% warm-up)

with Adam over three groups: the float parameters (weights, biases, norms, embeddings: `lr`; with
learned rounding the rounding variables take `lr_round` and the weights stay), and the quantizer
steps with the SatNL bounds (`lr_scale`); every rate follows a cosine to 0 over the steps. With
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


def _groups(student: nn.Module, plan: TrainPlan) -> tuple[list[dict], list[torch.Tensor], list]:
    """Adam's parameter groups, the step-like parameters (kept positive), and the learned roundings."""
    roundings = [m for m in student.modules() if isinstance(m, AdaRoundQuantizer)]
    scales = [m.scale for m in student.modules() if isinstance(m, (UniformQuantizer, AdaRoundQuantizer))]
    scales = [p for p in scales if isinstance(p, nn.Parameter)]
    bounds = [m.bound for m in student.modules() if isinstance(m, Saturating)]
    alphas = [r.alpha for r in roundings]
    frozen = {id(layer.weight) for layer in weight_layers(student) if layer.ada is not None}
    special = {id(p) for p in scales + bounds + alphas} | frozen
    floats = [p for p in student.parameters() if id(p) not in special]
    student.requires_grad_(False)
    for p in floats + scales + bounds + alphas:
        p.requires_grad_(True)
    groups = [
        {"params": floats, "lr": plan.lr},
        {"params": scales + bounds, "lr": plan.lr_scale},
        {"params": alphas, "lr": plan.lr_round},
    ]
    return [g for g in groups if g["params"]], scales, roundings


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
    groups, scales, roundings = _groups(student, plan)
    optimizer = torch.optim.Adam(groups)
    bases = [g["lr"] for g in optimizer.param_groups]
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
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                cosine = 0.5 * (1.0 + math.cos(math.pi * i / plan.steps))
                for group, base in zip(optimizer.param_groups, bases, strict=True):
                    group["lr"] = base * cosine
                optimizer.step()
                if scales:
                    with torch.no_grad():  # a step must stay positive
                        torch._foreach_clamp_min_(scales, 1e-8)
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
