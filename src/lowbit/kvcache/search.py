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


def recall_at_k(queries: torch.Tensor, database: torch.Tensor, quantizer: VectorQuantizer, k: int = 10,
                center: bool = False) -> dict:
    """Recall@k of search over ``quantizer``'s reconstruction of ``database`` against exact search.

    ``center``: quantize ``x - μ`` (μ the database mean, kept in fp16 and counted): ``<q, x - μ>`` moves
    every score of a query by the same ``<q, μ>``, so the ranking is that of ``<q, x>``, while the
    quantizer sees smaller vectors without their shared component.  Also reports the database's
    stored bits per coordinate.
    """
    exact = search(queries, database.float(), k)
    x = database.float()
    extra_bytes = 0
    if center:
        mu = x.mean(0, keepdim=True).half().float()
        x = x - mu
        extra_bytes = 2 * mu.numel()
    packed = quantizer.quantize(x)
    approx = search(queries, quantizer.dequantize(packed), k)
    hits = (approx.unsqueeze(-1) == exact.unsqueeze(-2)).any(-1).float().sum(-1)
    bits = 8.0 * (packed.nbytes + extra_bytes) / max(packed.numel, 1)
    return {"recall": (hits / k).mean().item(), "bits_per_coordinate": bits}
