"""Property-based fuzzing (hypothesis) of the prompt sampler and of both manifest parsers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import GenerateConfig
from engine.errors import EngineError
from engine.manifest import check_same_config, load_manifest, missing_shards, new_manifest, reconcile
from engine.prompts import PromptSampler, Vocab, make_prompt, noise_seed
from quant.errors import QuantError
from quant.reader import read_manifest, shard_urls

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)


@st.composite
def sampler_args(draw):
    vocab = tuple(draw(st.lists(names, min_size=1, max_size=40)))
    n = len(vocab)
    k = draw(st.integers(1, min(n, 6)))
    pairing = draw(st.sampled_from(["random", "balanced", "similar", "dissimilar"]))
    similarity = None
    if pairing in ("similar", "dissimilar"):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        m = rng.normal(size=(n, n))
        similarity = (m + m.T) / 2
    seed = draw(st.integers(0, 2**63 - 1))
    indices = draw(st.lists(st.integers(0, 10**12), min_size=1, max_size=5))
    return Vocab("fuzz", vocab), k, pairing, seed, similarity, indices


@FAST
@given(sampler_args())
def test_prompt_sampler_properties(args) -> None:
    vocab, k, pairing, seed, similarity, indices = args
    sampler = PromptSampler(vocab, k, pairing, "a photo of {}", seed, similarity)
    first = [sampler.sample(i) for i in indices]
    for i, s in zip(indices, first):
        assert s.index == i and len(s.class_ids) == k
        assert all(0 <= c < len(vocab.names) for c in s.class_ids)
        assert len(set(s.class_ids)) == k  # distinct classes in every pairing
        assert s.class_names == tuple(vocab.names[c] for c in s.class_ids)
        assert s.prompt == make_prompt("a photo of {}", s.class_names)
        assert all(name in s.prompt for name in s.class_names)
        assert s.seed == noise_seed(seed, i) and 0 <= s.seed < 2**63
    # a pure function of (seed, i): a fresh sampler, and the reverse order, give the same samples
    fresh = PromptSampler(vocab, k, pairing, "a photo of {}", seed, similarity)
    assert [fresh.sample(i) for i in reversed(indices)] == first[::-1]


# ---------------------------------------------------------------------------- manifests
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
ENTRY = {"url": "shard-000000.tar", "nsamples": 2, "filesize": 10, "sha256": "0" * 64, "shard": 0}
ENTRY_FIELDS = st.fixed_dictionaries({}, optional={key: json_values for key in ENTRY}) | st.just(ENTRY)


def _valid_manifest(tmp_path) -> dict:
    cfg = GenerateConfig(out=str(tmp_path), preset="tiny", num_images=4, shard_size=2).resolved()
    return new_manifest(cfg)


@st.composite
def manifests(draw):
    """Either any JSON value, or a dfq manifest whose fields are replaced by arbitrary JSON."""
    if draw(st.booleans()):
        return draw(json_values)
    base = {"format": "dfq-shards", "format_version": 1, "shardlist": [], "num_samples": 4}
    base.update(shard_size=2, prefix="shard", config={}, config_hash="x", complete=False, stats={})
    for key in draw(st.lists(st.sampled_from(sorted(base)), max_size=3)):
        base[key] = draw(json_values)
    if draw(st.booleans()):
        base["shardlist"] = draw(st.lists(ENTRY_FIELDS | json_values, max_size=3))
    return base


def _write(tmp_path, data: bytes) -> str:
    (tmp_path / "manifest.json").write_bytes(data)
    return str(tmp_path)


def _engine_reads(pool: str, cfg: GenerateConfig) -> None:
    """What a resume does with a manifest: load, compare configs, reconcile the directory."""
    manifest = load_manifest(pool)
    if manifest is not None:
        missing_shards(manifest)
        check_same_config(manifest, cfg, pool)  # a fuzzed manifest never matches: raises EngineError


def _quant_reads(pool: str) -> None:
    manifest = read_manifest(pool)
    assert isinstance(manifest, dict) and isinstance(manifest["shardlist"], list)
    shard_urls(pool, verify="none")  # entries name files that do not exist: raises QuantError


@FAST
@given(manifests())
def test_manifest_parsers_on_arbitrary_json(tmp_path, value) -> None:
    pool = _write(tmp_path, json.dumps(value).encode())
    cfg = GenerateConfig(out=pool, preset="tiny", num_images=4, shard_size=2).resolved()
    with pytest.raises(EngineError):
        _engine_reads(pool, cfg)
    try:
        _quant_reads(pool)
    except QuantError as exc:
        assert len(str(exc).splitlines()) == 1


@FAST
@given(st.data())
def test_manifest_parsers_on_truncated_and_garbled_bytes(tmp_path, data) -> None:
    good = json.dumps(_valid_manifest(tmp_path), indent=1).encode()
    cut = data.draw(st.integers(0, len(good) - 1))
    garbage = data.draw(st.binary(max_size=16))
    pool = _write(tmp_path, good[:cut] + garbage)
    cfg = GenerateConfig(out=pool, preset="tiny", num_images=4, shard_size=2).resolved()
    with pytest.raises(EngineError):
        _engine_reads(pool, cfg)
    with pytest.raises(QuantError):
        _quant_reads(pool)


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 100_000, '{"format": 1e99999}', "\ufeff{}"])
def test_manifest_parsers_on_pathological_json(tmp_path, text: str) -> None:
    pool = _write(tmp_path, text.encode())
    with pytest.raises(EngineError):
        load_manifest(pool)
    with pytest.raises(QuantError):
        read_manifest(pool)


def test_a_good_manifest_passes_both_parsers(tmp_path) -> None:
    """The properties above are not vacuous: the engine's own manifest loads on both sides."""
    manifest = _valid_manifest(tmp_path)
    pool = _write(tmp_path, json.dumps(manifest).encode())
    assert load_manifest(pool) == manifest
    assert read_manifest(pool)["shardlist"] == [] and shard_urls(pool) == []
    assert reconcile(pool, load_manifest(pool)) == [0, 1]
