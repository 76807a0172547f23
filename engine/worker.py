"""Turn a work unit (a shard number) into a committed shard: generate, encode, write, commit.

`ShardWorker`, plain Python, owns one generator (engine.generators) and writes shards with
`ShardWriter`. The driver wraps it with `ray.remote` at run time (one actor per GPU, or per CPU
worker), so images go from the actor straight into the shard file and only a small stats dict
travels back. Each generated batch is PNG-encoded and appended to the tar on a background thread
(in submission order, so the bytes equal the serial path's) while the next batch is generated.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from engine.errors import GenerationError
from engine.generators import Generator, build_generator
from engine.records import sample_key

if TYPE_CHECKING:
    from engine.config import GenerateConfig


class ShardWorker:
    """Plain-Python worker: holds a warm generator, turns shard numbers into committed shards.

    `threads` (CPU actors) pins torch to that many threads so N actors share N cores without
    oversubscription; `quiet` silences library warnings in actor processes. `overlap` (default on)
    encodes and writes each batch on a background thread while the next one is generated; the shard
    bytes are the same either way. A compiled generator is warmed up here, at actor start.
    """

    def __init__(
        self,
        cfg: GenerateConfig,
        context: dict[str, Any] | None = None,
        *,
        threads: int | None = None,
        quiet: bool = False,
        device: str | None = None,
        target: str | None = None,
        generator: Generator | None = None,
        overlap: bool = True,
    ) -> None:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        if quiet:
            _quiet_libraries()
        self.cfg = cfg
        if generator is None:
            generator = build_generator(cfg, target, device=device, **(context or {}))
        self.generator = generator
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.overlap = overlap
        self.encoders = encoder_threads(threads)
        # a work unit is cut into the generator's batches (the run's batch size if it has none)
        own = getattr(generator, "batch_size", None)
        self.batch_size = (
            int(own) if own is not None else (8 if cfg.batch_size == "auto" else int(cfg.batch_size))
        )
        self.warmup: dict[str, float] = {}
        warmup = getattr(generator, "warmup", None)
        if cfg.compile and warmup is not None:
            self.warmup = dict(warmup())
        self.node_id = _ray_node_id()

    def ready(self) -> dict[str, Any]:
        """Called once by the driver: returns when the pipeline is loaded (or raises its load error)."""
        pipe = getattr(self.generator, "pipe", None)
        return {
            "pid": os.getpid(),
            "worker": self.worker_id,
            "device": str(getattr(pipe, "device", "n/a")),
            "batch_size": self.batch_size,
            **self.warmup,
        }

    def pid(self) -> int:
        return os.getpid()

    def run_unit(self, shard: int, fault: bool = False) -> dict[str, Any]:
        """Generate shard `shard` and commit it; returns its manifest entry plus stats.

        `fault` (test hook) SIGKILLs this process after the first batch reached the temp file.
        """
        from engine.writer import ShardWriter, join

        cfg = self.cfg
        start = time.perf_counter()
        indices = list(cfg.shard_indices(shard))
        name = cfg.shard_name(shard)
        rejected = 0
        with ShardWriter(join(cfg.out, name)) as writer:
            sink = (
                _BackgroundSink(writer, cfg, encoders=self.encoders)
                if self.overlap
                else _SerialSink(writer, cfg)
            )
            try:
                for pos in range(0, len(indices), self.batch_size):
                    chunk = indices[pos : pos + self.batch_size]
                    pairs = self.generator.generate(chunk)
                    got = [meta.get("index") for _, meta in pairs]
                    if got != chunk:
                        raise GenerationError(f"generator returned indices {got[:4]}... for {chunk[:4]}...")
                    rejected += sum(int(meta.get("rejected", 0)) for _, meta in pairs)
                    sink.put(pairs)
                    if fault:
                        sink.drain()
                        writer.flush_partial()
                        os.kill(os.getpid(), signal.SIGKILL)
            finally:
                sink.close()
            size, sha = writer.commit()
        return {
            "url": name,
            "nsamples": len(indices),
            "filesize": size,
            "sha256": sha,
            "shard": shard,
            "first_index": indices[0],
            "rejected": rejected,
            "seconds": round(time.perf_counter() - start, 3),
            "worker": self.worker_id,
            "node": self.node_id,
        }


def _ray_node_id() -> str | None:
    """The Ray node this worker runs on (None outside Ray): which machine wrote a shard."""
    ray = sys.modules.get("ray")  # a Ray worker process has imported it; never import it here
    try:
        return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    except Exception:  # no runtime context
        return None


def _write_pairs(
    writer: Any, cfg: GenerateConfig, pairs: list[tuple[Any, dict[str, Any]]], pool: Any = None
) -> None:
    """Encode and append one batch of (image, sample JSON) pairs, in order. With `pool` (a thread
    pool) images are encoded in parallel (zlib releases the GIL) and still appended in order."""
    from engine.writer import encode_image

    def encode(pair: tuple[Any, dict[str, Any]]) -> bytes:
        return encode_image(pair[0], cfg.image_format, cfg.quality)

    encoded = pool.map(encode, pairs) if pool is not None else map(encode, pairs)
    for (_, meta), image_bytes in zip(pairs, encoded):
        writer.add_sample(
            sample_key(meta["index"]), image_bytes, cfg.image_format, meta, meta["class_ids"][0]
        )


def encoder_threads(pinned_threads: int | None) -> int:
    """Image-encoding threads of a worker: 1 for a CPU actor pinned to a few cores (encoding would
    steal them from generation), else up to 8 (a GPU actor's host cores are idle while it denoises,
    and encoding a batch must take less time than denoising the next)."""
    if pinned_threads is not None:
        return 1
    return max(1, min(8, os.cpu_count() or 1))


class _SerialSink:
    """Encode and write on the calling thread (the reference path)."""

    def __init__(self, writer: Any, cfg: GenerateConfig) -> None:
        self.writer, self.cfg = writer, cfg

    def put(self, pairs: list[tuple[Any, dict[str, Any]]]) -> None:
        _write_pairs(self.writer, self.cfg, pairs)

    def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


class _BackgroundSink:
    """Encode and write on one background thread, batches in the order given (so the same bytes as
    `_SerialSink`), while the caller generates the next batch; `encoders` > 1 encodes a batch's
    images on that many threads (still written in order). PNG encoding (zlib) and file writes
    release the GIL. At most `depth` batches wait, which bounds memory; an error on the thread is
    raised in the caller at its next `put`, `drain` or `close`.
    """

    def __init__(self, writer: Any, cfg: GenerateConfig, depth: int = 2, encoders: int = 1) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.writer, self.cfg = writer, cfg
        self.pool = ThreadPoolExecutor(encoders, thread_name_prefix="dfq-encode") if encoders > 1 else None
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="dfq-shard-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            pairs = self.queue.get()
            try:
                if pairs is None:
                    return
                if self.error is None:  # after an error, drain without writing
                    _write_pairs(self.writer, self.cfg, pairs, self.pool)
            except BaseException as exc:  # reported to the caller
                self.error = exc
            finally:
                self.queue.task_done()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, pairs: list[tuple[Any, dict[str, Any]]]) -> None:
        self._raise()
        self.queue.put(pairs)

    def drain(self) -> None:
        self.queue.join()
        self._raise()

    def close(self) -> None:
        """Wait for every queued batch to be written; re-raise the thread's error, if any."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if self.pool is not None:
            self.pool.shutdown()
        self._raise()


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import diffusers
        import transformers

        diffusers.logging.set_verbosity_error()
        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
