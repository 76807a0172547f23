"""The run config: one frozen dataclass, validated before anything is written.

Generic fields describe the pool (size, layout, classes, seed, format) and how it is produced;
the generator's own settings travel in `settings`, a dataclass declared by the generator
(engine.generators). The split that matters for resume:

- *content* decides what the pool holds: the generic `CONTENT_FIELDS` plus every content setting of
  the generator. It is the manifest's `config`, hashed into `config_hash`; a resume with any other
  content is refused.
- *runtime* fields decide only how the pool is produced (workers, device, attention kernel, Ray
  address, ...) and may change between a run and its resume; batched GPU kernels can change the
  last bits of pixels, which SHARDS.md allows. A generator whose pixels depend on one of them (the
  batch size, for bn-distill) copies it into its settings, which are hashed.

A preset (the generator's own: `sd15`, `tiny`, `bn-distill`) fills the settings and model the user
left as `None`, so the CLI and the Python API resolve defaults the same way (`resolved()`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from engine.errors import EngineError
from engine.generators import generator_names, settings_class
from engine.records import FORMAT_VERSION
from engine.settings import GeneratorSettings

if TYPE_CHECKING:
    from engine.prompts import Vocab

S = TypeVar("S", bound=GeneratorSettings)

PAIRINGS = ("random", "balanced", "similar", "dissimilar")
IMAGE_FORMATS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}
ATTENTIONS = ("sdpa", "xformers")
DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "fp16", "bf16", "fp32")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

PREPROCESS_KEYS = ("input_size", "mean", "std", "num_classes")

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_MAX_SEED = 2**63 - 1

#: Generic fields that shape the pool (hashed with the generator's content settings).
CONTENT_FIELDS = (
    "num_images", "shard_size", "generator", "model", "checkpoint", "vocab", "k", "pairing", "seed",
    "image_format", "quality", "prefix",
)  # fmt: skip

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
    """Everything `engine.generate` needs. `settings` is the generator's settings dataclass, a mapping
    of its field values, or None (its defaults); `resolved()` turns it into the dataclass.

    `fault_shard` is a test hook: the first attempt at that shard kills its actor process mid-write
    (SIGKILL after the first batch), to prove crash recovery end to end.
    """

    out: str
    num_images: int = 1024
    shard_size: int = 256
    generator: str = "diffusion"
    preset: str | None = None  # None: the generator's default preset
    model: str | None = None
    checkpoint: str | None = None
    #: a classifier's preprocessing given on the command line (input_size, mean, std, num_classes),
    #: content: recorded in the manifest's config (only when set, so older pools keep their hash)
    preprocess: Mapping[str, Any] | None = None
    settings: GeneratorSettings | Mapping[str, Any] | None = None
    vocab: str = "imagenet"
    k: int = 2
    pairing: str = "random"
    seed: int = 0
    image_format: str = "png"
    quality: int = 95
    prefix: str = "shard"
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
        """Validate and return a copy with preset defaults, typed settings and canonical names.

        Raises EngineError (one line, naming the bad value) before anything is written.
        """
        if self.generator not in generator_names():
            raise EngineError(
                f"unknown generator {self.generator!r} (choose from {', '.join(generator_names())})"
            )
        cls = settings_class(self.generator)
        preset = self.preset or cls.default_preset
        if preset not in cls.presets:
            raise EngineError(
                f"unknown preset {preset!r} for generator {self.generator!r} (choose from {', '.join(cls.presets)})"
            )
        defaults = cls.presets[preset]
        settings = self.settings
        if settings is None or isinstance(settings, Mapping):
            settings = cls.from_mapping(settings or {}, self.generator)
        elif not isinstance(settings, cls):
            raise EngineError(
                f"generator {self.generator!r} takes {cls.__name__}, got {type(settings).__name__}"
            )
        fmt = IMAGE_FORMATS.get(str(self.image_format).lower())
        if fmt is None:
            raise EngineError(f"unknown image format {self.image_format!r} (choose from png, jpg, webp)")
        model = self.model if self.model is not None else defaults.get("model")
        cfg = dataclasses.replace(
            self, preset=preset, model=model, image_format=fmt, settings=settings.with_defaults(defaults)
        )
        cfg._check()
        cfg = dataclasses.replace(cfg, quality=int(cfg.quality))
        return dataclasses.replace(cfg, settings=cfg.generator_settings(GeneratorSettings).resolve(cfg))

    def _check(self) -> None:
        _positive("num-images", self.num_images)
        _positive("shard-size", self.shard_size)
        _positive("k", self.k)
        if self.batch_size != "auto":
            _positive("batch-size", self.batch_size)
        if self.compile_mode not in COMPILE_MODES:
            raise EngineError(
                f"unknown compile mode {self.compile_mode!r} (choose from {', '.join(COMPILE_MODES)})"
            )
        if self.workers is not None:
            _positive("workers", self.workers)
        _nonnegative("max-actor-restarts", self.max_actor_restarts)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= _MAX_SEED:
            raise EngineError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
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
        if self.model is None:
            raise EngineError(f"generator {self.generator!r} needs a model (--model)")
        if not str(self.model).strip():
            raise EngineError("model must not be empty")
        if not str(self.out).strip():
            raise EngineError("out must not be empty")
        if self.preprocess is not None:
            if not isinstance(self.preprocess, Mapping):
                raise EngineError(f"preprocess must be a mapping, got {type(self.preprocess).__name__}")
            unknown = sorted(set(self.preprocess) - set(PREPROCESS_KEYS))
            if unknown:
                raise EngineError(
                    f"preprocess has no key {unknown[0]!r} (keys: {', '.join(PREPROCESS_KEYS)})"
                )
        n = len(self.vocabulary().names)
        if self.k > n:
            raise EngineError(f"k={self.k} is more than the {n} classes of vocab {self.vocab!r}")
        if self.fault_shard is not None and not 0 <= self.fault_shard < self.num_shards:
            raise EngineError(f"fault_shard {self.fault_shard} is not a shard of this run")

    def generator_settings(self, cls: type[S]) -> S:
        """The settings of a resolved config, as the generator's own class (checked)."""
        if not isinstance(self.settings, cls):
            raise TypeError(f"settings are {type(self.settings).__name__}, not {cls.__name__}: resolve first")
        return self.settings

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
        """The manifest's `config` of a resolved config: the generic content fields, the vocab's
        identity, and the generator's content settings under `settings`.

        A user class file is identified by its name and the sha256 of its (cleaned) names, so a
        moved file resumes fine and an edited one is refused.
        """
        vocab = self.vocabulary()
        out = {name: getattr(self, name) for name in CONTENT_FIELDS}
        out["vocab"] = vocab.label
        out["vocab_sha256"] = vocab.sha256
        out["num_classes"] = len(vocab.names)
        out["format_version"] = FORMAT_VERSION
        if self.preprocess:
            out["preprocess"] = {
                k: list(v) if isinstance(v, tuple) else v for k, v in self.preprocess.items()
            }
        out["settings"] = self.generator_settings(GeneratorSettings).content()
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
