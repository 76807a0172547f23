"""Turn a work unit (a shard number) into a committed shard: generate, encode, write, commit.

Two layers, so each is testable alone:

- a *generator* turns sample indices into (PIL image, sample JSON) pairs. `DiffusionGenerator` is
  the Stable Diffusion one; others plug in through `GENERATORS` (name -> "module:Class"), each a
  class with `__init__(cfg, **context)`, `generate(indices) -> list[(image, meta)]` and an optional
  classmethod `prepare(cfg) -> dict`, run once by the driver, whose result is every worker's
  `context` (the diffusion generator uses it to share one class-similarity matrix);
- `ShardWorker`, plain Python, owns one generator and writes shards with `ShardWriter`. The driver
  wraps it with `ray.remote` at run time (one actor per GPU, or per CPU worker), so images go from
  the actor straight into the shard file and only a small stats dict travels back.

Speed (issue 5): `run_unit` hands each generated batch to a background thread that PNG-encodes
and appends it to the tar (in submission order, so the bytes equal the serial path's) while the main
thread denoises the next batch; the diffusion generator checks a whole batch for NaN/blank images once,
after decoding, sizes `batch_size="auto"` from free GPU memory, and, when compiled, pays the compile
at actor start (`warmup`) and pads a short last batch to the compiled shape.

Importing this module is cheap (no torch, no diffusers): the CLI reads `generator_names()`.
"""

from __future__ import annotations

import importlib
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

from engine.config import FORMAT_VERSION, GenerateConfig
from engine.errors import GenerationError

#: Generator registry: name -> "module:Class". A new generator is one entry and one class.
GENERATORS: dict[str, str] = {
    "diffusion": "engine.worker:DiffusionGenerator",
    "bn-distill": "engine.bn_distill:from_config",
}


class Generator(Protocol):
    """What a worker needs from a generator."""

    def generate(self, indices: Sequence[int]) -> list[tuple[Any, dict[str, Any]]]:
        """One (RGB PIL image, sample JSON) per index, in the order given; JSON fields per SHARDS.md."""
        ...


def generator_names() -> tuple[str, ...]:
    return tuple(GENERATORS)


def register_generator(name: str, target: str) -> None:
    """Register a generator class given as "module:Class" (imported only when a run uses it)."""
    GENERATORS[name] = target


def generator_class(name_or_target: str) -> Any:
    """The class of a registered generator name, or of a "module:Class" target."""
    target = GENERATORS.get(name_or_target, name_or_target)
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def sample_key(index: int) -> str:
    return f"s{index:09d}"


def is_usable(image: Any) -> bool:
    """False for non-finite pixels (NaN/inf latents propagate here) and blank (constant) images."""
    import numpy as np

    if not np.isfinite(image).all():
        return False
    return float(image.max()) - float(image.min()) >= 1.0 / 255.0


def usable_mask(images: Any) -> list[bool]:
    """`is_usable` for a whole (B, H, W, 3) float batch in one vectorized pass (torch, all threads)."""
    import torch

    flat = torch.from_numpy(images).reshape(len(images), -1)
    finite = torch.isfinite(flat).all(dim=1)
    spread = flat.amax(dim=1).double() - flat.amin(dim=1).double()
    return (finite & (spread >= 1.0 / 255.0)).tolist()


def to_uint8(images: Any) -> Any:
    """Float images in [0, 1] -> uint8, rounding half to even as `_to_pil` does (same bytes), vectorized."""
    import torch

    return torch.from_numpy(images).clamp(0.0, 1.0).mul(255).round().to(torch.uint8).numpy()


class DiffusionGenerator:
    """Mixup-class prompts through a warm StableDiffusionPipeline, one torch.Generator per sample.

    Noise comes from CPU generators seeded per sample, so a sample's initial latents are the same
    on any device and in any batch. An unusable image (non-finite or blank) is regenerated with a
    derived seed (`noise_seed(run_seed, i, attempt)`), at most `max_retries` times; the count goes
    to the sample's `rejected` field. Past the cap the shard fails loudly rather than shipping a
    black image into a calibration set.

    `batch_size` is cfg.batch_size, or, for "auto", picked from free GPU memory (`auto_batch_size`).
    Compiled (cfg.compile), a short batch is padded to `batch_size` with copies of its last sample
    (outputs dropped), so one compiled graph serves every call; `warmup()` pays the compile up front.
    """

    name = "diffusion"

    def __init__(
        self,
        cfg: GenerateConfig,
        *,
        pipe: Any = None,
        similarity: Any = None,
        device: str | None = None,
        **_: Any,
    ) -> None:
        from engine.pipeline import auto_batch_size, build_pipeline, compile_pipeline, with_scheduler
        from engine.prompts import PromptSampler

        self.cfg = cfg
        if pipe is None:
            pipe = build_pipeline(cfg, device, compile=False)
        else:  # injected (tests, notebooks): apply the config's scheduler without mutating the caller's
            pipe = with_scheduler(pipe, cfg.scheduler)
            pipe.set_progress_bar_config(disable=True)
        self.batch_size = auto_batch_size(pipe, cfg) if cfg.batch_size == "auto" else cfg.batch_size
        if cfg.compile:  # after sizing the batch: the probe runs on the eager modules
            compile_pipeline(pipe, cfg.compile_mode)
        self.pad_batches = bool(cfg.compile)
        self.pipe = pipe
        self.scheduler_name = type(pipe.scheduler).__name__
        vocab = cfg.vocabulary()
        if similarity is None and cfg.pairing in ("similar", "dissimilar"):
            similarity = self.prepare(cfg, pipe=pipe)["similarity"]
        self.sampler = PromptSampler(vocab, cfg.k, cfg.pairing, cfg.template, cfg.seed, similarity)

    @classmethod
    def prepare(cls, cfg: GenerateConfig, pipe: Any = None) -> dict[str, Any]:
        """Once per run, in the driver: the class-similarity matrix when the pairing needs one."""
        if cfg.pairing not in ("similar", "dissimilar"):
            return {}
        from engine.pipeline import load_text_encoder
        from engine.prompts import class_similarity

        if pipe is not None:
            import copy

            tokenizer, encoder = pipe.tokenizer, copy.deepcopy(pipe.text_encoder).float().cpu()
        else:
            tokenizer, encoder = load_text_encoder(cfg)
        return {"similarity": class_similarity(cfg.vocabulary().names, tokenizer, encoder)}

    def warmup(self, steps: int = 3) -> dict[str, float]:
        """Two full-batch calls of `steps` steps: the first compiles (and, with CUDA graphs, the second
        records), so shards never pay it. Returns both wall times and their difference (`compile_seconds`)."""
        prompts = [f"warm-up {i}" for i in range(self.batch_size)]
        seeds = list(range(self.batch_size))
        times = []
        for _ in range(2):
            start = time.perf_counter()
            self.denoise(prompts, seeds, steps=steps)
            times.append(time.perf_counter() - start)
        return {
            "warmup_seconds": round(sum(times), 3),
            "compile_seconds": round(max(0.0, times[0] - times[1]), 3),
        }

    def generate(self, indices: Sequence[int]) -> list[tuple[Any, dict[str, Any]]]:
        from PIL import Image

        from engine.prompts import noise_seed

        samples = [self.sampler.sample(i) for i in indices]
        results = []
        for start in range(0, len(samples), self.batch_size):
            batch = samples[start : start + self.batch_size]
            images = self.denoise([s.prompt for s in batch], [s.seed for s in batch])
            usable = usable_mask(images)  # one check a batch, after decoding (never per step)
            pixels = to_uint8(images)
            for sample, image, ok, rgb in zip(batch, images, usable, pixels):
                seed, rejected = sample.seed, 0
                if ok:
                    meta = self.sample_json(sample, seed, rejected)
                    results.append((Image.fromarray(rgb, mode="RGB"), meta))
                    continue
                while not is_usable(image):
                    if rejected >= self.cfg.max_retries:
                        raise GenerationError(
                            f"sample {sample.index}: image still non-finite or blank after {rejected} retries "
                            f"(fp16 overflow? try --dtype fp32 or bf16)"
                        )
                    rejected += 1
                    seed = noise_seed(self.cfg.seed, sample.index, rejected)
                    image = self.denoise([sample.prompt], [seed])[0]
                results.append((_to_pil(image), self.sample_json(sample, seed, rejected)))
        return results

    def denoise(self, prompts: list[str], seeds: list[int], steps: int | None = None) -> Any:
        """The pipeline's algorithm (`sample_images`): float images (B, H, W, 3) in [0, 1], NaN left in
        place for the check."""
        import torch

        from engine.pipeline import sample_images

        cfg = self.cfg
        n = len(prompts)
        if self.pad_batches and n < self.batch_size:  # keep the compiled shape; extra outputs dropped
            prompts = prompts + [prompts[-1]] * (self.batch_size - n)
            seeds = seeds + [seeds[-1]] * (self.batch_size - n)
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        negative = [cfg.negative_prompt] * len(prompts) if cfg.negative_prompt else None
        images = sample_images(
            self.pipe,
            prompts,
            generators,
            steps=steps or cfg.steps,
            guidance=cfg.guidance,
            height=cfg.height,
            width=cfg.width,
            negative_prompt=negative,
        )
        return images[:n]

    def sample_json(self, sample: Any, seed: int, rejected: int) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "format_version": FORMAT_VERSION,
            "index": sample.index,
            "key": sample_key(sample.index),
            "generator": self.name,
            "model": cfg.model,
            "prompt": sample.prompt,
            "negative_prompt": cfg.negative_prompt,
            "class_ids": list(sample.class_ids),
            "class_names": list(sample.class_names),
            "vocab": cfg.vocabulary().label,
            "k": cfg.k,
            "pairing": cfg.pairing,
            "seed": seed,
            "run_seed": cfg.seed,
            "scheduler": self.scheduler_name,
            "steps": cfg.steps,
            "guidance": cfg.guidance,
            "width": cfg.width,
            "height": cfg.height,
            "rejected": rejected,
        }


def _to_pil(image: Any) -> Any:
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8), mode="RGB")


def build_generator(cfg: GenerateConfig, target: str | None = None, **context: Any) -> Generator:
    """Instantiate cfg.generator; `target` ("module:Class", resolved by the driver) lets a generator
    registered at run time in the driver process reach actor processes, whose registry lacks it."""
    return generator_class(target or cfg.generator)(cfg, **context)


def prepare_context(cfg: GenerateConfig) -> dict[str, Any]:
    """Run the generator's once-per-run preparation (in the driver), if it has one."""
    prepare = getattr(generator_class(cfg.generator), "prepare", None)
    return dict(prepare(cfg)) if prepare is not None else {}


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
        # a work unit is cut into chunks of cfg.batch_size ("auto": the generator's own choice)
        self.batch_size = (
            getattr(generator, "batch_size", 8) if cfg.batch_size == "auto" else int(cfg.batch_size)
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
    steal them from generation), else up to 8 (a GPU actor's host cores are idle while it denoises;
    a batch of 64 PNGs at 512 px is ~2 s on one core, which must stay under one batch's denoising)."""
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
