"""`engine`: generates synthetic calibration pools (WebDataset shards, see SHARDS.md).

Importing it needs neither Ray nor a GPU; Ray is imported only when a run starts.
It never imports `quant`: the two share only the shard format.

Public API (resolved lazily, so `import engine` stays cheap):

    GenerateConfig(out=..., ...)         the run config (engine.config)
    generate(cfg) -> dict                run or resume a pool on Ray (engine.driver)
    inspect_pool(out, ...) -> dict       manifest summary, class coverage, contact sheet (engine.inspect)
    EngineError, GenerationError         user errors / a run that could not finish (engine.errors)

Generators plug in by name (engine.generators), each with a typed settings dataclass
(engine.settings) whose content fields enter the pool's config hash.
"""

from __future__ import annotations

from typing import Any

from engine.errors import EngineError, GenerationError

__all__ = ["EngineError", "GenerateConfig", "GenerationError", "generate", "inspect_pool"]

_LAZY = {
    "GenerateConfig": ("engine.config", "GenerateConfig"),
    "generate": ("engine.driver", "generate"),
    "inspect_pool": ("engine.inspect", "inspect_pool"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
