"""A ``[b, h, n, d]`` tensor that grows along the token axis in amortized O(new tokens).

The quantized cache's decode buffer: the sequence attention reads (sinks, dequantized packed tokens,
full-precision tail), kept in the model's dtype so a decode step writes one token instead of
dequantizing, and concatenating, the whole cache.
"""

from __future__ import annotations

import torch

__all__ = ["TokenBuffer"]


class TokenBuffer:
    def __init__(self):
        self.data: torch.Tensor | None = None
        self.start = self.stop = 0

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def nbytes(self) -> int:
        """Bytes allocated (capacity, not just the live tokens)."""
        return 0 if self.data is None else self.data.nbytes

    def view(self) -> torch.Tensor:
        return self.data[..., self.start:self.stop, :]

    def append(self, x: torch.Tensor) -> None:
        n = x.shape[-2]
        if self.data is None:
            self.data = x.new_empty(*x.shape[:-2], max(2 * n, 64), x.shape[-1])
        elif self.stop + n > self.data.shape[-2]:
            live = self.view()
            grown = x.new_empty(*x.shape[:-2], max(2 * (len(self) + n), 64), x.shape[-1])
            grown[..., :len(self), :] = live
            self.data, self.stop, self.start = grown, len(self), 0
        self.data[..., self.stop:self.stop + n, :] = x
        self.stop += n

    def write(self, offset: int, x: torch.Tensor) -> None:
        """Overwrite tokens ``offset .. offset + n`` (counted from the first live token)."""
        if offset < 0 or offset + x.shape[-2] > len(self):
            raise IndexError(f"write of {x.shape[-2]} tokens at {offset} outside a buffer of {len(self)}")
        self.data[..., self.start + offset:self.start + offset + x.shape[-2], :] = x

    def drop_front(self, n: int) -> None:
        self.start += min(n, len(self))

    def drop_back(self, n: int) -> None:
        self.stop -= min(n, len(self))

    def index_select(self, index: torch.Tensor) -> None:
        if self.data is not None:
            self.data = self.view().index_select(0, index.to(self.data.device))
            self.start, self.stop = 0, self.data.shape[-2]
