"""Mixup-class prompts: which classes sample i mixes, its prompt text and its noise seed.

Everything here is a pure function of (run seed, sample index) (plus, for the similarity
pairings, a class-similarity matrix computed once per run), so any sample of a pool can be
regenerated from its index alone, on any worker, in any order.

Random streams come from engine.seeds, one tagged stream per use:

    classes of sample i      CLASSES.rng(run_seed, i)
    noise seed of sample i   NOISE.seed(run_seed, i, attempt)   (attempt > 0: a retry)
    balanced epoch e         BALANCED.rng(run_seed, e)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from engine.errors import EngineError
from engine.seeds import BALANCED, CLASSES, NOISE

BUILTIN_VOCABS = ("imagenet", "cifar10", "cifar100")


# ---------------------------------------------------------------------------------------- vocab
@dataclass(frozen=True)
class Vocab:
    """An ordered list of class names; the position of a name is its class index."""

    label: str  # `imagenet`, `cifar10`, `cifar100` or `file:<basename>`
    names: tuple[str, ...]

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.names).encode("utf-8")).hexdigest()


def clean_name(raw: str) -> str:
    """`great_white_shark` -> `great white shark`: prompts read as text, not identifiers."""
    return " ".join(raw.replace("_", " ").split())


def load_vocab(spec: str) -> Vocab:
    """A builtin vocabulary by name, or a user file (one class name a line; blank and `#` lines skipped)."""
    if spec in BUILTIN_VOCABS:
        text = resources.files("engine").joinpath("vocab", f"{spec}.txt").read_text(encoding="utf-8")
        return Vocab(spec, _parse_names(text))
    path = spec[len("file:") :] if spec.startswith("file:") else spec
    if not os.path.isfile(path):
        raise EngineError(
            f"vocab {spec!r} is neither a builtin ({', '.join(BUILTIN_VOCABS)}) nor a readable class file"
        )
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise EngineError(f"cannot read class file {path!r}: {exc}") from None
    names = _parse_names(text)
    if not names:
        raise EngineError(f"class file {path!r} has no class names (one name a line)")
    return Vocab(f"file:{os.path.basename(path)}", names)


def _parse_names(text: str) -> tuple[str, ...]:
    lines = (clean_name(line) for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


# ---------------------------------------------------------------------------------------- text
_AN_EXCEPTIONS = ("hour", "honest", "honor", "honour", "heir")
_A_EXCEPTIONS = ("uni", "use", "usu", "uti", "ura", "ure", "eu", "ewe", "one", "once", "ukulele", "u-")


def with_article(name: str) -> str:
    """`kite` -> `a kite`, `ostrich` -> `an ostrich`, `unicycle` -> `a unicycle`, `hourglass` -> `an hourglass`."""
    low = name.lower()
    if low.startswith(("a ", "an ", "the ")):
        return name
    if low.startswith(_AN_EXCEPTIONS):
        return f"an {name}"
    if low.startswith(_A_EXCEPTIONS):
        return f"a {name}"
    return f"{'an' if low[:1] in 'aeiou' and low[:1] else 'a'} {name}"


def make_prompt(template: str, names: Sequence[str]) -> str:
    """Fill the template's `{}` with the names, each with its article, joined by "and"."""
    return template.replace("{}", " and ".join(with_article(n) for n in names), 1)


# ---------------------------------------------------------------------------------------- sampler
@dataclass(frozen=True)
class PromptSample:
    index: int
    prompt: str
    class_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    seed: int


def noise_seed(run_seed: int, index: int, attempt: int = 0) -> int:
    """The torch.Generator seed of sample `index`; `attempt` > 0 derives the seed of a retry."""
    return NOISE.seed(run_seed, index, attempt)


class PromptSampler:
    """Maps a sample index to its classes, prompt and seed (see the module docstring).

    pairing:
      random      k distinct classes drawn uniformly.
      balanced    every class appears equally often: epoch e = i // n draws a permutation P of the
                  n classes and k distinct offsets o_j (o_0 = 0); slot j of sample i is
                  P[(i mod n + o_j) mod n]. Each slot visits every class once per epoch, and the k
                  classes of a sample are distinct because the offsets are.
      similar     first class uniform; the others drawn from its `neighbours` most similar classes.
      dissimilar  the same from its `neighbours` least similar classes.
    """

    def __init__(
        self,
        vocab: Vocab,
        k: int = 2,
        pairing: str = "random",
        template: str = "a photo of {}",
        run_seed: int = 0,
        similarity: np.ndarray | None = None,
        neighbours: int | None = None,
    ) -> None:
        n = len(vocab.names)
        if not 1 <= k <= n:
            raise EngineError(f"k must be in [1, {n}] for vocab {vocab.label!r}, got {k}")
        self.vocab, self.k, self.pairing, self.template, self.run_seed = vocab, k, pairing, template, run_seed
        self._epoch_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._ranked: np.ndarray | None = None
        if pairing in ("similar", "dissimilar"):
            if similarity is None or similarity.shape != (n, n):
                raise EngineError(f"pairing {pairing!r} needs an {n}x{n} class-similarity matrix")
            self.neighbours = neighbours or default_neighbours(n, k)
            self._ranked = rank_by_similarity(similarity)
        elif pairing not in ("random", "balanced"):
            raise EngineError(f"unknown pairing {pairing!r}")

    def sample(self, index: int) -> PromptSample:
        ids = self.class_ids(index)
        names = tuple(self.vocab.names[c] for c in ids)
        return PromptSample(
            index, make_prompt(self.template, names), ids, names, noise_seed(self.run_seed, index)
        )

    def class_ids(self, index: int) -> tuple[int, ...]:
        n, k = len(self.vocab.names), self.k
        if self.pairing == "balanced":
            perm, offsets = self._epoch(index // n)
            return tuple(int(perm[(index % n + int(o)) % n]) for o in offsets)
        rng = CLASSES.rng(self.run_seed, index)
        if self.pairing == "random":
            return tuple(int(c) for c in rng.choice(n, size=k, replace=False))
        first = int(rng.integers(n))
        if k == 1:
            return (first,)
        ranked = self._ranked[first]  # other classes, most similar first
        pool = ranked[: self.neighbours] if self.pairing == "similar" else ranked[::-1][: self.neighbours]
        rest = rng.choice(len(pool), size=k - 1, replace=False)
        return (first, *(int(pool[r]) for r in rest))

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._epoch_cache.get(epoch)
        if cached is None:
            n = len(self.vocab.names)
            rng = BALANCED.rng(self.run_seed, epoch)
            perm = rng.permutation(n)
            offsets = np.concatenate([[0], 1 + rng.choice(n - 1, size=self.k - 1, replace=False)])
            cached = self._epoch_cache[epoch] = (perm, offsets.astype(np.int64))
            if len(self._epoch_cache) > 64:  # indices arrive in increasing order: keep it small
                self._epoch_cache.pop(next(iter(self._epoch_cache)))
        return cached


def default_neighbours(n: int, k: int) -> int:
    """How many nearest (or farthest) classes the similarity pairings draw from: ~5% of the vocab, >= 5."""
    return max(k - 1, min(n - 1, max(5, n // 20)))


def rank_by_similarity(similarity: np.ndarray) -> np.ndarray:
    """Row c: the other classes by decreasing similarity to c, ties broken by class index.

    Similarities are rounded to 1e-4 first so that last-bit differences between machines do not
    reorder near-ties.
    """
    sim = np.round(np.asarray(similarity, dtype=np.float64), 4)
    n = sim.shape[0]
    idx = np.arange(n)
    ranked = np.empty((n, n - 1), dtype=np.int64)
    for c in range(n):
        order = np.lexsort((idx, -sim[c]))
        ranked[c] = order[order != c]
    return ranked


def class_similarity(
    names: Sequence[str], tokenizer: Any, text_encoder: Any, batch_size: int = 64
) -> np.ndarray:
    """Cosine similarity of the class names' pooled text embeddings (the pipeline's own text encoder).

    Run once per pool by the driver, in fp32 on the CPU, so every actor pairs classes the same way.
    """
    import torch

    feats = []
    with torch.no_grad():
        for start in range(0, len(names), batch_size):
            chunk = list(names[start : start + batch_size])
            tok = tokenizer(
                chunk,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            out = text_encoder(input_ids=tok.input_ids.to(text_encoder.device))
            feats.append(out.pooler_output.float().cpu())
    emb = torch.nn.functional.normalize(torch.cat(feats), dim=-1)
    return (emb @ emb.T).numpy().astype(np.float64)
