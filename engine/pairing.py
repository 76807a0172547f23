"""Class pairings of the classifier-based generators (bn-distill, enhancing-dfq).

`random` draws k distinct classes; `similar` / `dissimilar` draw the first class uniformly and the
others from its most (least) similar classes, as the diffusion generator's prompts do
(engine.prompts), so the prompt ablation can pair classes the same way with every generator.

The similarity is the classifier's own: the cosine similarity of the rows of its final linear
layer. A row is the direction in feature space that raises that class's logit, so two classes whose
rows point the same way are the ones the model finds hard to tell apart: what the model considers
close, with no data and no text encoder (which a classifier-based generator does not have). It is
computed once per run, in the driver (`prepare`), on the CPU in fp64, and handed to every worker.

Draws come from the caller's `torch.Generator` (a per-sample stream, engine.seeds), so a sample's
classes stay a pure function of (run seed, index); `random` draws exactly what the generators drew
before pairings existed (the same pools, the same hashes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import EngineError
from engine.prompts import default_neighbours, rank_by_similarity

if TYPE_CHECKING:
    import torch
    from torch import nn

    from engine.classifier import Classifier
    from engine.config import GenerateConfig

#: the pairings a classifier-based generator offers (balanced is the diffusion sampler's alone)
OFFERED = ("random", "similar", "dissimilar")
NEEDS_SIMILARITY = ("similar", "dissimilar")


def check_pairing(generator: str, pairing: str) -> None:
    """Refuse a pairing the generator does not offer, in one line."""
    if pairing not in OFFERED:
        raise EngineError(
            f"{generator} pairs classes {', '.join(OFFERED)}; pairing {pairing!r} is not offered"
        )


def head_similarity(model: nn.Module) -> np.ndarray:
    """(C, C) cosine similarity of the rows of the model's last `nn.Linear` (its classifier head)."""
    import torch
    from torch import nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EngineError("class-similarity pairing needs a classifier whose head is a linear layer")
    w = linears[-1].weight.detach().to("cpu", torch.float64)
    w = torch.nn.functional.normalize(w, dim=1)
    return (w @ w.T).numpy()


def classifier_similarity(classifier: Classifier) -> np.ndarray:
    """`head_similarity` of a freshly built copy of the classifier (its factory; CPU)."""
    return head_similarity(classifier.factory().cpu())


def prepare_similarity(cfg: GenerateConfig, classifier: Classifier | None) -> dict[str, Any]:
    """The driver's once-per-run part: `{"similarity": matrix}` when the pairing needs one, else {}."""
    if cfg.pairing not in NEEDS_SIMILARITY:
        return {}
    if classifier is None:
        raise EngineError(f"pairing {cfg.pairing!r} needs the classifier (the `classifier` context)")
    return {"similarity": classifier_similarity(classifier)}


class ClassDraw:
    """Draws a sample's k classes from its own torch stream under a pairing."""

    def __init__(self, pairing: str, num_classes: int, k: int, similarity: Any = None) -> None:
        self.pairing, self.num_classes, self.k = pairing, num_classes, k
        self.ranked: np.ndarray | None = None
        if pairing in NEEDS_SIMILARITY and k > 1:
            sim = np.asarray(similarity if similarity is not None else [])
            if sim.shape != (num_classes, num_classes):
                raise EngineError(
                    f"pairing {pairing!r} needs a {num_classes}x{num_classes} class-similarity matrix"
                )
            self.ranked = rank_by_similarity(sim)
            self.neighbours = default_neighbours(num_classes, k)

    def __call__(self, g: torch.Generator) -> list[int]:
        """The k distinct classes: `random` is `randperm(n)[:k]`; the others keep its first class."""
        import torch

        perm = torch.randperm(self.num_classes, generator=g)
        if self.ranked is None:
            return perm[: self.k].tolist()
        first = int(perm[0])
        ranked = self.ranked[first] if self.pairing == "similar" else self.ranked[first][::-1]
        pool = ranked[: self.neighbours]
        rest = torch.randperm(len(pool), generator=g)[: self.k - 1].tolist()
        return [first, *(int(pool[r]) for r in rest)]
