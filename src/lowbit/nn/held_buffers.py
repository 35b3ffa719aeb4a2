"""The base of modules that hold quantization parameters: `.to(dtype)` / `.half()` must not re-round
them. Only the bias follows a cast; codes, scales, zeros and tables keep their dtypes."""

from __future__ import annotations

from torch import nn


class HoldsQuantBuffers(nn.Module):
    def _apply(self, fn, recurse=True):
        held = {n: b for n, b in self._buffers.items() if n != "bias" and b is not None}
        for n in held:
            self._buffers[n] = None
        try:
            return super()._apply(fn, recurse)
        finally:
            self._buffers.update(held)
            self._after_apply()

    def _after_apply(self) -> None:
        """Drop whatever a subclass derived from its buffers (they may have moved)."""
