"""One seed helper for every generator (engine.seeds) and one per-sample record (engine.records).

The pinned numbers were computed by the code that wrote the pools before the helper existed: a
stream that drifted would silently change every new pool's prompts, noise or pixels.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from engine import seeds
from engine.bn_distill import class_targets, sample_seed
from engine.prompts import noise_seed
from engine.records import sample_record

SHARDS_MD = Path(__file__).resolve().parents[1] / "SHARDS.md"


def test_streams_reproduce_the_values_pools_were_made_with() -> None:
    assert (noise_seed(0, 0), noise_seed(0, 5, 2), noise_seed(123, 456789)) == (
        6459061142696699169,
        5377238720528216600,
        2749090172229133722,
    )
    assert seeds.CLASSES.rng(0, 3).integers(2**62) == 1592318097514559618
    assert seeds.BALANCED.rng(9, 1).integers(2**62) == 672650275091877967
    assert sample_seed(7, 11) == 3829873000820371788
    assert seeds.BN_CLASSES.seed(7, 11) == 767277467097190477
    assert seeds.BN_BATCH.seed(0, "0,1,2") == 1774649025350954788
    assert class_targets(7, 11, 2, 10) == [8, 3]


def test_every_stream_has_its_own_tag() -> None:
    streams = [v for v in vars(seeds).values() if isinstance(v, seeds.SeedStream)]
    assert len(streams) == 9 and len({s.tag for s in streams}) == len(streams)
    values = {s.seed(0, 1) for s in streams}
    assert len(values) == len(streams) and all(0 <= v < 2**63 for v in values)
    assert isinstance(seeds.NOISE.rng(0, 1), np.random.Generator)


def test_the_record_has_exactly_the_fields_shards_md_lists() -> None:
    section = SHARDS_MD.read_text().split("### Per-sample JSON", 1)[1].split("Readers must ignore", 1)[0]
    documented, optional = set(), set()
    for row, kind in re.findall(r"^\| (`[^|]+`) \| ([^|]+) \|", section, flags=re.M):
        names = set(re.findall(r"`([a-z_]+)`", row))
        (optional if "(optional)" in kind else documented).update(names)
    record = sample_record(
        42, generator="g", model="m", prompt="p", class_ids=[3, 1], class_names=["c", "a"], vocab="v", k=2,
        pairing="random", seed=5, run_seed=0, steps=4, width=32, height=32,
    )  # fmt: skip
    assert set(record) == documented
    extra = sample_record(
        42, generator="g", model="m", prompt="p", class_ids=[3, 1], class_names=["c", "a"], vocab="v", k=2,
        pairing="random", seed=5, run_seed=0, steps=4, width=32, height=32, soft_label={3: 0.75, 1: 0.25},
        mix_weights=[0.75, 0.25],
    )  # fmt: skip
    assert set(extra) == documented | optional and optional == {"soft_label", "mix_weights"}
    assert extra["soft_label"] == {"3": 0.75, "1": 0.25}
    assert record["key"] == "s000000042" and record["format_version"] == 1 and record["class_ids"] == [3, 1]
