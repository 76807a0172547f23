"""Sample selection: keep the best `n` of an oversampled pool, scored by the float model (GenQ's
filters, arXiv 2312.05272).

Two selectors, one registry (`SELECTORS`, name -> function(model, images, labels, n, balance) ->
(kept indices, score summary)); lower scores are better in both:

- `energy`: each image's free energy under the classifier, E(x) = -T * logsumexp(f(x) / T) with T = 1
  (the energy score of out-of-distribution detection). Low energy = the model sees the image as in
  distribution; the `n` lowest are kept. GenQ thresholds the energy; a fixed count keeps the budget.
- `bn-sensitivity`: the BatchNorm-statistics distance D of a batch is, summed over BN layers, Genie-D's
  mean squared error per channel between the batch's (mean, std) of the layer's input and the layer's
  (running_mean, sqrt(running_var + eps)) (unbiased variance; `dfq generate --generator bn-distill`'s
  default loss). GenQ's sensitivity of sample i in batch S is D(S) - D(S without i): positive when the
  sample pulls the batch's statistics away from the running ones. We drop the most sensitive samples
  and recompute the sensitivity on what is left, a few at a time (1/32 of the excess a round, then one
  by one), until `n` remain, so the kept set's own statistics are what gets matched. Per-sample
  channel sums are computed once (one forward pass over the pool); every leave-one-out distance is
  algebra on those sums.

`balance`: keep each class's share of the pool (largest remainder on the labels, e.g. a pool's
`.cls`), choosing within classes, so a selector that favours some classes cannot drop others.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import QuantError

ENERGY_TEMPERATURE = 1.0
#: bn-sensitivity drops at most 1/ROUNDS of the remaining excess per round (then one sample a round)
ROUNDS = 32
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Selection:
    """What `select_samples` kept: `indices` into the scored images (ascending), and a summary of the
    selector's score over the whole pool, over its first `n` (what no selection would have taken) and
    over the kept samples."""

    method: str
    n_scored: int
    indices: torch.Tensor
    summary: dict = field(default_factory=dict)


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BN layers that carry running statistics, in module order."""
    return [
        m
        for m in model.modules()
        if isinstance(m, _BN_TYPES) and m.track_running_stats and m.running_mean is not None
    ]


# ----------------------------------------------------------------------------------------- scoring
def _forward(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits of `images` in eval mode, batch by batch on the model's device (float32, on the CPU)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for batch in images.split(batch_size):
                logits = model(batch.to(device))
                if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                    raise QuantError(
                        "sample selection needs a classifier returning a (batch, classes) tensor"
                    )
                out.append(logits.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def energy_scores(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """E(x) = -T * logsumexp(f(x) / T) per image (T = `ENERGY_TEMPERATURE`); lower = more in distribution."""
    logits = _forward(model, images, batch_size).double()
    return -ENERGY_TEMPERATURE * torch.logsumexp(logits / ENERGY_TEMPERATURE, dim=1)


@dataclass
class _LayerSums:
    """One BN layer's per-sample channel sums of its input (float64) and its targets."""

    s1: torch.Tensor  # (samples, C): sum of x over the non-channel positions
    s2: torch.Tensor  # (samples, C): sum of x^2
    per_sample: int  # positions a sample contributes per channel
    mean: torch.Tensor  # running_mean
    std: torch.Tensor  # sqrt(running_var + eps)
    eps: float


def _bn_sums(model: nn.Module, images: torch.Tensor, batch_size: int) -> list[_LayerSums]:
    layers = bn_layers(model)
    if not layers:
        raise QuantError("bn-sensitivity needs a model with BatchNorm layers (running statistics)")
    parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {id(m): [] for m in layers}
    per_sample: dict[int, int] = {}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0].detach().double()
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        per_sample[id(module)] = flat.shape[2]
        parts[id(module)].append((flat.sum(2).cpu(), flat.square().sum(2).cpu()))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        _forward(model, images, batch_size)
    finally:
        for h in handles:
            h.remove()
    return [
        _LayerSums(
            s1=torch.cat([p[0] for p in parts[id(m)]]),
            s2=torch.cat([p[1] for p in parts[id(m)]]),
            per_sample=per_sample[id(m)],
            mean=m.running_mean.detach().double().cpu(),
            std=torch.sqrt(m.running_var.detach().double().cpu() + m.eps),
            eps=m.eps,
        )
        for m in layers
    ]


def _distance(
    layers: list[_LayerSums], s1: list[torch.Tensor], s2: list[torch.Tensor], count: int
) -> torch.Tensor:
    """D of sets with summed sums `s1`, `s2` (one per layer, shape (..., C)) of `count` samples."""
    total = torch.zeros(s1[0].shape[:-1], dtype=torch.float64)
    for layer, a, b in zip(layers, s1, s2, strict=True):
        m = count * layer.per_sample
        mean = a / m
        var = ((b - m * mean.square()) / (m - 1)).clamp_min(0.0)
        std = torch.sqrt(var + layer.eps)
        c = a.shape[-1]
        total = total + ((mean - layer.mean).square().sum(-1) + (std - layer.std).square().sum(-1)) / c
    return total


def bn_distance(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> float:
    """The BN-statistics distance D (see the module docstring) of `images` as one batch."""
    layers = _bn_sums(model, images, batch_size)
    return _set_distance(layers, torch.ones(len(images), dtype=torch.bool))


def _set_distance(layers: list[_LayerSums], mask: torch.Tensor) -> float:
    s1 = [layer.s1[mask].sum(0) for layer in layers]
    s2 = [layer.s2[mask].sum(0) for layer in layers]
    return float(_distance(layers, s1, s2, int(mask.sum())))


# ----------------------------------------------------------------------------------------- classes
def class_quotas(labels: torch.Tensor, n: int) -> dict[int, int]:
    """How many of `n` each label keeps: its share of the pool, rounded by largest remainder (ties to
    the smaller label), never more than it has."""
    values, counts = torch.unique(labels, return_counts=True)
    total = int(counts.sum())
    exact = [n * int(c) / total for c in counts]
    quotas = {int(v): math.floor(e) for v, e in zip(values, exact, strict=True)}
    order = sorted(range(len(values)), key=lambda i: (-(exact[i] - math.floor(exact[i])), int(values[i])))
    for i in order[: n - sum(quotas.values())]:
        quotas[int(values[i])] += 1
    return quotas


def _keep_lowest(scores: torch.Tensor, n: int, labels: torch.Tensor | None) -> torch.Tensor:
    """Indices of the `n` lowest scores (per class up to its quota when `labels` is given), ascending."""
    if labels is None:
        return torch.sort(torch.argsort(scores, stable=True)[:n]).values
    kept = []
    for label, quota in class_quotas(labels, n).items():
        members = torch.nonzero(labels == label).flatten()
        kept.append(members[torch.argsort(scores[members], stable=True)[:quota]])
    return torch.sort(torch.cat(kept)).values


# ----------------------------------------------------------------------------------------- selectors
def _summary(scores: torch.Tensor, kept: torch.Tensor, n: int, name: str) -> dict:
    return {
        f"{name}_pool_mean": round(float(scores.mean()), 4),
        f"{name}_first_mean": round(float(scores[:n].mean()), 4),
        f"{name}_kept_mean": round(float(scores[kept].mean()), 4),
        f"{name}_kept_max": round(float(scores[kept].max()), 4),
    }


def select_energy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, n: int, batch_size: int = 256
) -> tuple[torch.Tensor, dict]:
    """The `n` images of lowest energy (per class when `labels` is given)."""
    scores = energy_scores(model, images, batch_size)
    kept = _keep_lowest(scores, n, labels)
    return kept, _summary(scores, kept, n, "energy")


def select_bn_sensitivity(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, n: int, batch_size: int = 256
) -> tuple[torch.Tensor, dict]:
    """Drop the samples of highest BN sensitivity, recomputed on what is left, until `n` remain."""
    layers = _bn_sums(model, images, batch_size)
    alive = torch.ones(len(images), dtype=torch.bool)
    quotas = class_quotas(labels, n) if labels is not None else {}
    left = {c: int((labels == c).sum()) for c in quotas} if labels is not None else {}
    first_sensitivity = None
    while (k := int(alive.sum())) > n:
        s1 = [layer.s1[alive].sum(0) for layer in layers]
        s2 = [layer.s2[alive].sum(0) for layer in layers]
        idx = torch.nonzero(alive).flatten()
        without = _distance(
            layers, [a - layer.s1[idx] for a, layer in zip(s1, layers)],
            [b - layer.s2[idx] for b, layer in zip(s2, layers)], k - 1,
        )  # fmt: skip
        sensitivity = _distance(layers, s1, s2, k) - without  # > 0: the sample pulls the batch away
        if first_sensitivity is None:
            first_sensitivity = sensitivity.clone()
        drop = max(1, math.ceil((k - n) / ROUNDS))
        for j in torch.argsort(sensitivity, descending=True, stable=True).tolist():
            if drop == 0:
                break
            if labels is not None:
                c = int(labels[idx[j]])
                if left[c] <= quotas[c]:
                    continue
                left[c] -= 1
            alive[idx[j]] = False
            drop -= 1
    kept = torch.nonzero(alive).flatten()
    first = torch.zeros(len(images), dtype=torch.bool)
    first[:n] = True
    summary = {
        "bn_distance_pool": round(_set_distance(layers, torch.ones_like(alive)), 6),
        "bn_distance_first": round(_set_distance(layers, first), 6),
        "bn_distance_kept": round(_set_distance(layers, alive), 6),
    }
    if first_sensitivity is not None:  # GenQ's one-shot score over the whole pool, for reference
        summary.update(_summary(first_sensitivity, kept, n, "sensitivity"))
    return kept, summary


Selector = Callable[..., tuple[torch.Tensor, dict]]
SELECTORS: dict[str, Selector] = {"energy": select_energy, "bn-sensitivity": select_bn_sensitivity}


def select_samples(
    model: nn.Module,
    images: torch.Tensor,
    n: int,
    method: str = "energy",
    labels: torch.Tensor | None = None,
    balance: bool = False,
    batch_size: int = 256,
) -> Selection:
    """Keep the best `n` of `images` (preprocessed, the model's input) by `method` (a `SELECTORS`
    name), scored by `model` (the float model, run in eval mode where its parameters are; left as it
    was). `balance` keeps each label's share of the pool (needs `labels`)."""
    if method not in SELECTORS:
        raise QuantError(f"unknown selector {method!r}: use one of {', '.join(SELECTORS)}")
    if not 1 <= n <= len(images):
        raise QuantError(f"cannot keep {n} of {len(images)} images")
    if balance and labels is None:
        raise QuantError("class-balanced selection needs the images' labels")
    if balance and labels is not None and len(labels) != len(images):
        raise QuantError(f"{len(images)} images but {len(labels)} labels")
    indices, summary = SELECTORS[method](model, images, labels if balance else None, n, batch_size)
    return Selection(method=method, n_scored=len(images), indices=indices, summary=summary)
