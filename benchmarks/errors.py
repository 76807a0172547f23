"""The benchmarks' own user error: `dfq bench` prints it as one line and exits 2."""


class BenchmarkError(ValueError):
    """A bad benchmark request (missing assets, inconsistent options): nothing was measured."""
