"""The CLI's own user error (kept apart from cli.py so `python -m launch.cli` shares one class)."""


class UsageError(Exception):
    """A mistake in what the user asked for; reported in one line with exit code 2."""
