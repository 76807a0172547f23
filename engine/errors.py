"""User-facing errors of the engine: the CLI prints them as one line and exits 2 (or 1)."""


class EngineError(ValueError):
    """A bad request (config, path, class file, resume mismatch): nothing was written."""


class GenerationError(RuntimeError):
    """A run that started but could not finish (a worker kept dying, a model kept producing
    unusable images, ...). Committed shards stay valid; re-running the same command resumes."""
