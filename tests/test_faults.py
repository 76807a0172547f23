"""Fault injection: whatever dies or fails mid-run, the pool loses and duplicates nothing.

Every scenario ends with `assert_pool_exact`: the manifest is complete, every listed shard's bytes
hash to the manifest's sha256 *and* to the same shard of a reference pool made without faults, and
the tars hold every sample index in `[0, N)` exactly once; no temp file, lock or stray tar is left.

Faults: a worker SIGKILLed from outside while it writes a shard; the driver SIGKILLed after its
first commit (a real `dfq generate` subprocess) and resumed, over extra leftovers (a truncated
unlisted tar, a listed tar of the wrong size, a temp shard, a manifest temp); a second driver while
the first runs; a disk that fills up inside a worker, at the writer's write, fsync and rename, and
under the driver's manifest write.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time

import pytest

from engine.config import GenerateConfig
from engine.diffusion import DiffusionGenerator
from engine.generators import GENERATORS, GeneratorSpec
from engine.lock import PoolLock
from engine.manifest import add_shard, load_manifest, new_manifest, reconcile, save_manifest
from engine.worker import ShardWorker
from engine.writer import ShardWriter, encode_image, file_sha256
from launch.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, SHARD = 8, 2  # 4 shards of 2 samples: cheap, and enough shards to fail in the middle of a run
GEN_ARGS = ["--preset", "tiny", "--num-images", str(N), "--shard-size", str(SHARD), "--steps", "2"]
GEN_ARGS += ["--batch-size", "2", "--no-progress"]


def tiny_cfg(out, **kw) -> GenerateConfig:
    """The API twin of `dfq generate <GEN_ARGS>`."""
    base = {"preset": "tiny", "num_images": N, "shard_size": SHARD, "settings": {"steps": 2}, "batch_size": 2}
    return GenerateConfig(out=str(out), **{**base, "workers": 2, "progress": False, **kw})


def shard_names() -> list[str]:
    return [f"shard-{s:06d}.tar" for s in range(N // SHARD)]


def manifest_of(out) -> dict:
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def tar_indices(path: str) -> list[int]:
    """Sample indices of one shard, read with plain `tarfile` from the per-sample JSON."""
    with tarfile.open(path) as tar:
        return [
            json.loads(tar.extractfile(m).read())["index"]  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.name.endswith(".json")
        ]


def assert_pool_exact(out: str, reference: dict[str, str]) -> None:
    """Complete, every shard's bytes = manifest sha256 = reference, every index exactly once, no debris."""
    manifest = manifest_of(out)
    assert manifest["complete"] and [e["url"] for e in manifest["shardlist"]] == shard_names()
    indices = []
    for entry in manifest["shardlist"]:
        path = os.path.join(out, entry["url"])
        assert os.path.getsize(path) == entry["filesize"]
        assert file_sha256(path) == entry["sha256"] == reference[entry["url"]], entry["url"]
        indices += tar_indices(path)
    assert indices == list(range(N))
    assert sorted(os.listdir(out)) == ["manifest.json", *shard_names()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The pool made without any fault, in-process, by the same worker code a Ray actor runs."""
    import torch

    out = str(tmp_path_factory.mktemp("faults") / "reference")
    os.makedirs(out)
    cfg = tiny_cfg(out).resolved()
    threads = torch.get_num_threads()
    try:
        worker = ShardWorker(cfg, threads=1, quiet=True, device="cpu")
        manifest = new_manifest(cfg)
        for shard in range(cfg.num_shards):
            add_shard(manifest, worker.run_unit(shard))
    finally:
        torch.set_num_threads(threads)
    save_manifest(out, manifest)
    hashes = {e["url"]: e["sha256"] for e in manifest["shardlist"]}
    assert_pool_exact(out, hashes)
    return {"out": out, "sha256": hashes}


# ---------------------------------------------------------------------------- helpers: processes
def pids_holding_open(path: str) -> list[int]:
    """Processes with `path` open (Linux /proc): how the test learns which actor writes a shard."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == path for fd in fds):
                found.append(int(pid))
        except OSError:  # gone, or not ours to look at
            continue
    return found


def wait_for(predicate, timeout: float, what: str, step: float = 0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def listed_shards(out: str) -> list[int]:
    try:
        return [e["shard"] for e in manifest_of(out)["shardlist"]]
    except (OSError, ValueError):
        return []


# ---------------------------------------------------------------------------- worker killed
@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds the writing actor through /proc")
def test_worker_killed_from_outside_mid_shard_is_replaced(ray_local, reference, tmp_path) -> None:
    """A watcher thread waits for the first `*.tar.tmp-*`, finds the actor process that has it open
    and SIGKILLs it (as the OOM killer or a preempted node would): the driver requeues the shard on a
    new actor, and the pool is byte-identical to the reference."""
    out = str(tmp_path / "pool")
    os.makedirs(out)
    killed: dict = {}

    def watcher() -> None:
        def writing():
            for name in os.listdir(out):
                if ".tar.tmp-" in name:
                    path = os.path.join(out, name)
                    pids = [p for p in pids_holding_open(path) if p != os.getpid()]
                    if pids:
                        return path, pids[0]
            return None

        try:
            path, pid = wait_for(writing, 600, "a worker writing a temp shard", step=0.002)
            os.kill(pid, signal.SIGKILL)
            killed.update(pid=pid, tmp=path, mid_shard=os.path.exists(path))
        except Exception as exc:  # reported by the main thread
            killed["error"] = repr(exc)

    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    summary = generate_in_process(tiny_cfg(out))
    thread.join(10)
    assert "error" not in killed, killed
    assert killed["mid_shard"], "the kill landed after the shard was renamed, not mid-shard"
    assert summary["complete"] and summary["actor_restarts"] == 1
    assert not os.path.exists(killed["tmp"])  # the dead writer's temp file was cleaned up
    assert_pool_exact(out, reference["sha256"])


def generate_in_process(cfg: GenerateConfig) -> dict:
    from engine.driver import generate

    return generate(cfg)


# ---------------------------------------------------------------------------- driver killed
@pytest.mark.slow
def test_driver_killed_after_first_commit_resumes_over_leftovers(
    ray_local, reference, tmp_path, capsys
) -> None:
    """`dfq generate` (a subprocess joined to the test's Ray cluster, one worker, so shards commit
    one at a time) is SIGKILLed right after its first commit. Meanwhile a second driver on the same
    output is refused. The resumed run keeps the committed shards untouched and redoes only the rest,
    discarding leftovers planted as a crash (or a careless copy) would leave them."""
    out = str(tmp_path / "pool")
    address = ray_local.get_runtime_context().gcs_address
    argv = ["generate", "--out", out, *GEN_ARGS, "--workers", "1", "--address", address]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: listed_shards(out) or proc.poll() is not None, 240, "the first commit", step=0.01)
        # one writer: a second driver on the same pool is refused while the first runs
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"dfq generate: error: another dfq generate is running on {out}"
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr[-2000:]

    committed = listed_shards(out)
    assert committed and len(committed) < N // SHARD, "the driver was not killed mid-run"
    before = {s: os.stat(os.path.join(out, f"shard-{s:06d}.tar")) for s in committed}
    with PoolLock(out):  # the kernel dropped the dead driver's flock: the pool is free again
        pass
    # the dead driver's actors die with it (Ray fate-shares them): wait until their CPUs are back
    wait_for(lambda: ray_local.available_resources().get("CPU", 0) >= 2, 60, "the dead job's actors", 0.1)

    missing = [s for s in range(N // SHARD) if s not in committed]
    ref = reference["out"]
    partial = open(os.path.join(ref, f"shard-{missing[-1]:06d}.tar"), "rb").read()
    with open(os.path.join(out, f"shard-{missing[-1]:06d}.tar"), "wb") as f:  # unlisted, truncated
        f.write(partial[: len(partial) // 2])
    with open(os.path.join(out, f"shard-{missing[0]:06d}.tar.tmp-0dead"), "wb") as f:  # a temp
        f.write(partial[:1000])
    with open(os.path.join(out, "manifest.json.tmp-0dead"), "w") as f:  # a torn manifest write
        f.write('{"format": "dfq-sh')
    victim = committed[-1]  # listed, but longer than the manifest says: not trusted, redone
    with open(os.path.join(out, f"shard-{victim:06d}.tar"), "ab") as f:
        f.write(b"\0" * 512)
    kept = [s for s in committed if s != victim]

    assert main(argv) == 0
    assert "complete" in capsys.readouterr().out
    assert_pool_exact(out, reference["sha256"])
    for s in kept:  # committed shards are not rewritten
        after = os.stat(os.path.join(out, f"shard-{s:06d}.tar"))
        assert (after.st_ino, after.st_mtime_ns) == (before[s].st_ino, before[s].st_mtime_ns)


# ---------------------------------------------------------------------------- disk full
FULL_TOKEN_ENV = "DFQ_TEST_DISK_FULL_TOKEN"


class DiskFullGenerator(DiffusionGenerator):
    """The diffusion generator, plus a one-shot disk-full fault installed in the actor process:
    the first write past 1 KiB into shard 1's temp file raises ENOSPC (as a full disk does).

    `prepare` runs in the driver (the test process) and hands the token file's path to the actors;
    the fault fires only while the token exists and deletes it, so a re-run succeeds. Samples keep
    the name "diffusion", so shard bytes equal the reference's.
    """

    name = "diffusion"

    @classmethod
    def prepare(cls, cfg, pipe=None) -> dict:
        return {**super().prepare(cfg, pipe), "full_token": os.environ.get(FULL_TOKEN_ENV)}

    def __init__(self, cfg, *, full_token: str | None = None, **kw) -> None:
        super().__init__(cfg, **kw)
        if full_token:
            install_disk_full(full_token, "shard-000001.tar.tmp-", after=1024)


def install_disk_full(token: str, name_part: str, after: int) -> None:
    import engine.writer

    write = engine.writer._HashingSink.write

    def full_write(self, data: bytes) -> int:
        if name_part in str(getattr(self.raw, "name", "")) and self.size + len(data) > after:
            try:
                os.remove(token)
            except FileNotFoundError:
                return write(self, data)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, data)

    engine.writer._HashingSink.write = full_write  # type: ignore[method-assign]


@pytest.mark.slow
@pytest.mark.skipif(os.path.abspath(os.curdir) != ROOT, reason="actors import tests.* from the cwd")
def test_disk_full_in_a_worker_fails_cleanly_then_resumes(
    ray_local, reference, tmp_path, monkeypatch, capsys
) -> None:
    """Shard 1's worker hits ENOSPC mid-write: `dfq generate` fails in one line naming the shard,
    nothing of shard 1 is committed (no final tar, no manifest entry, no temp), the shards that did
    commit are intact, and re-running the same command completes the pool."""
    token = tmp_path / "disk-full-token"
    token.write_text("fire once")
    monkeypatch.setenv(FULL_TOKEN_ENV, str(token))
    monkeypatch.syspath_prepend(ROOT)  # Ray actors find `tests` through the driver's cwd (Ray's default)
    spec = GeneratorSpec("tests.test_faults:DiskFullGenerator", GENERATORS["diffusion"].settings)
    monkeypatch.setitem(GENERATORS, "diskfull-test", spec)
    out = str(tmp_path / "pool")
    argv = ["generate", "--out", out, *GEN_ARGS, "--workers", "1", "--generator", "diskfull-test"]

    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dfq generate: failed: shard 1"), err
    assert "No space left on device" in err[0]
    assert not token.exists()  # the fault fired
    listed = listed_shards(out)
    assert listed == [0], "one worker: shard 0 committed, shard 1 failed, nothing after it started"
    assert sorted(os.listdir(out)) == ["manifest.json", *(f"shard-{s:06d}.tar" for s in listed)]
    for entry in manifest_of(out)["shardlist"]:
        path = os.path.join(out, entry["url"])
        assert file_sha256(path) == entry["sha256"] == reference["sha256"][entry["url"]]

    assert main(argv) == 0  # space is back: the same command resumes
    assert_pool_exact(out, reference["sha256"])


class FullFile:
    """A file on a disk that fills up: writes fail past `room` bytes, and `flush` may fail too."""

    def __init__(self, raw, room: int, fail_flush: bool = False) -> None:
        self.raw, self.room, self.fail_flush = raw, room, fail_flush

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        if self.fail_flush:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.raw.flush()

    def __getattr__(self, name: str):
        return getattr(self.raw, name)


def _sample(writer: ShardWriter, index: int) -> None:
    from PIL import Image

    image = Image.effect_noise((16, 16), 64 + index).convert("RGB")
    meta = {"index": index, "key": f"s{index:09d}", "class_ids": [index]}
    writer.add_sample(f"s{index:09d}", encode_image(image, "png"), "png", meta, index)


@pytest.mark.parametrize("where", ["write", "flush", "fsync", "rename"])
def test_disk_full_at_the_writer_leaves_nothing_half_committed(tmp_path, monkeypatch, where: str) -> None:
    """ENOSPC at any step of writing or committing a shard: the error surfaces, and neither the final
    name nor the temp file remains (an unflushed or un-fsynced file must never be renamed into place)."""
    final = tmp_path / "shard-000000.tar"
    with pytest.raises(OSError) as caught, ShardWriter(str(final)) as writer:
        if where == "write":  # the tar stream's writes hit the full disk mid-sample
            writer._sink.raw = FullFile(writer._raw, room=1500)
        elif where == "flush":  # buffered bytes cannot be written out at commit
            writer._raw = FullFile(writer._raw, room=0, fail_flush=True)
        elif where == "fsync":
            monkeypatch.setattr("engine.writer.os.fsync", _raise_enospc)
        else:
            monkeypatch.setattr("engine.writer.os.replace", _raise_enospc)
        for i in range(4):
            _sample(writer, i)
        writer.commit()
    assert caught.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


def _raise_enospc(*_args) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_under_the_manifest_keeps_the_old_one_and_reports_one_line(
    reference, tmp_path, monkeypatch, capsys
) -> None:
    """The driver cannot write manifest.json (disk full): `dfq generate` ends with one line and exit 1,
    the previous manifest is intact, no manifest temp is left, and the pool still reads."""
    out = str(tmp_path / "pool")
    shutil.copytree(reference["out"], out)
    before = open(os.path.join(out, "manifest.json"), "rb").read()
    monkeypatch.setattr("engine.manifest.os.fsync", _raise_enospc)
    assert main(["generate", "--out", out, *GEN_ARGS, "--workers", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dfq generate: failed:") and "No space left" in err[0], err
    assert open(os.path.join(out, "manifest.json"), "rb").read() == before
    assert sorted(os.listdir(out)) == ["manifest.json", *shard_names()]
    monkeypatch.undo()
    assert_pool_exact(out, reference["sha256"])
    assert load_manifest(out)["complete"]


def test_resume_discards_a_torn_manifest_temp(reference, tmp_path) -> None:
    """A driver killed inside save_manifest leaves `manifest.json.tmp-*`: reconcile removes it (and
    never reads it); shards listed in the real manifest are kept."""
    out = str(tmp_path / "pool")
    shutil.copytree(reference["out"], out)
    (tmp_path / "pool" / "manifest.json.tmp-1a2b").write_text('{"shardlist": [')
    assert reconcile(out, load_manifest(out)) == []
    assert_pool_exact(out, reference["sha256"])


# ---------------------------------------------------------------------------- reader side
def flip_png_byte(pool: str, shard: str = "shard-000001.tar") -> str:
    """Flip one byte inside the first PNG of `shard` (in its IHDR chunk, so decoding fails for sure);
    the file keeps its size and the manifest is left alone, as bit rot would. Returns the sample key."""
    path = os.path.join(pool, shard)
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    with open(path, "r+b") as f:
        f.seek(member.offset_data + 16)  # 8-byte signature, IHDR length and type, then the width
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    return member.name.split(".")[0]


@pytest.fixture
def rotten_pool(reference, tmp_path) -> tuple[str, str]:
    out = str(tmp_path / "pool")
    shutil.copytree(reference["out"], out)
    return out, flip_png_byte(out)


def test_reader_skips_or_names_the_one_corrupt_sample_of_an_engine_pool(rotten_pool) -> None:
    from quant.errors import QuantError
    from quant.reader import ReadStats, iter_samples, shard_urls

    pool, key = rotten_pool
    assert len(shard_urls(pool, verify="size")) == N // SHARD  # same size: only sha256 can tell
    with pytest.raises(QuantError, match="shard-000001.tar sha256"):
        shard_urls(pool, verify="sha256")
    with pytest.raises(QuantError, match=f"corrupt sample {key} in .*shard-000001.tar"):
        list(iter_samples(pool))
    stats = ReadStats()
    indices = [s["json"]["index"] for s in iter_samples(pool, on_error="skip", stats=stats)]
    bad = int(key[1:])
    assert indices == [i for i in range(N) if i != bad]
    assert (stats.samples, stats.skipped, len(stats.errors)) == (N - 1, 1, 1) and key in stats.errors[0]


@pytest.mark.parametrize("verify", ["size", "sha256"])
def test_cli_refuses_a_corrupt_pool_in_one_line(rotten_pool, tmp_path, capsys, verify: str) -> None:
    """`dfq quantize` names the corrupt sample (or, with --verify sha256, the shard, before any
    model work); `dfq inspect` reports the pool in one line instead of a traceback."""
    pool, key = rotten_pool
    argv = ["quantize", "--model", "cifar_resnet20", "--calib", pool, "--n-calib", str(N), "--method"]
    argv += ["rtn", "--out", str(tmp_path / "q"), "--no-progress", "--verify", verify]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert ("shard shard-000001.tar sha256" if verify == "sha256" else f"corrupt sample {key}") in err
    assert not (tmp_path / "q" / "quantized.pt").exists()

    assert main(["inspect", pool, "--sheet", str(tmp_path / "sheet.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"dfq inspect: error: cannot read pool {pool}")
