"""Running quantized models: lowbit's batch-1 decoder (`runtime.decoder`), text generation, and process
settings (`configure`)."""

from lowbit.runtime.configure import configure

__all__ = ["configure"]
