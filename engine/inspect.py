"""Look at a pool: manifest summary, class coverage, and a contact sheet of samples with prompts.

Reads only manifest-listed shards (SHARDS.md: a reader trusts only the manifest), as a chain of
small generators in the webdataset style: shard urls -> tar members -> samples (dicts).
"""

from __future__ import annotations

import io
import json
import tarfile
import textwrap
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from engine.errors import EngineError
from engine.manifest import load_manifest
from engine.writer import join

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def shard_urls(out: str, manifest: dict[str, Any]) -> list[str]:
    return [join(out, entry["url"]) for entry in manifest["shardlist"]]


def tar_members(url: str, want: tuple[str, ...]) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) of the members of one shard whose extension is in `want`."""
    import fsspec

    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if ext in want:
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                yield key, ext, data


def samples(urls: Iterable[str], images: bool = True) -> Iterator[dict[str, Any]]:
    """Group members by key into samples: {"__key__", "json", and "image"/"ext" if `images`}."""
    want = ("json", *IMAGE_EXTS) if images else ("json",)
    for url in urls:
        current: dict[str, Any] = {}
        for key, ext, data in tar_members(url, want):
            if current and current["__key__"] != key:
                yield current
                current = {}
            current["__key__"] = key
            if ext == "json":
                current["json"] = json.loads(data.decode("utf-8"))
            else:
                current["image"], current["ext"] = data, ext
        if current:
            yield current


def class_coverage(out: str, manifest: dict[str, Any]) -> Counter[int]:
    """How many samples mix in each class id (every class of every sample counts)."""
    counts: Counter[int] = Counter()
    for sample in samples(shard_urls(out, manifest), images=False):
        counts.update(sample["json"].get("class_ids", []))
    return counts


def contact_sheet(items: list[dict[str, Any]], path: str, columns: int = 4, cell: int = 160) -> str:
    """A grid of images, each captioned with its key and (wrapped) prompt; saved as PNG at `path`."""
    import fsspec
    from PIL import Image, ImageDraw, ImageFont

    if not items:
        raise EngineError("no samples to put on a contact sheet")
    font = ImageFont.load_default()
    line_h, chars = 12, max(8, cell // 6)
    captions = [[it["__key__"], *textwrap.wrap(it["json"].get("prompt", ""), chars)[:4]] for it in items]
    caption_h = line_h * max(len(c) for c in captions) + 6
    columns = max(1, min(columns, len(items)))
    rows = -(-len(items) // columns)
    sheet = Image.new("RGB", (columns * cell, rows * (cell + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (item, caption) in enumerate(zip(items, captions)):
        x, y = (i % columns) * cell, (i // columns) * (cell + caption_h)
        image = Image.open(io.BytesIO(item["image"])).convert("RGB")
        image.thumbnail((cell - 4, cell - 4))
        if max(image.size) < cell - 4:  # tiny images (the tiny preset's 32 px): scale up, keep pixels sharp
            scale = (cell - 4) // max(image.size)
            image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        sheet.paste(image, (x + (cell - image.width) // 2, y + 2))
        for j, line in enumerate(caption):
            draw.text((x + 3, y + cell + 2 + j * line_h), line, fill="black", font=font)
    try:
        with fsspec.open(path, "wb") as f:
            sheet.save(f, format="PNG")
    except OSError as exc:
        raise EngineError(f"cannot write contact sheet {path}: {exc}") from None
    return path


def inspect_pool(out: str, num: int = 16, sheet: str | None = None, columns: int = 4) -> dict[str, Any]:
    """Summary of pool `out`; writes a contact sheet of its first `num` samples to `sheet` if given."""
    manifest = load_manifest(out)
    if manifest is None:
        raise EngineError(f"{out} has no manifest.json (not a dfq pool, or nothing committed yet)")
    urls = shard_urls(out, manifest)
    counts = class_coverage(out, manifest)
    num_classes = int(manifest["config"].get("num_classes", 0)) or (max(counts) + 1 if counts else 0)
    per_class = [counts.get(c, 0) for c in range(num_classes)]
    report: dict[str, Any] = {
        "out": out,
        "name": manifest.get("name"),
        "num_samples": manifest["num_samples"],
        "samples_committed": sum(e["nsamples"] for e in manifest["shardlist"]),
        "shards_committed": len(manifest["shardlist"]),
        "shards_total": -(-manifest["num_samples"] // manifest["shard_size"]),
        "complete": bool(manifest.get("complete")),
        "config": manifest["config"],
        "config_hash": manifest.get("config_hash"),
        "stats": {
            k: v for k, v in manifest.get("stats", {}).items() if k in ("images", "rejected", "seconds")
        },
        "coverage": {
            "num_classes": num_classes,
            "classes_covered": sum(1 for n in per_class if n),
            "min": min(per_class) if per_class else 0,
            "max": max(per_class) if per_class else 0,
            "most_common": counts.most_common(5),
        },
        "sheet": None,
    }
    if sheet is not None and num > 0:
        items = []
        for item in samples(urls):
            items.append(item)
            if len(items) >= num:
                break
        if items:
            report["sheet"] = contact_sheet(items, sheet, columns=columns)
    return report


def format_report(report: dict[str, Any]) -> str:
    cfg, cov = report["config"], report["coverage"]
    lines = [
        f"pool {report['name']!r} at {report['out']}",
        f"  samples  {report['samples_committed']}/{report['num_samples']} in "
        f"{report['shards_committed']}/{report['shards_total']} shards, "
        + ("complete" if report["complete"] else "INCOMPLETE"),
        f"  rejected {report['stats'].get('rejected', 0)} images regenerated",
        f"  classes  {cov['classes_covered']}/{cov['num_classes']} covered, per class min {cov['min']} max {cov['max']}; "
        f"most common {', '.join(f'{c}:{n}' for c, n in cov['most_common'])}",
        f"  config   {report['config_hash'][:12] if report['config_hash'] else '?'}",
    ]
    lines += [f"    {key} = {json.dumps(cfg[key])}" for key in sorted(cfg)]
    if report["sheet"]:
        lines.append(f"  contact sheet: {report['sheet']}")
    return "\n".join(lines)
