"""QuantEmbedding: a drop-in nn.Embedding holding int8 codes (llama.cpp keeps Q4_0 models'
token_embd at Q8_0 the same way).

The table is a quantized-layer record like a Linear's weight ([num_embeddings, embedding_dim],
rows independent): symmetric int8 codes, one byte each, with a scale per row or per group of
columns in the spec's scale dtype. A lookup gathers the rows it needs and dequantizes only those,
so the table is never materialised in floating point. Built from the record (`from_quantized`);
`record()` gives it back bit-identical for the writers.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core.quantize import QuantizedWeight, dequantize
from lowbit.errors import LowbitError
from lowbit.nn.held_buffers import HoldsQuantBuffers
from lowbit.spec import QuantSpec


def check_embedding_spec(spec: QuantSpec, dim: int, where: str = "embedding") -> None:
    """The embedding specs the lookup runs: symmetric 8-bit int, per row or groups dividing `dim`."""
    if spec.dtype != "int" or spec.bits != 8 or not spec.symmetric or spec.granularity not in ("channel", "group"):
        raise LowbitError(f"{where}: quantized embeddings are symmetric 8-bit int per row or per group "
                          f"(got {spec.dtype} {spec.bits}-bit, {'sym' if spec.symmetric else 'asym'}, "
                          f"{spec.granularity}); use --embed-bits 8 with a group size or none")
    if spec.granularity == "group" and dim % spec.group_size:
        raise LowbitError(f"{where}: group size {spec.group_size} does not divide the embedding width {dim}")


class QuantEmbedding(HoldsQuantBuffers):
    """Embedding lookup from int8 codes and per-row / per-group scales (see module docstring)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        check_embedding_spec(spec, embedding_dim)
        self.num_embeddings, self.embedding_dim, self.spec = num_embeddings, embedding_dim, spec
        self.padding_idx = padding_idx
        self.out_dtype = dtype  # what the lookup returns (the dtype the model's float weights run in)
        groups = embedding_dim // spec.group_size if spec.granularity == "group" else 1
        self.register_buffer("codes", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings, groups, dtype=spec.torch_scale_dtype))

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, padding_idx: int | None = None,
                       dtype: torch.dtype = torch.float32, name: str = "embedding") -> "QuantEmbedding":
        check_embedding_spec(qw.spec, qw.shape[1], name)
        if qw.g_idx is not None or qw.zero is not None:
            raise LowbitError(f"{name}: an embedding record has no act-order g_idx or zero points")
        mod = cls(*qw.shape, qw.spec, padding_idx, dtype)
        mod.codes = qw.codes.to(torch.int8).contiguous()
        mod.scale = qw.scale.contiguous()
        return mod

    def record(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes, self.scale, None, self.spec)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table, for code that reads `embed_tokens.weight` (its dtype, a tied head)."""
        return dequantize(self.codes, self.scale, None, self.spec, None, self.out_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range for an embedding of {self.num_embeddings} rows")
        rows = dequantize(self.codes.index_select(0, flat), self.scale.index_select(0, flat), None, self.spec,
                          None, self.out_dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 {self.spec.granularity}" + (
            f" g{self.spec.group_size}" if self.spec.granularity == "group" else "")


def quantize_embedding(embedding: nn.Embedding, spec: QuantSpec, name: str = "embedding") -> QuantizedWeight:
    """Round-to-nearest int8 record of an embedding table (absmax scale per row / group)."""
    from lowbit.core.quantize import quantize

    check_embedding_spec(spec, embedding.embedding_dim, name)
    return quantize(embedding.weight.detach().float(), spec)
