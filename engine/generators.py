"""The generator registry: name -> where its code and its settings live, imported only when used.

A generator is a module with a settings class (a `GeneratorSettings` dataclass in a light module:
no torch, so the CLI can list its options cheaply) and a factory `factory(cfg, **context)` that
returns an object with `generate(indices) -> [(RGB PIL image, per-sample record)]` and, optionally,
a classmethod `prepare(cfg) -> dict` that the driver runs once per run and hands to every worker as
`context`, and a classmethod `check(cfg)` that refuses a bad request before anything is written
(both receive the parts of the caller's context their signatures name). Adding a generator is one entry here (or `register_generator` at run time).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from engine.errors import EngineError

if TYPE_CHECKING:
    from engine.config import GenerateConfig
    from engine.settings import GeneratorSettings


@dataclass(frozen=True)
class GeneratorSpec:
    """Where a generator lives: `factory` and `settings` as "module:attr" targets, and a line of help."""

    factory: str
    settings: str
    help: str = ""


GENERATORS: dict[str, GeneratorSpec] = {
    "diffusion": GeneratorSpec(
        "engine.diffusion:DiffusionGenerator",
        "engine.diffusion_settings:DiffusionSettings",
        "Stable Diffusion with mixup-class prompts",
    ),
    "bn-distill": GeneratorSpec(
        "engine.bn_distill:from_config",
        "engine.bn_distill_settings:BNDistillSettings",
        "BN-statistics distillation of a classifier (Genie-D, ZeroQ)",
    ),
    "enhancing-dfq": GeneratorSpec(
        "engine.enhancing_dfq:EnhancingDFQGenerator",
        "engine.enhancing_dfq_settings:EnhancingDFQSettings",
        "a class-conditional generator trained on the classifier (EnhancingDFQ)",
    ),
}


class Generator(Protocol):
    """What a worker needs from a generator."""

    def generate(self, indices: Sequence[int]) -> list[tuple[Any, dict[str, Any]]]:
        """One (RGB PIL image, per-sample record) per index, in the order given (SHARDS.md)."""
        ...


def register_generator(name: str, factory: str, settings: str, help: str = "") -> None:
    """Register (or replace) a generator; both targets are imported only when a run uses it."""
    GENERATORS[name] = GeneratorSpec(factory, settings, help)


def generator_names() -> tuple[str, ...]:
    return tuple(GENERATORS)


def generator_spec(name: str) -> GeneratorSpec:
    spec = GENERATORS.get(name)
    if spec is None:
        raise EngineError(f"unknown generator {name!r} (choose from {', '.join(GENERATORS)})")
    return spec


def load(target: str) -> Any:
    """The object a "module:attr" target names."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def settings_class(name: str) -> type[GeneratorSettings]:
    """The settings dataclass of generator `name` (cheap: settings modules import no torch)."""
    return load(generator_spec(name).settings)


def build_generator(cfg: GenerateConfig, target: str | None = None, **context: Any) -> Generator:
    """Instantiate cfg.generator; `target` (its factory, resolved in the driver) lets a generator
    registered at run time in the driver process reach actor processes, whose registry lacks it."""
    return load(target or generator_spec(cfg.generator).factory)(cfg, **context)


def _named(fn: Any, context: dict[str, Any] | None) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in (context or {}).items() if k in params and k != "cfg"}


def check_request(cfg: GenerateConfig, context: dict[str, Any] | None = None) -> None:
    """The generator's own check of a request against its context (e.g. the classifier), if it has
    one: raises EngineError before anything is written."""
    check = getattr(load(generator_spec(cfg.generator).factory), "check", None)
    if check is not None:
        check(cfg, **_named(check, context))


def prepare_context(cfg: GenerateConfig, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the generator's once-per-run preparation (in the driver), if it has one; it receives
    the parts of the caller's `context` its signature names (e.g. enhancing-dfq's `classifier`)."""
    prepare = getattr(load(generator_spec(cfg.generator).factory), "prepare", None)
    if prepare is None:
        return {}
    return dict(prepare(cfg, **_named(prepare, context)))
