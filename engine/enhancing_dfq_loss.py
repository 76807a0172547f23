"""The objectives of enhancing-dfq beside the BN-statistics loss (engine.bn_distill_loss):
cross-entropy to a soft label, SimLoss1 (Eq. 12) and, for models without BN, PSAQ-ViT's
patch-similarity entropy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KDE_POINTS = 64  # grid over [-1, 1] on which the similarity density is estimated
KDE_BANDWIDTH = 0.05


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c target_c log softmax(logits)_c."""
    return -(target * F.log_softmax(logits, -1)).sum(-1).mean()


class ClassCenters:
    """SimLoss1: cosine similarity between an image's last-activation feature and the moving
    average of its class's features (its soft label's mix of them), minimised so that images of a
    class spread out. The averages are updated after each step with momentum `ema`."""

    def __init__(self, num_classes: int, dim: int, ema: float, device: torch.device) -> None:
        self.ema = ema
        self.centers = torch.zeros(num_classes, dim, device=device)
        self.seen = torch.zeros(num_classes, device=device)

    def loss(self, feature: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        weights = soft * (self.seen > 0)  # only classes with an average so far
        target = weights @ self.centers
        known = weights.sum(-1) > 0
        if not bool(known.any()):
            return feature.sum() * 0.0
        return F.cosine_similarity(feature[known], target[known], dim=-1).mean()

    @torch.no_grad()
    def update(self, feature: torch.Tensor, soft: torch.Tensor) -> None:
        mass = soft.sum(0)
        batch_mean = (soft.T @ feature) / mass.clamp_min(1e-12).unsqueeze(-1)
        present = mass > 0
        fresh = present & (self.seen == 0)
        blended = self.ema * self.centers + (1 - self.ema) * batch_mean
        self.centers = torch.where(
            fresh.unsqueeze(-1), batch_mean, torch.where(present.unsqueeze(-1), blended, self.centers)
        )
        self.seen = self.seen + present.float()

    def state(self) -> dict[str, torch.Tensor]:
        return {"centers": self.centers.cpu(), "seen": self.seen.cpu()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.centers = state["centers"].to(self.centers.device)
        self.seen = state["seen"].to(self.seen.device)


def pairwise_similarity(feature: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between the features of different images of the batch (minimised:
    images drawn with different noise must not collapse onto one picture)."""
    f = F.normalize(feature.flatten(1), dim=-1)
    n = f.shape[0]
    sim = f @ f.T
    return (sim.sum() - sim.diagonal().sum()) / max(1, n * (n - 1))


def patch_similarity_entropy(tokens: torch.Tensor) -> torch.Tensor:
    """PSAQ-ViT's signal for one attention output (B, N, D): the differential entropy of the
    distribution of cosine similarities between an image's patch tokens, estimated with a Gaussian
    kernel density on a grid; real images give a broad (high-entropy) distribution, noise a narrow
    one. Returns the batch mean (to be maximised)."""
    if tokens.dim() == 4:
        tokens = tokens.flatten(2).transpose(1, 2)
    x = F.normalize(tokens, dim=-1)
    sim = x @ x.transpose(1, 2)
    n = sim.shape[-1]
    rows, cols = torch.triu_indices(n, n, offset=1, device=sim.device)
    values = sim[:, rows, cols]  # (B, M)
    grid = torch.linspace(-1.0, 1.0, KDE_POINTS, device=sim.device)
    diff = (grid.view(1, -1, 1) - values.unsqueeze(1)) / KDE_BANDWIDTH
    density = torch.exp(-0.5 * diff.square()).mean(-1) / (KDE_BANDWIDTH * math.sqrt(2 * math.pi))
    step = 2.0 / (KDE_POINTS - 1)
    return -(density * density.clamp_min(1e-12).log()).sum(-1).mul(step).mean()
