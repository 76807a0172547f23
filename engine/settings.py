"""Generator settings: one frozen dataclass per generator, each field declared with `setting()`.

A field's metadata is all the CLI needs to offer it (flag, help, how to parse the text) and says
whether the setting shapes the pool: `content=True` (the default) means it changes pixels or
records, so it enters the pool's config hash; `content=False` means it changes only how the pool is
produced. `GeneratorSettings` resolves every class the same way: a preset fills the fields left
`None`, each value is checked by its field's kind, then the class's own `resolve` adds what only it
knows (canonical names, defaults that depend on the run config).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from engine.errors import EngineError

if TYPE_CHECKING:
    from engine.config import GenerateConfig

S = TypeVar("S", bound="GeneratorSettings")


# ---------------------------------------------------------------------------------- value kinds
@dataclass(frozen=True)
class Int:
    """An integer >= `minimum`."""

    minimum: int = 0

    def parse(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected an integer >= {self.minimum}, got {text!r}") from None
        if value < self.minimum:
            raise ValueError(f"expected an integer >= {self.minimum}, got {text!r}")
        return value

    def check(self, name: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < self.minimum:
            raise EngineError(f"{name} must be an integer >= {self.minimum}, got {value!r}")
        return value


@dataclass(frozen=True)
class Float:
    """A finite number >= `minimum` (> `minimum` when `strict`); ints are stored as floats, so 3
    and 3.0 hash alike."""

    minimum: float = 0.0
    strict: bool = False

    @property
    def bound(self) -> str:
        return f"{'>' if self.strict else '>='} {self.minimum:g}"

    def _ok(self, value: float) -> bool:
        return math.isfinite(value) and (value > self.minimum if self.strict else value >= self.minimum)

    def parse(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a finite number {self.bound}, got {text!r}") from None
        if not self._ok(value):  # also nan and inf, which the manifest's JSON cannot hold
            raise ValueError(f"expected a finite number {self.bound}, got {text!r}")
        return value

    def check(self, name: str, value: Any) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not self._ok(value):
            raise EngineError(f"{name} must be a finite number {self.bound}, got {value!r}")
        return float(value)


@dataclass(frozen=True)
class Text:
    """Any string."""

    def parse(self, text: str) -> str:
        return text

    def check(self, name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise EngineError(f"{name} must be a string, got {value!r}")
        return value


@dataclass(frozen=True)
class Choice:
    """One of `values`."""

    values: tuple[str, ...]

    def parse(self, text: str) -> str:
        return self.check("value", text)

    def check(self, name: str, value: Any) -> str:
        if value not in self.values:
            raise EngineError(f"unknown {name} {value!r} (choose from {', '.join(self.values)})")
        return value


@dataclass(frozen=True)
class Flag:
    """A boolean (the CLI offers `--flag` and `--no-flag`)."""

    def parse(self, text: str) -> bool:
        raise ValueError("a flag takes no value")

    def check(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise EngineError(f"{name} must be true or false, got {value!r}")
        return value


@dataclass(frozen=True)
class Size:
    """(width, height) in pixels, multiples of `step`; the CLI takes `512` (square) or `512x768`."""

    step: int = 8

    def parse(self, text: str) -> tuple[int, int]:
        parts = text.lower().split("x")
        try:
            if len(parts) not in (1, 2):
                raise ValueError
            width, height = int(parts[0]), int(parts[-1])
        except ValueError:
            raise ValueError(f"expected a size like 512 or 512x768, got {text!r}") from None
        if min(width, height) < self.step or width % self.step or height % self.step:
            raise ValueError(f"sizes must be multiples of {self.step} and >= {self.step}, got {text!r}")
        return width, height

    def check(self, name: str, value: Any) -> tuple[int, int]:
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
            raise EngineError(f"{name} must be (width, height), got {value!r}")
        for label, v in zip(("width", "height"), value):
            Int(1).check(label, v)
            if v % self.step:
                raise EngineError(f"{label} must be a multiple of {self.step}, got {v}")
        return int(value[0]), int(value[1])


Kind = Int | Float | Text | Choice | Flag | Size


# ---------------------------------------------------------------------------------- fields
def setting(
    default: Any, kind: Kind, help: str, *, flag: str | None = None, aliases: tuple[str, ...] = (),
    content: bool = True, cli: bool = True, added: bool = False,
) -> Any:  # fmt: skip
    """A settings field. `flag` defaults to `--<name>` (underscores as dashes); `aliases` are older
    flags that still work; `cli=False` keeps it off the command line (set through another option).
    `added=True` marks a content setting that came after pools were made: at its default it stays
    out of the content (and the hash), so those pools still resume."""
    meta = {
        "kind": kind, "help": help, "flag": flag, "aliases": aliases, "content": content, "cli": cli,
        "added": added,
    }  # fmt: skip
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Option:
    """One settings field as the CLI sees it."""

    name: str
    flags: tuple[str, ...]  # the main flag first, then aliases
    kind: Kind
    help: str
    default: Any
    content: bool


@dataclass(frozen=True)
class GeneratorSettings:
    """Base of every generator's settings. Subclasses are frozen dataclasses of `setting()` fields.

    `presets` name sets of defaults (field values, plus `model` for the run config); `default_preset`
    is used when the run names none. `needs_classifier`: the generator learns from a classifier,
    which the CLI builds from `--model`/`--checkpoint` and passes as the `classifier` context
    (an `engine.classifier.Classifier`).
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    default_preset: ClassVar[str] = ""
    needs_classifier: ClassVar[bool] = False

    @classmethod
    def options(cls) -> list[Option]:
        """The fields the CLI offers, in declaration order."""
        out = []
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", False):
                flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
                out.append(
                    Option(f.name, (flag, *f.metadata["aliases"]), f.metadata["kind"], f.metadata["help"],
                           f.default, f.metadata["content"])
                )  # fmt: skip
        return out

    @classmethod
    def from_mapping(cls: type[S], values: Mapping[str, Any], generator: str) -> S:
        """Settings from plain values (the Python API, the CLI); an unknown name is an EngineError."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise EngineError(f"unknown {generator} setting {unknown[0]!r} (choose from {', '.join(names)})")
        return cls(**values)

    def with_defaults(self: S, defaults: Mapping[str, Any]) -> S:
        """A copy whose `None` fields take the value `defaults` gives them (other keys are ignored)."""
        fill = {
            f.name: defaults[f.name]
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is None and f.name in defaults
        }
        return dataclasses.replace(self, **fill)

    def checked(self: S) -> S:
        """A copy with every set field checked (and normalised, e.g. ints to floats) by its kind."""
        values = {
            f.name: f.metadata["kind"].check(f.name, getattr(self, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }
        return dataclasses.replace(self, **values)

    def resolve(self: S, cfg: GenerateConfig) -> S:
        """Validate against the run config and fill what depends on it; subclasses extend this."""
        return self.checked()

    def content(self) -> dict[str, Any]:
        """The settings that shape the pool, as JSON values: the manifest's `config.settings`."""
        return {
            f.name: _json(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.metadata.get("content", True)
            and not (f.metadata.get("added") and getattr(self, f.name) == f.default)
        }

    @classmethod
    def from_legacy(cls, config: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, Any]:
        """`content()` of the settings an old flat-layout manifest `config` was made with (see
        `engine.legacy`); generators that did not exist then have no old pools."""
        raise EngineError("this generator has no pools in the old config layout")


def _json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
