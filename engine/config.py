"""The generation config: one frozen dataclass, validated before anything is written.

Two kinds of fields live here, and the split matters for resume:

- *content* fields decide what the pool holds (model, prompts, seeds, sampling, sizes, format,
  layout). They form `content_config()`, stored in `manifest.json` as `config`, and hashed into
  `config_hash`; a resume with any different content field is refused.
- *runtime* fields decide only how the pool is produced (workers, device, batch size, attention
  kernel, Ray address, ...). They may change between a run and its resume; batched GPU kernels can
  change the last bits of pixels, which SHARDS.md allows.

A `preset` fills the content fields the user left as `None` (model, steps, guidance, size), so the
CLI and the Python API resolve defaults the same way (`resolved()`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.errors import EngineError

if TYPE_CHECKING:
    from engine.prompts import Vocab

FORMAT_VERSION = 1

SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"

#: Presets: defaults for the content fields a user did not set. `sd15` = the paper's settings.
PRESETS: dict[str, dict[str, Any]] = {
    "sd15": {"model": SD15_MODEL_ID, "steps": 50, "guidance": 3.5, "width": 512, "height": 512},
    "tiny": {"model": "preset:tiny", "steps": 4, "guidance": 3.5, "width": 32, "height": 32},
    # BN-statistics distillation: `steps` are optimisation iterations; the size comes from the classifier.
    "bn-distill": {"steps": 400, "guidance": 0.0},
}

PAIRINGS = ("random", "balanced", "similar", "dissimilar")
IMAGE_FORMATS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}
ATTENTIONS = ("sdpa", "xformers")
DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "fp16", "bf16", "fp32")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: Short names for common diffusers schedulers; any diffusers `*Scheduler` class name also works.
SCHEDULER_ALIASES = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
}

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_MAX_SEED = 2**63 - 1

#: Fields that never enter the hash: how a pool is produced, not what it holds.
RUNTIME_FIELDS = frozenset(
    {
        "out",
        "name",
        "batch_size",
        "workers",
        "device",
        "dtype",
        "attention",
        "address",
        "channels_last",
        "fuse_qkv",
        "compile",
        "compile_mode",
        "max_actor_restarts",
        "progress",
        "fault_shard",
    }
)


@dataclass(frozen=True)
class GenerateConfig:
    """Everything `engine.generate` needs. `None` content fields are filled from `preset`.

    `fault_shard` is a test hook: the first attempt at that shard kills its actor process mid-write
    (SIGKILL after the first batch), to prove crash recovery end to end.
    """

    out: str
    num_images: int = 1024
    shard_size: int = 256
    preset: str = "sd15"
    generator: str = "diffusion"
    model: str | None = None
    checkpoint: str | None = None
    #: Generator-specific settings that shape the content (e.g. bn-distill's method and lr): hashed.
    generator_options: dict[str, Any] = field(default_factory=dict)
    vocab: str = "imagenet"
    k: int = 2
    pairing: str = "random"
    template: str = "a photo of {}"
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    negative_prompt: str | None = None
    scheduler: str | None = None
    image_format: str = "png"
    quality: int = 95
    prefix: str = "shard"
    max_retries: int = 3
    # ---- runtime fields (RUNTIME_FIELDS) ----
    name: str | None = None
    batch_size: int | str = 8  # or "auto": sized from free GPU memory by the worker
    workers: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "sdpa"
    address: str | None = None
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: bool = False
    compile_mode: str = "default"
    max_actor_restarts: int = 8
    progress: bool = True
    fault_shard: int | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ resolution / validation
    def resolved(self) -> GenerateConfig:
        """Validate and return a copy with preset defaults and canonical names filled in.

        Raises EngineError (one line, naming the bad value) before anything is written.
        """
        if self.preset not in PRESETS:
            raise EngineError(f"unknown preset {self.preset!r} (choose from {', '.join(PRESETS)})")
        preset = PRESETS[self.preset]
        fill = {name: preset[name] for name in preset if getattr(self, name) is None}
        fmt = IMAGE_FORMATS.get(str(self.image_format).lower())
        if fmt is None:
            raise EngineError(f"unknown image format {self.image_format!r} (choose from png, jpg, webp)")
        cfg = dataclasses.replace(
            self, image_format=fmt, scheduler=_canonical_scheduler(self.scheduler), **fill
        )
        cfg._check()
        # 3 and 3.0 must hash alike: the canonical JSON of an int and a float differ.
        return dataclasses.replace(cfg, guidance=float(cfg.guidance), quality=int(cfg.quality))

    def _check(self) -> None:
        _positive("num-images", self.num_images)
        _positive("shard-size", self.shard_size)
        _positive("k", self.k)
        _positive("steps", self.steps)
        if self.batch_size != "auto":
            _positive("batch-size", self.batch_size)
        if self.compile_mode not in COMPILE_MODES:
            raise EngineError(
                f"unknown compile mode {self.compile_mode!r} (choose from {', '.join(COMPILE_MODES)})"
            )
        _positive("width", self.width)
        _positive("height", self.height)
        if self.workers is not None:
            _positive("workers", self.workers)
        _nonnegative("max-retries", self.max_retries)
        _nonnegative("max-actor-restarts", self.max_actor_restarts)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= _MAX_SEED:
            raise EngineError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if (
            not isinstance(self.guidance, (int, float))
            or isinstance(self.guidance, bool)
            or not 0
            <= self.guidance
            < float("inf")  # also rejects nan, which the manifest's JSON cannot hold
        ):
            raise EngineError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
        for name, value in (("width", self.width), ("height", self.height)):
            if value % 8:
                raise EngineError(f"{name} must be a multiple of 8, got {value}")
        if not 1 <= int(self.quality) <= 100:
            raise EngineError(f"quality must be in [1, 100], got {self.quality!r}")
        if self.pairing not in PAIRINGS:
            raise EngineError(f"unknown pairing {self.pairing!r} (choose from {', '.join(PAIRINGS)})")
        if self.attention not in ATTENTIONS:
            raise EngineError(f"unknown attention {self.attention!r} (choose from {', '.join(ATTENTIONS)})")
        if self.device not in DEVICES:
            raise EngineError(f"unknown device {self.device!r} (choose from {', '.join(DEVICES)})")
        if self.dtype not in DTYPES:
            raise EngineError(f"unknown dtype {self.dtype!r} (choose from {', '.join(DTYPES)})")
        if not self.prefix or not _PREFIX_RE.match(self.prefix):
            raise EngineError(f"prefix must be letters, digits, '_' or '-' (no dots), got {self.prefix!r}")
        if self.template.count("{}") != 1:
            raise EngineError(
                f"template must contain exactly one '{{}}' for the classes, got {self.template!r}"
            )
        if not str(self.model).strip():
            raise EngineError("model must not be empty")
        looks_local = os.path.isabs(self.model) or self.model.startswith((".", "~"))
        if looks_local and self.address is None and not os.path.isdir(os.path.expanduser(self.model)):
            raise EngineError(
                f"model {self.model!r} is not a directory (give a local diffusers folder or a hub id)"
            )
        if not str(self.out).strip():
            raise EngineError("out must not be empty")
        from engine.worker import generator_names

        if self.generator not in generator_names():
            raise EngineError(
                f"unknown generator {self.generator!r} (choose from {', '.join(generator_names())})"
            )
        n = len(self.vocabulary().names)
        if self.k > n:
            raise EngineError(f"k={self.k} is more than the {n} classes of vocab {self.vocab!r}")
        if self.fault_shard is not None and not 0 <= self.fault_shard < self.num_shards:
            raise EngineError(f"fault_shard {self.fault_shard} is not a shard of this run")

    def vocabulary(self) -> Vocab:
        """The class vocabulary, cached on the object: a user file is read once, and the names travel
        to Ray actors inside the pickled config (cluster nodes need not have the file)."""
        cached = self.__dict__.get("_vocab_cache")
        if cached is None:
            from engine.prompts import load_vocab

            cached = load_vocab(self.vocab)
            object.__setattr__(self, "_vocab_cache", cached)
        return cached

    # ------------------------------------------------------------------ layout
    @property
    def num_shards(self) -> int:
        return (self.num_images + self.shard_size - 1) // self.shard_size

    def shard_indices(self, shard: int) -> range:
        """Sample indices of shard `shard`: [s*shard_size, min((s+1)*shard_size, num_images))."""
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_images))

    def shard_name(self, shard: int) -> str:
        return f"{self.prefix}-{shard:06d}.tar"

    @property
    def pool_name(self) -> str:
        return self.name or os.path.basename(str(self.out).rstrip("/")) or "pool"

    # ------------------------------------------------------------------ identity
    def content_config(self) -> dict[str, Any]:
        """The manifest's `config`: content fields of a resolved config, plus the vocab's identity.

        A user class file is identified by its name and the sha256 of its (cleaned) names, so a
        moved file resumes fine and an edited one is refused.
        """
        vocab = self.vocabulary()
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in RUNTIME_FIELDS
        }
        out["vocab"] = vocab.label
        out["vocab_sha256"] = vocab.sha256
        out["num_classes"] = len(vocab.names)
        out["format_version"] = FORMAT_VERSION
        return out

    def runtime_config(self) -> dict[str, Any]:
        """Runtime fields, recorded in the manifest's stats for information only."""
        return {
            name: getattr(self, name)
            for name in sorted(RUNTIME_FIELDS - {"out", "fault_shard", "progress", "name"})
        }

    def config_hash(self) -> str:
        return config_hash(self.content_config())


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, ASCII: the same config always gives the same string."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def config_hash(content: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(content).encode("ascii")).hexdigest()


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise EngineError(f"{name} must be an integer >= 1, got {value!r}")


def _nonnegative(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise EngineError(f"{name} must be an integer >= 0, got {value!r}")


def _canonical_scheduler(name: str | None) -> str | None:
    """Map an alias or class name to a diffusers scheduler class name (None = the model's own)."""
    if name is None or name in ("", "default"):
        return None
    cls_name = SCHEDULER_ALIASES.get(name.lower(), name)
    import diffusers

    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.endswith("Scheduler"):
        choices = ", ".join(sorted(SCHEDULER_ALIASES))
        raise EngineError(
            f"unknown scheduler {name!r} (a diffusers *Scheduler class name, or one of {choices})"
        )
    return cls_name
