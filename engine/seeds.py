"""Every random stream of a pool: a seed per (run seed, key), one named stream per use.

All streams live here, so a new use of randomness takes a new tag and never shifts an existing
one (which would change every pool made before it). Two derivations exist, both fixed forever:

- integer tags: numpy `SeedSequence` entropy `[run_seed, key, tag, *extra]` (the diffusion streams);
- text tags `"<namespace>/<name>"`: the first 8 bytes of sha256 of
  `"<namespace>/<run_seed>/<name>/<key>/<extra>..."` (the bn-distill streams).

Seeds are 63-bit non-negative ints (what `torch.Generator.manual_seed` and SHARDS.md's `seed` take).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

_MASK = 2**63 - 1


@dataclass(frozen=True)
class SeedStream:
    """One named random stream; `key` is usually a sample index (a batch's indices, an epoch)."""

    tag: int | str

    def seed(self, run_seed: int, key: int | str, *extra: int | str) -> int:
        """The seed of `key` in this stream (`extra`: e.g. a retry attempt)."""
        if isinstance(self.tag, int):
            entropy = [run_seed, int(key), self.tag, *map(int, extra)]
            return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]) & _MASK
        namespace, _, name = self.tag.partition("/")
        text = "/".join([namespace, str(run_seed), name, str(key), *map(str, extra)])
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & _MASK

    def rng(self, run_seed: int, key: int) -> np.random.Generator:
        """A numpy generator on `[run_seed, key, tag]` (integer-tag streams)."""
        if not isinstance(self.tag, int):
            raise TypeError(f"stream {self.tag!r} has no numpy generator")
        return np.random.default_rng([run_seed, key, self.tag])

    def torch_generator(self, run_seed: int, key: int | str, *extra: int | str) -> Any:
        """A CPU `torch.Generator` seeded with `seed(...)`: the same numbers on any device and batch."""
        import torch

        return torch.Generator().manual_seed(self.seed(run_seed, key, *extra))


# diffusion (engine.prompts): the classes, the initial noise (extra: retry attempt), balanced epochs
CLASSES = SeedStream(0x636C)
NOISE = SeedStream(0x6E7A)
BALANCED = SeedStream(0x6261)
# bn-distill (engine.bn_distill): a sample's initial latent or pixels, its class targets, and a
# batch's decoder weights and jitter offsets (key: the batch's indices joined by ",")
BN_SAMPLE = SeedStream("bn-distill/sample")
BN_CLASSES = SeedStream("bn-distill/classes")
BN_BATCH = SeedStream("bn-distill/batch")
# enhancing-dfq (engine.enhancing_dfq): the networks' initial weights (key: 0), a training
# iteration's classes, mixing weights and noise (key: the iteration), and a sample's (key: its index)
EDFQ_INIT = SeedStream("enhancing-dfq/init")
EDFQ_TRAIN = SeedStream("enhancing-dfq/train")
EDFQ_SAMPLE = SeedStream("enhancing-dfq/sample")
