"""Write one shard: deterministic tar bytes, committed atomically, with its size and sha256.

Local files (plain paths and `file://` URLs, e.g. a shared mount on a cluster):
`<final>.tmp-<random>` in the same directory, flushed and fsynced, `os.replace`d to the final name
(atomic on POSIX), and the directory fsynced so the rename survives a power cut.
Other fsspec URLs (s3://, gs://, ...; object stores have no rename): the shard is built in memory
and the whole object written in one put, so no partial object is ever visible under its name.

Tar members carry mtime 0, uid/gid 0, fixed user/group names and mode 0444 (SHARDS.md), so the same
samples always give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import tarfile
from typing import Any, BinaryIO

from PIL import Image

TAR_UNAME = "dfq"
TAR_GNAME = "dfq"
TAR_MODE = 0o444

_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def committed_size(url: str) -> int | None:
    """Size of the file at `url` as this process sees it now (no cached listing), None when absent.

    The driver checks each shard a worker reports as committed: on a cluster, an output that is
    not shared storage (a node-local directory) would otherwise list shards it cannot read.
    """
    if is_local(url):
        try:
            return os.path.getsize(local_path(url))
        except FileNotFoundError:
            return None
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(path)  # object-store clients cache listings; another process wrote this object
    try:
        return int(fs.size(path))
    except FileNotFoundError:
        return None


def fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def encode_image(image: Image.Image, fmt: str, quality: int = 95) -> bytes:
    """RGB 8-bit bytes in `png`, `jpg` or `webp`; no metadata, so the bytes depend on pixels only."""
    buf = io.BytesIO()
    image = image.convert("RGB")
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=6)
    elif fmt in ("jpg", "webp"):
        image.save(buf, format=_PIL_FORMATS[fmt], quality=quality)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


def sample_json(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class _HashingSink:
    """A write-only file wrapper counting bytes and hashing them on the way through."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.size, self.sha = raw, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)


class ShardWriter:
    """Streams samples into a tar under a temporary name; `commit()` publishes it atomically.

    Use as a context manager: leaving the block by an exception removes the temporary file.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.local = is_local(url)
        if self.local:
            self.final = local_path(url)
            self.tmp = f"{self.final}.tmp-{secrets.token_hex(4)}"
            self._raw: BinaryIO = open(self.tmp, "wb")  # noqa: SIM115 (closed in commit/abort)
        else:
            self.final, self.tmp = url, None
            self._raw = io.BytesIO()
        self._sink = _HashingSink(self._raw)
        self._tar = tarfile.open(fileobj=self._sink, mode="w|", format=tarfile.USTAR_FORMAT)  # type: ignore[call-overload]
        self.nsamples = 0
        self._closed = False

    def add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, TAR_MODE
        info.uid = info.gid = 0
        info.uname, info.gname = TAR_UNAME, TAR_GNAME
        self._tar.addfile(info, io.BytesIO(data))

    def add_sample(self, key: str, image: bytes, ext: str, meta: dict[str, Any], cls: int) -> None:
        """One sample: `<key>.<ext>`, `<key>.json`, `<key>.cls`, in that order."""
        if "." in key:
            raise ValueError(f"sample keys must not contain dots: {key!r}")
        self.add_member(f"{key}.{ext}", image)
        self.add_member(f"{key}.json", sample_json(meta))
        self.add_member(f"{key}.cls", str(int(cls)).encode("ascii"))
        self.nsamples += 1

    def flush_partial(self) -> None:
        """Push buffered bytes to the temporary file (used by the crash test hook)."""
        self._raw.flush()

    def commit(self) -> tuple[int, str]:
        """Finish the tar, make it durable, publish it under its final name; returns (size, sha256).

        If any step fails (a full disk fails the last writes, the flush or the fsync), the temp file
        is removed and nothing appears under the final name: the error propagates.
        """
        try:
            self._tar.close()
            if self.local:
                self._raw.flush()
                os.fsync(self._raw.fileno())
                self._raw.close()
                os.replace(self.tmp, self.final)  # type: ignore[arg-type]
            else:
                import fsspec

                with fsspec.open(self.final, "wb") as f:
                    f.write(self._raw.getvalue())  # type: ignore[attr-defined]
        except BaseException:
            self.abort()
            raise
        self._closed = True
        if self.local:
            fsync_dir(os.path.dirname(os.path.abspath(self.final)))
        return self._sink.size, self._sink.sha.hexdigest()

    def abort(self) -> None:
        """Drop the shard: close quietly (the caller has the real error) and delete the temp file."""
        if self._closed:
            return
        self._closed = True
        try:
            self._tar.close()  # else its stream flushes into the closed file when garbage-collected
        except Exception:
            pass
        try:
            self._raw.close()  # a full disk fails the flush inside close; the fd is closed anyway
        except Exception:
            pass
        finally:
            if self.tmp is not None and os.path.exists(self.tmp):
                os.remove(self.tmp)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
