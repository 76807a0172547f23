"""The `diffusion` generator: mixup-class prompts through a warm Stable Diffusion pipeline.

Sample i's prompt, classes and initial noise come from (run seed, i) alone (engine.prompts), with
one CPU `torch.Generator` per sample, so a sample's initial latents are the same on any device and
in any batch. Images are checked once per batch, after decoding: a non-finite or blank image is
regenerated with a derived seed, a bounded number of times, and a shard fails rather than ship it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from engine.diffusion_settings import DiffusionSettings
from engine.errors import GenerationError
from engine.records import sample_record

if TYPE_CHECKING:
    from engine.config import GenerateConfig
    from engine.prompts import PromptSample


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


def _to_pil(image: Any) -> Any:
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8), mode="RGB")


class DiffusionGenerator:
    """Mixup-class prompts through a warm StableDiffusionPipeline, one torch.Generator per sample.

    An unusable image is regenerated with the seed `noise_seed(run_seed, i, attempt)`, at most
    `max_retries` times; the count goes to the sample's `rejected` field. `batch_size` is the run's,
    or, for "auto", picked from free GPU memory (`auto_batch_size`). Compiled (cfg.compile), a short
    batch is padded to `batch_size` with copies of its last sample (outputs dropped), so one compiled
    graph serves every call; `warmup()` pays the compile up front.
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
        self.settings = settings = cfg.generator_settings(DiffusionSettings)
        if pipe is None:
            pipe = build_pipeline(cfg, device, compile=False)
        else:  # injected (tests, notebooks): apply the config's scheduler without mutating the caller's
            pipe = with_scheduler(pipe, settings.scheduler)
            pipe.set_progress_bar_config(disable=True)
        self.batch_size = auto_batch_size(pipe, cfg) if cfg.batch_size == "auto" else int(cfg.batch_size)
        if cfg.compile:  # after sizing the batch: the probe runs on the eager modules
            compile_pipeline(pipe, cfg.compile_mode)
        self.pad_batches = bool(cfg.compile)
        self.pipe = pipe
        self.scheduler_name = type(pipe.scheduler).__name__
        if similarity is None and cfg.pairing in ("similar", "dissimilar"):
            similarity = self.prepare(cfg, pipe=pipe)["similarity"]
        self.sampler = PromptSampler(
            cfg.vocabulary(), cfg.k, cfg.pairing, settings.template, cfg.seed, similarity
        )

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
                    results.append((Image.fromarray(rgb, mode="RGB"), self.record(sample, seed, rejected)))
                    continue
                while not is_usable(image):
                    if rejected >= self.settings.max_retries:
                        raise GenerationError(
                            f"sample {sample.index}: image still non-finite or blank after {rejected} retries "
                            f"(fp16 overflow? try --dtype fp32 or bf16)"
                        )
                    rejected += 1
                    seed = noise_seed(self.cfg.seed, sample.index, rejected)
                    image = self.denoise([sample.prompt], [seed])[0]
                results.append((_to_pil(image), self.record(sample, seed, rejected)))
        return results

    def denoise(self, prompts: list[str], seeds: list[int], steps: int | None = None) -> Any:
        """The pipeline's algorithm (`sample_images`): float images (B, H, W, 3) in [0, 1], NaN left in
        place for the check."""
        import torch

        from engine.pipeline import sample_images

        s = self.settings
        n = len(prompts)
        if self.pad_batches and n < self.batch_size:  # keep the compiled shape; extra outputs dropped
            prompts = prompts + [prompts[-1]] * (self.batch_size - n)
            seeds = seeds + [seeds[-1]] * (self.batch_size - n)
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        negative = [s.negative_prompt] * len(prompts) if s.negative_prompt else None
        images = sample_images(
            self.pipe,
            prompts,
            generators,
            steps=steps or s.steps,
            guidance=s.guidance,
            height=s.height,
            width=s.width,
            negative_prompt=negative,
        )
        return images[:n]

    def record(self, sample: PromptSample, seed: int, rejected: int) -> dict[str, Any]:
        """Sample `sample`'s per-sample record (SHARDS.md); `seed` is the one that made its image."""
        cfg, s = self.cfg, self.settings
        return sample_record(
            sample.index,
            generator=self.name,
            model=str(cfg.model),
            prompt=sample.prompt,
            negative_prompt=s.negative_prompt,
            class_ids=sample.class_ids,
            class_names=sample.class_names,
            vocab=cfg.vocabulary().label,
            k=cfg.k,
            pairing=cfg.pairing,
            seed=seed,
            run_seed=cfg.seed,
            scheduler=self.scheduler_name,
            steps=s.steps,
            guidance=s.guidance,
            width=s.width,
            height=s.height,
            rejected=rejected,
        )
