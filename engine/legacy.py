"""Manifests written before generators had their own settings: the flat config layout, mapped.

Old pools stored one flat `config` (bn-distill's iterations as `steps`, its options in
`generator_options`, diffusion fields on every generator, the preset name) and hashed it whole.
`upgrade` rewrites such a config in today's layout (generic fields + `settings`), so a resume of an
old pool compares like with like; the old manifest itself is never rewritten.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.config import CONTENT_FIELDS
from engine.errors import EngineError
from engine.generators import settings_class

#: Generic keys of an old config that today's content keeps as they were.
_KEPT = (*CONTENT_FIELDS, "vocab_sha256", "num_classes", "format_version")


def is_legacy(config: Any) -> bool:
    """A config in the flat layout (no `settings` object)."""
    return isinstance(config, Mapping) and "settings" not in config


def upgrade(config: Mapping[str, Any], stats: Any) -> dict[str, Any]:
    """Today's content config for an old flat one; EngineError when it cannot be mapped."""
    try:
        content = {key: config[key] for key in _KEPT}
        stats = stats if isinstance(stats, Mapping) else {}
        content["settings"] = settings_class(str(config["generator"])).from_legacy(config, stats)
    except KeyError as exc:
        raise EngineError(f"its config lacks {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise EngineError(f"its config is malformed ({exc})") from None
    return content
