"""Settings of the `diffusion` generator (Stable Diffusion, mixup-class prompts); no torch here.

Presets: `sd15` = the paper's settings (SD v1.5, 50 steps, guidance 3.5, 512 px); `tiny` = a small
random offline pipeline for tests and demos (engine.tiny). Every field shapes the images, so all
of them enter the pool's config hash.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.errors import EngineError
from engine.settings import Float, GeneratorSettings, Int, Size, Text, setting
from engine.tiny import TINY_MODEL_ID

if TYPE_CHECKING:
    from engine.config import GenerateConfig

SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"

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


@dataclass(frozen=True)
class DiffusionSettings(GeneratorSettings):
    """How the diffusion generator samples; `None` fields come from the preset."""

    presets = {
        "sd15": {"model": SD15_MODEL_ID, "steps": 50, "guidance": 3.5, "size": (512, 512)},
        "tiny": {"model": TINY_MODEL_ID, "steps": 4, "guidance": 3.5, "size": (32, 32)},
    }
    default_preset = "sd15"

    template: str = setting("a photo of {}", Text(), "prompt template; {} gets the classes")
    steps: int | None = setting(None, Int(1), "denoising steps (sd15: 50)")
    guidance: float | None = setting(None, Float(0.0), "classifier-free guidance scale (sd15: 3.5)")
    size: tuple[int, int] | None = setting(None, Size(), "512 or WIDTHxHEIGHT (sd15: 512)")
    negative_prompt: str | None = setting(None, Text(), "negative prompt (default none)")
    scheduler: str | None = setting(
        None, Text(), "diffusers scheduler class or alias (pndm, ddim, dpm++, ...; default: the model's)"
    )
    max_retries: int = setting(3, Int(0), "regenerations of a blank or non-finite image")

    @property
    def width(self) -> int:
        return self.size[0] if self.size else 0

    @property
    def height(self) -> int:
        return self.size[1] if self.size else 0

    def resolve(self, cfg: GenerateConfig) -> DiffusionSettings:
        s = self.checked()
        for name in ("steps", "guidance", "size"):
            if getattr(s, name) is None:
                raise EngineError(f"{name} is not set (give it, or a preset that sets it)")
        if s.template.count("{}") != 1:
            raise EngineError(f"template must contain exactly one '{{}}' for the classes, got {s.template!r}")
        if cfg.checkpoint is not None:
            raise EngineError("checkpoint is for classifier-based generators; diffusion loads --model")
        model = str(cfg.model)
        looks_local = os.path.isabs(model) or model.startswith((".", "~"))
        if looks_local and cfg.address is None and not os.path.isdir(os.path.expanduser(model)):
            raise EngineError(
                f"model {model!r} is not a directory (give a local diffusers folder or a hub id)"
            )
        return dataclasses.replace(s, scheduler=canonical_scheduler(s.scheduler))

    @classmethod
    def from_legacy(cls, config: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, Any]:
        if config.get("generator_options") or config.get("checkpoint") is not None:
            raise EngineError("its diffusion config has options this dfq does not know")
        legacy = {
            "template": config["template"],
            "steps": config["steps"],
            "guidance": config["guidance"],
            "size": (config["width"], config["height"]),
            "negative_prompt": config["negative_prompt"],
            "scheduler": config["scheduler"],
            "max_retries": config["max_retries"],
        }
        return cls(**legacy).checked().content()


def canonical_scheduler(name: str | None) -> str | None:
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
