"""Prompt sampler: vocabularies, a/an, mixup prompts, pairings, and determinism in (run seed, index)."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from engine.config import GenerateConfig
from engine.errors import EngineError
from engine.prompts import (
    PromptSampler,
    Vocab,
    class_similarity,
    clean_name,
    load_vocab,
    make_prompt,
    noise_seed,
    rank_by_similarity,
    with_article,
)


def test_builtin_vocabularies_have_the_standard_order() -> None:
    imagenet, c10, c100 = load_vocab("imagenet"), load_vocab("cifar10"), load_vocab("cifar100")
    assert len(imagenet.names) == 1000 and len(c10.names) == 10 and len(c100.names) == 100
    assert imagenet.names[:3] == ("tench", "goldfish", "great white shark")
    assert imagenet.names[999] == "toilet tissue"
    assert c10.names == (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    )
    assert c100.names[:4] == ("apple", "aquarium fish", "baby", "bear") and c100.names[-1] == "worm"
    assert list(c100.names) == sorted(c100.names)
    for vocab in (imagenet, c10, c100):
        assert all(name == clean_name(name) and "_" not in name for name in vocab.names)


def test_user_class_file(tmp_path) -> None:
    path = tmp_path / "my_classes.txt"
    path.write_text("# my classes\nsnow_leopard\n\n  red   panda \n")
    vocab = load_vocab(str(path))
    assert vocab.names == ("snow leopard", "red panda") and vocab.label == "file:my_classes.txt"
    assert load_vocab(f"file:{path}") == vocab


@pytest.mark.parametrize("content", [None, "", "\n# only a comment\n\n"])
def test_bad_class_file_is_a_one_line_engine_error(tmp_path, content) -> None:
    path = tmp_path / "classes.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(EngineError, match="classes.txt") as info:
        load_vocab(str(path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("kite", "a kite"),
        ("ostrich", "an ostrich"),
        ("Egyptian cat", "an Egyptian cat"),
        ("umbrella", "an umbrella"),
        ("unicycle", "a unicycle"),
        ("European fire salamander", "a European fire salamander"),
        ("hourglass", "an hourglass"),
        ("hen", "a hen"),
    ],
)
def test_article(name: str, expected: str) -> None:
    assert with_article(name) == expected


def test_mixup_and_single_class_prompts() -> None:
    assert make_prompt("a photo of {}", ["kite", "vulture"]) == "a photo of a kite and a vulture"
    assert make_prompt("a photo of {}", ["kite"]) == "a photo of a kite"
    assert (
        make_prompt("{}, high quality", ["apple", "owl", "bee"])
        == "an apple and an owl and a bee, high quality"
    )


def _names(n: int) -> Vocab:
    return Vocab("test", tuple(f"class{i}" for i in range(n)))


@pytest.mark.parametrize("pairing", ["random", "balanced"])
def test_sample_is_a_pure_function_of_seed_and_index(pairing: str) -> None:
    vocab = load_vocab("imagenet")
    a = PromptSampler(vocab, k=2, pairing=pairing, run_seed=7)
    b = PromptSampler(vocab, k=2, pairing=pairing, run_seed=7)
    forward = [a.sample(i) for i in range(50)]
    backward = [b.sample(i) for i in reversed(range(50))][::-1]  # order of calls must not matter
    assert forward == backward
    other = PromptSampler(vocab, k=2, pairing=pairing, run_seed=8)
    assert [s.class_ids for s in forward] != [other.sample(i).class_ids for i in range(50)]
    assert len({s.seed for s in forward}) == 50


def test_random_pairing_gives_k_distinct_classes_consistent_with_the_prompt() -> None:
    vocab = load_vocab("cifar10")
    for k in (1, 2, 3, 10):
        sampler = PromptSampler(vocab, k=k, run_seed=0)
        for i in range(40):
            s = sampler.sample(i)
            assert len(set(s.class_ids)) == k
            assert s.class_names == tuple(vocab.names[c] for c in s.class_ids)
            assert s.prompt == make_prompt("a photo of {}", s.class_names)
    baseline = PromptSampler(vocab, k=1).sample(0)
    assert re.fullmatch(r"a photo of an? \w+", baseline.prompt)


def test_balanced_pairing_uses_every_class_equally_often() -> None:
    n, k = 10, 3
    sampler = PromptSampler(_names(n), k=k, pairing="balanced", run_seed=3)
    ids = [sampler.sample(i).class_ids for i in range(5 * n)]
    assert all(len(set(t)) == k for t in ids)
    counts = Counter(c for t in ids for c in t)
    assert set(counts.values()) == {5 * k}
    # per epoch, each slot is a permutation of the classes
    for j in range(k):
        assert sorted(t[j] for t in ids[:n]) == list(range(n))
    # epochs differ
    assert ids[:n] != ids[n : 2 * n]


def test_similarity_pairings_pick_near_or_far_classes() -> None:
    # classes on a line: similarity falls with distance
    n = 40
    pos = np.arange(n, dtype=float)
    sim = 1.0 - np.abs(pos[:, None] - pos[None, :]) / n
    similar = PromptSampler(_names(n), k=2, pairing="similar", run_seed=0, similarity=sim)
    dissimilar = PromptSampler(_names(n), k=2, pairing="dissimilar", run_seed=0, similarity=sim)
    near = [abs(a - b) for a, b in (similar.class_ids(i) for i in range(100))]
    far = [abs(a - b) for a, b in (dissimilar.class_ids(i) for i in range(100))]
    assert max(near) <= similar.neighbours and min(far) >= n // 2 - similar.neighbours
    ranked = rank_by_similarity(sim)
    assert ranked.shape == (n, n - 1) and ranked[0, 0] == 1 and ranked[5, -1] == 39
    with pytest.raises(EngineError, match="similarity"):
        PromptSampler(_names(n), k=2, pairing="similar")


def test_class_similarity_from_the_text_encoder_is_deterministic(tiny_pipeline) -> None:
    names = load_vocab("cifar10").names
    a = class_similarity(names, tiny_pipeline.tokenizer, tiny_pipeline.text_encoder)
    b = class_similarity(names, tiny_pipeline.tokenizer, tiny_pipeline.text_encoder)
    assert a.shape == (10, 10) and np.array_equal(a, b)
    assert np.allclose(np.diag(a), 1.0, atol=1e-5) and np.allclose(a, a.T, atol=1e-6)


def test_retry_seeds_are_derived_and_distinct() -> None:
    seeds = {noise_seed(0, 5, attempt) for attempt in range(4)}
    assert len(seeds) == 4 and noise_seed(0, 5, 1) == noise_seed(0, 5, 1)
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"k": 0}, "k must be"),
        ({"k": 11, "vocab": "cifar10"}, "k=11"),
        ({"num_images": 0}, "num-images"),
        ({"shard_size": 0}, "shard-size"),
        ({"workers": 0}, "workers"),
        ({"pairing": "nearest"}, "nearest"),
        ({"image_format": "gif"}, "gif"),
        ({"preset": "huge"}, "huge"),
        ({"vocab": "no-such-vocab"}, "no-such-vocab"),
        ({"settings": {"template": "a photo"}}, "template"),
        ({"settings": {"size": (30, 32)}}, "width must be a multiple of 8"),
        ({"seed": -1}, "seed"),
        ({"settings": {"scheduler": "warp"}}, "warp"),
        ({"generator": "gan"}, "gan"),
        ({"prefix": "a.b"}, "prefix"),
    ],
)
def test_bad_config_values_are_named(changes: dict, needle: str) -> None:
    with pytest.raises(EngineError, match=re.escape(needle)) as info:
        GenerateConfig(out="/tmp/unused", **{"preset": "tiny", **changes}).resolved()
    assert "\n" not in str(info.value)


def test_config_hash_covers_content_not_runtime() -> None:
    base = GenerateConfig(out="/tmp/a", preset="tiny").resolved()
    assert (
        base.config_hash()
        == GenerateConfig(out="/tmp/b", preset="tiny", workers=3, batch_size=2).resolved().config_hash()
    )
    for change in (
        {"seed": 1},
        {"k": 1},
        {"num_images": 2048},
        {"settings": {"steps": 5}},
        {"vocab": "cifar10"},
    ):
        assert (
            GenerateConfig(out="/tmp/a", preset="tiny", **change).resolved().config_hash()
            != base.config_hash()
        )
    assert (
        GenerateConfig(out="/tmp/a", preset="tiny", settings={"guidance": 3}).resolved().config_hash()
        == GenerateConfig(out="/tmp/a", preset="tiny", settings={"guidance": 3.0}).resolved().config_hash()
    )
