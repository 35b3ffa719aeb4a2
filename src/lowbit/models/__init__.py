"""Model loading and architecture knowledge (as data)."""

from lowbit.models.arch import ARCHS, Arch, arch_for
from lowbit.models.loader import load_model

__all__ = ["ARCHS", "Arch", "arch_for", "load_model"]
