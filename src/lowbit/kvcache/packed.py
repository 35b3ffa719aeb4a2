"""The container every KV / vector quantizer returns: named tensors of real packed bytes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from ..errors import LowbitError

__all__ = ["Packed"]


@dataclass
class Packed:
    """Packed form of a tensor ``x`` of shape ``shape`` (``[..., n, d]``).

    ``fields`` maps names to tensors whose leading axes equal ``shape[:-1]`` (one row per vector, e.g.
    uint8 codes ``[..., n, bytes]``, fp16 norms ``[..., n, 1]``) — except for token-grouped side data
    (KIVI key scales ``[..., n / group, d]``), which is still indexed by the second-to-last axis, so
    :meth:`cat` can append along the token axis for every field alike.
    """

    fields: dict[str, torch.Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes actually held by the packed fields (codes plus all side data)."""
        return sum(t.numel() * t.element_size() for t in self.fields.values())

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def bits_per_coordinate(self) -> float:
        """Stored bits per coordinate of the original tensor, norms and scales included."""
        return 8.0 * self.nbytes / max(self.numel, 1)

    def cat(self, other: "Packed") -> "Packed":
        """Append ``other`` along the token axis (``-2``); both must come from the same quantizer."""
        if self.shape[:-2] != other.shape[:-2] or self.shape[-1] != other.shape[-1]:
            raise LowbitError(f"cannot append packed tensors of shapes {self.shape} and {other.shape}")
        if self.fields.keys() != other.fields.keys():
            raise LowbitError("cannot append packed tensors produced by different quantizers")
        fields = {k: torch.cat([v, other.fields[k]], dim=-2) for k, v in self.fields.items()}
        shape = (*self.shape[:-2], self.shape[-2] + other.shape[-2], self.shape[-1])
        return Packed(fields, shape, self.dtype, dict(self.meta))

    def index_select(self, dim: int, index: torch.Tensor) -> "Packed":
        """Select along a leading (batch) axis — used for beam search reordering."""
        if dim < 0 or dim >= len(self.shape) - 2:
            raise LowbitError(f"index_select only supports leading batch axes, got dim={dim}")
        fields = {k: v.index_select(dim, index.to(v.device)) for k, v in self.fields.items()}
        shape = list(self.shape)
        shape[dim] = len(index)
        return Packed(fields, tuple(shape), self.dtype, dict(self.meta))

    def map(self, fn) -> "Packed":
        return Packed({k: fn(v) for k, v in self.fields.items()}, self.shape, self.dtype, dict(self.meta))

    def drop_front(self, n: int) -> "Packed":
        """Drop the first ``n`` tokens; ``n`` must be a multiple of every field's token grouping."""
        return self._slice_tokens(n, self.shape[-2])

    def drop_back(self, n: int) -> "Packed":
        """Drop the last ``n`` tokens (same grouping rule as :meth:`drop_front`)."""
        return self._slice_tokens(0, self.shape[-2] - n)

    def _slice_tokens(self, start: int, stop: int) -> "Packed":
        t = self.shape[-2]
        fields = {}
        for k, v in self.fields.items():
            rows = v.shape[-2]
            group = t // rows if rows else 1
            if start % group or stop % group:
                raise LowbitError(f"cannot cut packed field {k!r} (groups of {group} tokens) at tokens {start}:{stop}")
            fields[k] = v[..., start // group : stop // group, :]
        return Packed(fields, (*self.shape[:-2], stop - start, self.shape[-1]), self.dtype, dict(self.meta))
