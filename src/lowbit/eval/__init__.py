"""Evaluation against the original: perplexity, KL, top-1 agreement, size, bits per weight, speed."""

from lowbit.eval.compare import compare_models
from lowbit.eval.quality import quality_many, quality_pair
from lowbit.eval.size import bits_per_weight, disk_bytes, memory_bytes

__all__ = ["compare_models", "quality_pair", "quality_many", "bits_per_weight", "disk_bytes", "memory_bytes"]
