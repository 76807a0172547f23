"""`dfq` entry point: lists its subcommands, and user mistakes exit 2 with one line, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launch.cli import COMMANDS, main


def run_dfq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_help_lists_every_subcommand() -> None:
    out = run_dfq("--help")
    assert out.returncode == 0
    for name in ("generate", "quantize", "inspect", "bench", "export"):
        assert name in COMMANDS
        assert name in out.stdout


@pytest.mark.parametrize("args", [["frobnicate"], [], ["generate", "--num-images", "zero"]])
def test_usage_errors_are_one_line_exit_2(args: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("dfq")
