"""The per-sample JSON record of SHARDS.md (`<key>.json`), built in one place for every generator."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: The shard format version (SHARDS.md), written in every record and manifest.
FORMAT_VERSION = 1


def sample_key(index: int) -> str:
    """The tar key of sample `index`: `s` and 9 digits, no dots."""
    return f"s{index:09d}"


def sample_record(
    index: int,
    *,
    generator: str,
    model: str,
    prompt: str,
    class_ids: Sequence[int],
    class_names: Sequence[str],
    vocab: str,
    k: int,
    pairing: str,
    seed: int,
    run_seed: int,
    steps: int,
    width: int,
    height: int,
    negative_prompt: str | None = None,
    scheduler: str | None = None,
    guidance: float | None = None,
    rejected: int = 0,
    soft_label: Mapping[int, float] | None = None,
    mix_weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The fields of SHARDS.md's per-sample table; a field a generator lacks is None (e.g. scheduler).
    The optional fields (`soft_label`, `mix_weights`) appear only when given."""
    record = {
        "format_version": FORMAT_VERSION,
        "index": index,
        "key": sample_key(index),
        "generator": generator,
        "model": model,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "class_ids": [int(c) for c in class_ids],
        "class_names": list(class_names),
        "vocab": vocab,
        "k": k,
        "pairing": pairing,
        "seed": seed,
        "run_seed": run_seed,
        "scheduler": scheduler,
        "steps": steps,
        "guidance": guidance,
        "width": width,
        "height": height,
        "rejected": rejected,
    }
    if soft_label is not None:
        record["soft_label"] = {str(int(c)): float(w) for c, w in soft_label.items()}
    if mix_weights is not None:
        record["mix_weights"] = [float(w) for w in mix_weights]
    return record
