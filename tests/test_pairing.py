"""Class pairings of the classifier-based generators (engine/pairing.py) on a tiny BN CNN whose head
rows are set by hand: the similarity is the head's, similar pairs are closer than dissimilar ones
(bn-distill and enhancing-dfq), random draws what it drew before pairings, k=1 and k=3 work."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from engine.bn_distill import BNDistillGenerator, class_targets
from engine.classifier import Classifier
from engine.config import GenerateConfig
from engine.errors import EngineError
from engine.generators import prepare_context
from engine.pairing import ClassDraw, head_similarity
from engine.seeds import BN_CLASSES

NUM_CLASSES = 10
SIZE = (3, 8, 8)


def head_rows() -> torch.Tensor:
    """Two clusters of five classes: 0-4 around one direction, 5-9 around the opposite one."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, generator=g)
    rows = torch.stack([base if c < 5 else -base for c in range(NUM_CLASSES)])
    return rows + 0.3 * torch.randn(NUM_CLASSES, 16, generator=g)


def tiny_bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, NUM_CLASSES),
    )  # fmt: skip
    with torch.no_grad():
        model[-1].weight.copy_(head_rows())
    return model.eval()


def classifier() -> Classifier:
    return Classifier(tiny_bn_cnn, SIZE, (0.5,) * 3, (0.25,) * 3, NUM_CLASSES)


def mean_similarity(sim: np.ndarray, class_lists: list[list[int]]) -> float:
    return float(np.mean([sim[c[0], d] for c in class_lists for d in c[1:]]))


def test_head_similarity_is_the_cosine_of_the_head_rows() -> None:
    sim = head_similarity(tiny_bn_cnn())
    w = torch.nn.functional.normalize(head_rows().double(), dim=1)
    assert sim.shape == (NUM_CLASSES, NUM_CLASSES)
    np.testing.assert_allclose(sim, (w @ w.T).numpy(), atol=1e-6)
    assert (sim[:5, :5] > 0.5).all() and (sim[:5, 5:] < -0.5).all()  # the two clusters, as built
    with pytest.raises(EngineError, match="linear layer"):
        head_similarity(nn.Sequential(nn.Conv2d(3, 4, 1)))


def test_random_draws_what_it_drew_before_pairings() -> None:
    for i in range(20):
        old = torch.randperm(NUM_CLASSES, generator=BN_CLASSES.torch_generator(7, i))[:2].tolist()
        assert class_targets(7, i, 2, NUM_CLASSES) == old


@pytest.mark.parametrize("k", [1, 2, 3])
def test_bn_distill_similar_pairs_are_closer_than_dissimilar(k: int) -> None:
    sim = head_similarity(tiny_bn_cnn())

    def gen(pairing: str) -> BNDistillGenerator:
        return BNDistillGenerator(
            tiny_bn_cnn, SIZE, (0.5,) * 3, (0.25,) * 3, NUM_CLASSES, iters=1, k=k, run_seed=3, pairing=pairing
        )

    records = {p: [gen(p).sample_json(i) for i in range(40)] for p in ("random", "similar", "dissimilar")}
    lists = {p: [r["class_ids"] for r in rs] for p, rs in records.items()}
    for p, rs in records.items():
        assert all(r["pairing"] == p and r["k"] == k and len(set(r["class_ids"])) == k for r in rs)
    assert [c[0] for c in lists["similar"]] == [c[0] for c in lists["dissimilar"]]  # same first class
    assert gen("similar").sample_json(5) == records["similar"][5]  # a pure function of (seed, index)
    if k > 1:
        similar, dissimilar = (
            mean_similarity(sim, lists["similar"]),
            mean_similarity(sim, lists["dissimilar"]),
        )
        assert similar > mean_similarity(sim, lists["random"]) > dissimilar
        for s_ids, d_ids in zip(lists["similar"], lists["dissimilar"]):  # from the 5 nearest / farthest
            assert min(sim[s_ids[0], s_ids[1:]]) >= max(sim[d_ids[0], d_ids[1:]])


def test_enhancing_dfq_draws_pair_the_same_way() -> None:
    from engine.enhancing_dfq import draw

    sim = head_similarity(tiny_bn_cnn())
    pairing = {p: ClassDraw(p, NUM_CLASSES, 2, sim) for p in ("similar", "dissimilar")}
    lists = {
        p: [draw(BN_CLASSES.torch_generator(1, i), 2, NUM_CLASSES, 4, d)[0] for i in range(40)]
        for p, d in pairing.items()
    }
    assert mean_similarity(sim, lists["similar"]) > mean_similarity(sim, lists["dissimilar"])
    assert draw(torch.Generator().manual_seed(4), 2, NUM_CLASSES, 4)[0] == (
        torch.randperm(NUM_CLASSES, generator=torch.Generator().manual_seed(4))[:2].tolist()
    )


def test_prepare_hands_the_similarity_to_workers_and_pairing_enters_the_hash(tmp_path) -> None:
    base = GenerateConfig(
        out=str(tmp_path / "p"), generator="bn-distill", model="m", vocab="cifar10", batch_size=4
    )  # fmt: skip
    similar = dataclasses.replace(base, pairing="similar").resolved()
    context = prepare_context(similar, {"classifier": classifier()})
    np.testing.assert_allclose(context["similarity"], head_similarity(tiny_bn_cnn()))
    assert prepare_context(base.resolved(), {"classifier": classifier()}) == {}
    assert similar.config_hash() != base.resolved().config_hash()
    with pytest.raises(EngineError, match="pairing 'balanced' is not offered"):
        dataclasses.replace(base, pairing="balanced").resolved()
    with pytest.raises(EngineError, match="10x10 class-similarity matrix"):
        ClassDraw("similar", NUM_CLASSES, 2, np.eye(3))


def test_enhancing_dfq_training_depends_on_the_pairing(tmp_path) -> None:
    from engine.enhancing_dfq import train_hash

    cfg = GenerateConfig(out=str(tmp_path / "p"), generator="enhancing-dfq", model="m", vocab="cifar10")
    random_hash = train_hash(cfg.resolved())
    assert train_hash(dataclasses.replace(cfg, pairing="similar").resolved()) != random_hash
    assert train_hash(dataclasses.replace(cfg, pairing="dissimilar").resolved()) != random_hash
