"""lowbit: make trained models smaller and faster, and measure exactly what that cost."""

from lowbit.spec import PRESETS, QuantSpec, preset

__version__ = "0.1.0"
__all__ = ["QuantSpec", "PRESETS", "preset", "__version__"]
