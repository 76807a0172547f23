"""A toy generator plugged in by tests: a settings dataclass, a factory, and (in the test) one
registry entry are all a new generator needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from engine.config import GenerateConfig
from engine.records import sample_record
from engine.settings import GeneratorSettings, Int, setting


@dataclass(frozen=True)
class EchoSettings(GeneratorSettings):
    presets = {"echo": {"model": "none"}}
    default_preset = "echo"

    shade: int = setting(128, Int(0), "grey level of every image")


class EchoGenerator:
    """Grey 8 px images of `shade`, one per index, with the shared per-sample record."""

    def __init__(self, cfg: GenerateConfig, **_: Any) -> None:
        self.cfg, self.settings = cfg, cfg.generator_settings(EchoSettings)

    def generate(self, indices: list[int]) -> list[tuple[Image.Image, dict[str, Any]]]:
        names = self.cfg.vocabulary().names
        return [
            (
                Image.new("RGB", (8, 8), (self.settings.shade,) * 3),
                sample_record(
                    i,
                    generator="echo",
                    model=str(self.cfg.model),
                    prompt="grey",
                    class_ids=[0],
                    class_names=[names[0]],
                    vocab=self.cfg.vocabulary().label,
                    k=1,
                    pairing="random",
                    seed=0,
                    run_seed=self.cfg.seed,
                    steps=0,
                    width=8,
                    height=8,
                ),
            )  # fmt: skip
            for i in indices
        ]
