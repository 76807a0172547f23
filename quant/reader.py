"""Read a dfq calibration pool (SHARDS.md, format 1): the small public API other PTQ tools use.

A pool is a directory or fsspec URL holding `manifest.json` and WebDataset shards. Only shards the
manifest lists are read (a tar on disk that the manifest does not name is a crash leftover), in
manifest order, so "the first n samples" means the same images on every machine.

The reading chain follows webdataset's own style, one small stage per idea:
`_open_shards` (fsspec) -> `webdataset.tariterators.tar_file_expander` -> `group_by_keys`
-> `_decode_sample` -> (optional) `_take_per_shard`.

A decoded sample is a plain dict:
    `__key__` (str), `__url__` (str, the shard), `image` (PIL RGB), `json` (dict), `cls` (int),
    plus any other member as raw bytes under its extension.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import posixpath
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from webdataset.tariterators import group_by_keys, tar_file_expander

from .errors import QuantError

FORMAT = "dfq-shards"
FORMAT_VERSION = 1
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
VERIFY_MODES = ("none", "size", "sha256")
ON_ERROR_MODES = ("raise", "skip")


# ----------------------------------------------------------------------------- manifest


def _manifest_path(pool: str) -> str:
    pool = str(pool)
    if pool.endswith(".json"):
        return pool
    return pool.rstrip("/") + "/manifest.json"


def read_manifest(pool: str) -> dict:
    """Load and validate `manifest.json` of `pool` (a pool dir/URL, or the manifest path itself).

    Adds `_base`, the directory that shard `url`s are relative to, so callers need not recompute it.
    """
    path = _manifest_path(pool)
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        if str(pool).endswith(".json"):
            raise QuantError(f"manifest {pool} does not exist")
        raise QuantError(f"no manifest.json in {pool}: not a dfq pool")
    try:
        with fs.open(fs_path, "rb") as f:
            manifest = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise QuantError(f"cannot read manifest {path}: {type(e).__name__}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise QuantError(f"{path} is not a dfq pool manifest (format {got!r}, expected {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise QuantError(
            f"unsupported format_version {manifest.get('format_version')!r} in {path} "
            f"(this reader knows {FORMAT_VERSION})"
        )
    shardlist = manifest.get("shardlist")
    if not isinstance(shardlist, list) or not all(_valid_entry(s) for s in shardlist):
        raise QuantError(
            f"{path} has no valid shardlist (a list of objects with a 'url' string, "
            "integer 'nsamples'/'filesize' and string 'sha256' where given)"
        )
    manifest["_base"] = path.rsplit("/", 1)[0] if "/" in path else "."
    return manifest


def _valid_entry(entry: object) -> bool:
    """A shardlist entry the reader can use: other fields are ignored (SHARDS.md lets them grow)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("url"), str) or not entry["url"]:
        return False
    counts_ok = all(
        entry.get(key) is None or (type(entry[key]) is int and entry[key] >= 0)
        for key in ("nsamples", "filesize")
    )
    return counts_ok and (entry.get("sha256") is None or isinstance(entry["sha256"], str))


def _shard_url(base: str, url: str) -> str:
    """Manifest urls are relative to the manifest's directory; absolute ones are kept as given."""
    if "://" in url or url.startswith("/"):
        return url
    return posixpath.join(base, url)


def _sha256(fs: Any, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify_shard(url: str, entry: dict, verify: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    name = entry["url"]
    if not fs.exists(path):
        raise QuantError(f"shard {name} is listed in the manifest but missing at {url}")
    if verify in ("size", "sha256") and entry.get("filesize") is not None:
        size = fs.size(path)
        if size != entry["filesize"]:
            raise QuantError(f"shard {name} has {size} bytes but the manifest says {entry['filesize']}")
    if verify == "sha256" and entry.get("sha256"):
        digest = _sha256(fs, path)
        if digest != entry["sha256"]:
            raise QuantError(f"shard {name} sha256 {digest[:12]}... does not match the manifest")


def _shard_entries(pool: str, verify: str) -> list[tuple[str, dict]]:
    if verify not in VERIFY_MODES:
        raise QuantError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    manifest = read_manifest(pool)
    entries = [(_shard_url(manifest["_base"], e["url"]), e) for e in manifest["shardlist"]]
    for url, entry in entries:
        _verify_shard(url, entry, verify)
    return entries


def shard_urls(pool: str, verify: str = "size") -> list[str]:
    """The committed shards of `pool`, in manifest order, checked against the manifest.

    `verify`: "none" (existence only), "size" (filesize, cheap: catches truncation) or
    "sha256" (reads every byte once). A mismatch raises QuantError naming the shard.
    """
    return [url for url, _ in _shard_entries(pool, verify)]


# ----------------------------------------------------------------------------- sample stages


@dataclass
class ReadStats:
    """Counters of one read: pass one in to learn how many corrupt samples `skip` dropped.

    With a multi-worker DataLoader each worker counts in its own copy; read in-process to count.
    """

    samples: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


class _CorruptSample(Exception):
    pass


def _open_shards(urls: Iterable[dict]) -> Iterator[dict]:
    """webdataset's url_opener, through fsspec so any fsspec URL (s3://, gs://, memory://) works."""
    for sample in urls:
        url = sample["url"]
        with fsspec.open(url, "rb") as stream:
            yield {"url": url, "stream": stream}


def _decode_sample(sample: dict) -> dict:
    """Decode one grouped sample: the image to PIL RGB, json to dict, cls to int."""
    key, url = sample.get("__key__"), sample.get("__url__")
    out: dict[str, Any] = {"__key__": key, "__url__": url}
    try:
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue
            if ext in IMAGE_EXTS:
                with Image.open(io.BytesIO(value)) as im:
                    out["image"] = im.convert("RGB")
            elif ext == "json":
                out["json"] = json.loads(value.decode("utf-8"))
            elif ext == "cls":
                out["cls"] = int(value.decode("ascii").strip())
            else:
                out[ext] = value
    except Exception as e:  # PIL, JSON and int() each raise their own kinds
        raise _CorruptSample(f"corrupt sample {key} in {url}: {type(e).__name__}: {e}") from None
    if "image" not in out:
        raise _CorruptSample(f"corrupt sample {key} in {url}: no image member")
    return out


def _make_handler(on_error: str, stats: ReadStats) -> Callable[[Exception], bool]:
    """One error route for every stage, as webdataset does: raise a QuantError or count and go on."""
    if on_error not in ON_ERROR_MODES:
        raise QuantError(f"on_error must be 'raise' or 'skip', got {on_error!r}")

    def handler(exn: Exception) -> bool:
        if on_error == "raise":
            if isinstance(exn, QuantError):
                raise exn
            raise QuantError(
                str(exn) if isinstance(exn, _CorruptSample) else f"cannot read pool: {exn}"
            ) from exn
        stats.skipped += 1
        stats.errors.append(str(exn))
        return True

    return handler


def _decode_all(samples: Iterable[dict], handler: Callable, stats: ReadStats) -> Iterator[dict]:
    for sample in samples:
        try:
            decoded = _decode_sample(sample)
        except _CorruptSample as e:
            if handler(e):
                continue
            break
        stats.samples += 1
        yield decoded


def _take_per_shard(samples: Iterable[dict], limits: dict[str, int]) -> Iterator[dict]:
    """Keep only the first `limits[url]` samples of each shard (shards absent from limits: all).

    Limits are per shard, not global, so that they still hold when workers or nodes split shards.
    """
    seen: dict[str, int] = {}
    for sample in samples:
        url = sample["__url__"]
        seen[url] = seen.get(url, 0) + 1
        if seen[url] <= limits.get(url, seen[url]):
            yield sample


def _pipeline(
    urls: list[str],
    on_error: str,
    stats: ReadStats,
    limits: dict[str, int] | None = None,
    nodesplitter: Callable | None = None,
    workersplitter: Callable | None = None,
) -> wds.DataPipeline:
    handler = _make_handler(on_error, stats)
    stages: list[Callable] = [wds.SimpleShardList(urls)]
    stages += [s for s in (nodesplitter, workersplitter) if s is not None]
    stages += [
        lambda src: _open_shards(src),
        lambda src: tar_file_expander(src, handler=handler),
        lambda src: group_by_keys(src, handler=handler),
        lambda src: _decode_all(src, handler, stats),
    ]
    if limits:
        stages.append(lambda src: _take_per_shard(src, limits))
    return wds.DataPipeline(*stages)


# ----------------------------------------------------------------------------- public readers


def iter_samples(
    pool: str, verify: str = "size", on_error: str = "raise", stats: ReadStats | None = None
) -> Iterator[dict]:
    """Every sample of `pool` as a decoded dict (see module doc), in manifest order.

    on_error="raise" stops at the first corrupt sample with a QuantError naming it;
    "skip" drops it and counts it in `stats.skipped` (pass a ReadStats to see the count).
    """
    stats = stats if stats is not None else ReadStats()
    urls = shard_urls(pool, verify)  # before the first next(): a bad pool fails at the call
    return iter(_pipeline(urls, on_error, stats))


def _to_pair(transform: Callable) -> Callable[[dict], tuple[torch.Tensor, int]]:
    def pair(sample: dict) -> tuple[torch.Tensor, int]:
        if "cls" not in sample:
            raise QuantError(f"sample {sample['__key__']} in {sample['__url__']} has no .cls label")
        return transform(sample["image"]), sample["cls"]

    return pair


def iter_calibration(
    shards: str | list[str],
    transform: Callable,
    n: int | None,
    on_error: str = "raise",
    stats: ReadStats | None = None,
) -> Iterator[tuple[torch.Tensor, int]]:
    """The first `n` (image tensor, class) pairs of `shards` (urls in order, or a pool), deterministic.

    Yields fewer than n when the shards hold fewer; callers that need exactly n check the count.
    """
    urls = shard_urls(shards) if isinstance(shards, str) else list(shards)
    stats = stats if stats is not None else ReadStats()
    samples = _pipeline(urls, on_error, stats)
    return map(_to_pair(transform), samples if n is None else itertools.islice(samples, n))


def _limits(entries: list[tuple[str, dict]], n: int | None) -> tuple[list[str], dict[str, int], int]:
    """Shards needed for the first n samples (by manifest nsamples), a per-shard cap, and the total."""
    urls, limits, total = [], {}, 0
    for url, entry in entries:
        if n is not None and total >= n:
            break
        count = int(entry.get("nsamples", 0))
        if n is not None and total + count > n:
            count = n - total
            limits[url] = count
        urls.append(url)
        total += count
    return urls, limits, total


class CalibrationDataset(IterableDataset):
    """(image tensor, class) pairs of a pool's first n samples, in manifest order.

    The order of a plain pass is the manifest's; with DataLoader workers the shards are split
    between workers (webdataset's split_by_worker) and with `split_by_node` between
    torch.distributed ranks, so each image is seen exactly once across all of them.
    """

    def __init__(
        self,
        pool: str,
        transform: Callable,
        n: int | None = None,
        split_by_node: bool = False,
        verify: str = "size",
        on_error: str = "raise",
    ) -> None:
        super().__init__()
        entries = _shard_entries(pool, verify)
        self.pool, self.transform, self.on_error = pool, transform, on_error
        self.urls, self.limits, self.total = _limits(entries, n)
        self.split_by_node = split_by_node
        self.stats = ReadStats()

    def __len__(self) -> int:
        """Nominal size from the manifest (skipped corrupt samples make an actual pass shorter)."""
        return self.total

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        pipeline = _pipeline(
            self.urls,
            self.on_error,
            self.stats,
            self.limits,
            nodesplitter=wds.split_by_node if self.split_by_node else None,
            workersplitter=wds.split_by_worker,
        )
        yield from map(_to_pair(self.transform), pipeline)


def calibration_dataset(
    pool: str, transform: Callable, n: int | None = None, split_by_node: bool = False
) -> CalibrationDataset:
    """An IterableDataset over the first n samples of `pool` (all when n is None)."""
    return CalibrationDataset(pool, transform, n, split_by_node)


def calibration_loader(
    pool: str, transform: Callable, n: int | None, batch_size: int, num_workers: int = 0
) -> DataLoader:
    """Batches of the first n samples of `pool`; with workers, shards are split between them."""
    if batch_size < 1:
        raise QuantError(f"batch_size must be >= 1, got {batch_size}")
    dataset = calibration_dataset(pool, transform, n)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
