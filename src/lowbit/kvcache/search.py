"""Vector-search mode: inner-product nearest neighbours over a quantized database."""

from __future__ import annotations

import torch

from ..errors import LowbitError
from .base import VectorQuantizer

__all__ = ["recall_at_k", "search"]


def search(queries: torch.Tensor, database: torch.Tensor, k: int = 10, chunk: int = 4096) -> torch.Tensor:
    """Indices ``[n_queries, k]`` of the largest inner products ``<q, x>``."""
    if queries.shape[-1] != database.shape[-1]:
        raise LowbitError(f"queries have dim {queries.shape[-1]}, database has dim {database.shape[-1]}")
    if not 1 <= k <= database.shape[0]:
        raise LowbitError(f"k must be in 1..{database.shape[0]} (database size), got k={k}")
    out = [(q @ database.T).topk(k, dim=-1).indices for q in queries.float().split(chunk)]
    return torch.cat(out)


def recall_at_k(queries: torch.Tensor, database: torch.Tensor, quantizer: VectorQuantizer, k: int = 10) -> dict:
    """Recall@k of search over ``quantizer``'s reconstruction of ``database`` against exact search.

    Also reports the database's stored bits per coordinate.
    """
    exact = search(queries, database.float(), k)
    packed = quantizer.quantize(database)
    approx = search(queries, quantizer.dequantize(packed), k)
    hits = (approx.unsqueeze(-1) == exact.unsqueeze(-2)).any(-1).float().sum(-1)
    return {"recall": (hits / k).mean().item(), "bits_per_coordinate": packed.bits_per_coordinate}
