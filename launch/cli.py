"""`dfq`: the command line, a thin layer over functions in `engine`, `quant` and `benchmarks`.

Each subcommand lives in its own module (`launch/cmd_<name>.py`) exposing
`add_parser(subparsers)` and `run(args) -> int`. User mistakes surface as one line on stderr
and exit code 2, never as a traceback: argparse errors, and any `ValueError`/`FileNotFoundError`
subclass raised as a user error by the packages (`engine.errors.EngineError`,
`quant.errors.QuantError`) are turned into `dfq <cmd>: error: <message>`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from launch.errors import UsageError

COMMANDS = {
    "generate": "launch.cmd_generate",
    "quantize": "launch.cmd_quantize",
    "inspect": "launch.cmd_inspect",
    "export": "launch.cmd_export",
    "bench": "launch.cmd_bench",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in a single line (no usage dump) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dfq",
        description="Data-free quantization: generate synthetic calibration pools and quantize vision models.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", parser_class=_Parser)
    sub.required = True
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"dfq {version('dfq')}"
    except Exception:  # not installed (running from a checkout)
        return "dfq (source)"


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [UsageError]
    for module, name in (
        ("engine.errors", "EngineError"),
        ("quant.errors", "QuantError"),
        ("benchmarks.errors", "BenchmarkError"),
    ):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


#: third-party loggers that speak on import: diffusers warns (with a traceback) that it cannot use an
#: installed torchao, and importing torchao makes torch's pytree warn about deprecated registrations;
#: neither is about the user's command, and a bad input must stay one line
QUIET_LOGGERS = ("diffusers", "torch.utils._pytree", "torchao")


def _quiet_imports() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_imports()
    user_errors = _user_errors()
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except user_errors as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not msg.startswith("dfq"):
            cmd = getattr(locals().get("args"), "command", None)
            msg = f"dfq {cmd}: error: {msg}" if cmd else f"dfq: error: {msg}"
        print(msg, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
