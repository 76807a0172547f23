"""User-facing errors of the quantizer: the CLI prints them as one line and exits 2."""


class QuantError(ValueError):
    """A bad request (model spec, data path, bit width, too few images): nothing was written."""
