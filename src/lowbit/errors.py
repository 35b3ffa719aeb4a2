"""One exception type for bad input: the CLI prints its message and exits non-zero."""


class LowbitError(ValueError):
    """Bad input, with a message naming the file, module or parameter and how to fix it."""
