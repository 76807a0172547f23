"""`manifest.json`: the pool's index of committed shards (SHARDS.md), and the resume logic.

The manifest is the single source of truth: a shard exists for readers once it is listed, and it
is listed only after its file was committed. Resume reconciles the directory with the manifest:
listed shards whose file is missing or of the wrong size are dropped (and redone), temporary files
and unlisted shard tars (crash leftovers) are deleted, and the rest is the to-do list.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from typing import Any

from engine.config import GenerateConfig
from engine.errors import EngineError
from engine.legacy import is_legacy, upgrade
from engine.records import FORMAT_VERSION
from engine.writer import fsync_dir, is_local, join, local_path

MANIFEST_NAME = "manifest.json"
ENTRY_FIELDS = ("url", "nsamples", "filesize", "sha256", "shard", "first_index")


def new_manifest(cfg: GenerateConfig) -> dict[str, Any]:
    """An empty manifest for a resolved config (nothing committed yet)."""
    content = cfg.content_config()
    return {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "format": "dfq-shards",
        "format_version": FORMAT_VERSION,
        "name": cfg.pool_name,
        "num_samples": cfg.num_images,
        "shard_size": cfg.shard_size,
        "prefix": cfg.prefix,
        "config": content,
        "config_hash": cfg.config_hash(),
        "shardlist": [],
        "complete": False,
        "stats": {"images": 0, "rejected": 0, "seconds": 0.0, "shards": {}},
    }


def manifest_url(out: str) -> str:
    return join(out, MANIFEST_NAME)


def load_manifest(out: str) -> dict[str, Any] | None:
    """The manifest of pool `out`, or None when there is none; EngineError when it is not one of ours."""
    url = manifest_url(out)
    try:
        if is_local(url):
            path = local_path(url)
            if not os.path.exists(path):
                return None
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        else:
            import fsspec

            fs, path = fsspec.core.url_to_fs(url)
            if not fs.exists(path):
                return None
            data = json.loads(fs.cat_file(path).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise EngineError(f"cannot read {url}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != "dfq-shards":
        raise EngineError(f"{url} is not a dfq pool manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise EngineError(
            f"{url} has format_version {data.get('format_version')!r}, this dfq reads {FORMAT_VERSION}"
        )
    problem = _structure_problem(data)
    if problem:
        raise EngineError(f"{url} is a damaged dfq pool manifest ({problem}); restore it or use a new --out")
    return data


def _count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _structure_problem(data: dict[str, Any]) -> str | None:
    """What is wrong with the fields resume relies on (a hand-edited or foreign file), or None."""
    for key in ("num_samples", "shard_size"):
        if not _count(data.get(key), 1):
            return f"{key} {data.get(key)!r}"
    for key, kind in (("prefix", str), ("config_hash", str), ("config", dict), ("stats", dict)):
        if not isinstance(data.get(key), kind):
            return f"{key} is not a {kind.__name__}"
    shard_stats = data["stats"].get("shards", {})
    if not isinstance(shard_stats, dict) or not all(isinstance(v, dict) for v in shard_stats.values()):
        return "stats.shards is not an object of objects"
    if not isinstance(data.get("shardlist"), list):
        return "shardlist is not a list"
    for entry in data["shardlist"]:
        if not isinstance(entry, dict):
            return f"shardlist entry {entry!r} is not an object"
        if not (isinstance(entry.get("url"), str) and isinstance(entry.get("sha256"), str)):
            return f"shardlist entry {entry.get('url')!r} lacks a url or sha256"
        for key in ("nsamples", "filesize", "shard", "first_index"):
            if not _count(entry.get(key), 0):
                return f"shardlist entry {entry['url']!r} has {key} {entry.get(key)!r}"
    return None


def save_manifest(out: str, manifest: dict[str, Any]) -> None:
    """Write atomically: a temp file, fsync, rename (object stores: one put)."""
    manifest["shardlist"].sort(key=lambda e: e["shard"])
    data = (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode("utf-8")
    url = manifest_url(out)
    if is_local(url):
        path = local_path(url)
        tmp = f"{path}.tmp-{secrets.token_hex(4)}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:  # e.g. a full disk: the old manifest stays, no temp is left behind
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    else:
        import fsspec

        with fsspec.open(url, "wb") as f:
            f.write(data)


def check_same_config(manifest: dict[str, Any], cfg: GenerateConfig, out: str) -> None:
    """Refuse to resume a pool made with other content settings; the message names what differs.

    A manifest in the old flat layout (engine.legacy) is compared after mapping it to today's.
    """
    old = manifest.get("config", {})
    legacy = is_legacy(old)
    if not legacy and manifest.get("config_hash") == cfg.config_hash():
        return
    if legacy:
        try:
            old = upgrade(old, manifest.get("stats"))
        except EngineError as exc:
            raise EngineError(
                f"{out} holds a pool made by an older dfq that this one cannot resume ({exc}); use a new --out"
            ) from None
    flat_old, flat_new = _flat(old), _flat(cfg.content_config())
    diffs = [
        f"{key}: {flat_old.get(key)!r} -> {flat_new.get(key)!r}"
        for key in sorted(set(flat_old) | set(flat_new))
        if _comparable(flat_old.get(key)) != _comparable(flat_new.get(key))
    ]
    if legacy and not diffs:
        return
    what = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "") if diffs else "config_hash differs"
    raise EngineError(
        f"{out} holds a pool made with other settings ({what}); use a new --out or the same settings"
    )


def _comparable(value: Any) -> str:
    """JSON text of a config value, for comparing (a hand-edited manifest may hold Infinity)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _flat(config: Any) -> dict[str, Any]:
    """A content config with its generator settings lifted to the top level (for naming differences)."""
    if not isinstance(config, dict):
        return {"config": config}
    out = {key: value for key, value in config.items() if key != "settings"}
    settings = config.get("settings")
    if isinstance(settings, dict):
        out.update({(f"settings.{k}" if k in out else k): v for k, v in settings.items()})
    elif "settings" in config:
        out["settings"] = settings
    return out


def add_shard(manifest: dict[str, Any], entry: dict[str, Any], stats: dict[str, Any] | None = None) -> None:
    """List a committed shard (replacing an older entry of the same number) and update the counters."""
    manifest["shardlist"] = [e for e in manifest["shardlist"] if e["shard"] != entry["shard"]]
    manifest["shardlist"].append({k: entry[k] for k in ENTRY_FIELDS})
    manifest["shardlist"].sort(key=lambda e: e["shard"])
    shard_stats = manifest["stats"].setdefault("shards", {})
    shard_stats[str(entry["shard"])] = dict(stats or {})
    _recount(manifest)


def _recount(manifest: dict[str, Any]) -> None:
    stats = manifest["stats"]
    listed = {str(e["shard"]) for e in manifest["shardlist"]}
    stats["shards"] = {s: v for s, v in stats.get("shards", {}).items() if s in listed}
    stats["images"] = sum(e["nsamples"] for e in manifest["shardlist"])
    stats["rejected"] = sum(int(v.get("rejected", 0)) for v in stats["shards"].values())
    stats["seconds"] = round(sum(float(v.get("seconds", 0.0)) for v in stats["shards"].values()), 3)
    num_shards = -(-manifest["num_samples"] // manifest["shard_size"])
    manifest["complete"] = len(manifest["shardlist"]) == num_shards


def missing_shards(manifest: dict[str, Any]) -> list[int]:
    num_shards = -(-manifest["num_samples"] // manifest["shard_size"])
    listed = {e["shard"] for e in manifest["shardlist"]}
    return [s for s in range(num_shards) if s not in listed]


_MANIFEST_TMP_RE = re.compile(rf"^{re.escape(MANIFEST_NAME)}\.tmp-[0-9a-zA-Z]+$")


def _shard_re(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}-\d{{6,}}\.tar(\.tmp-[0-9a-zA-Z]+)?$")


def reconcile(out: str, manifest: dict[str, Any]) -> list[int]:
    """Make the directory agree with the manifest; return the shards still to do.

    Keeps a listed shard only if its file exists with the listed size; deletes temporary files and
    shard tars the manifest does not list (only names matching `<prefix>-NNNNNN.tar[.tmp-*]`, and
    `manifest.json.tmp-*` left by a driver killed while saving: other files in the directory are
    the user's). Saves the manifest if entries were dropped. Call it holding the pool lock.
    """
    names = _list_names(out)
    sizes = {name: size for name, size in names.items()}
    kept = [e for e in manifest["shardlist"] if sizes.get(e["url"]) == e["filesize"]]
    dropped = len(kept) != len(manifest["shardlist"])
    manifest["shardlist"] = kept
    listed = {e["url"] for e in kept}
    pattern = _shard_re(manifest["prefix"])
    for name in names:
        if (pattern.match(name) and name not in listed) or _MANIFEST_TMP_RE.match(name):
            _remove(join(out, name))
    if dropped:
        _recount(manifest)
        save_manifest(out, manifest)
    return missing_shards(manifest)


def remove_temp_files(out: str, prefix: str) -> None:
    """Delete temporary shard files (after a run, when no worker is writing any more)."""
    for name in _list_names(out):
        if ".tar.tmp-" in name and _shard_re(prefix).match(name):
            _remove(join(out, name))


def _list_names(out: str) -> dict[str, int]:
    """File name -> size for the files directly inside `out`."""
    if is_local(out):
        path = local_path(out)
        result = {}
        with os.scandir(path) as it:
            for entry in it:
                if entry.is_file(follow_symlinks=False):
                    result[entry.name] = entry.stat().st_size
        return result
    import fsspec

    fs, path = fsspec.core.url_to_fs(out)
    fs.invalidate_cache(path)  # workers in other processes wrote here: list afresh
    if not fs.exists(path):  # a fresh object-store prefix: nothing written yet
        return {}
    return {
        info["name"].rstrip("/").rsplit("/", 1)[-1]: int(info.get("size") or 0)
        for info in fs.ls(path, detail=True)
        if info.get("type") == "file"
    }


def _remove(url: str) -> None:
    if is_local(url):
        try:
            os.remove(local_path(url))
        except FileNotFoundError:
            pass
    else:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        fs.rm_file(path)
