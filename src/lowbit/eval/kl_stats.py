"""Per-token KL divergence statistics as llama.cpp's KL report prints them (pure)."""

from __future__ import annotations

import torch

# (key, quantile): llama.cpp's perplexity --kl-divergence prints these and the mean
PERCENTILES = (("median", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99), ("p99_9", 0.999))


def token_kl(ref_lp: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """KL(ref || q) at every position from log-probabilities [..., vocab] -> [...]."""
    return (ref_lp.exp() * (ref_lp - lp)).sum(-1)


def kl_summary(values: torch.Tensor) -> dict:
    """mean, median, p90, p95, p99, p99.9, max and min of per-token KL values; quantiles interpolate
    linearly between order statistics (numpy's default method)."""
    v = values.detach().double().flatten()
    if v.numel() == 0:
        raise ValueError("no KL values")
    out = {"mean": float(v.mean())}
    qs = torch.quantile(v, torch.tensor([q for _, q in PERCENTILES], dtype=torch.float64))
    out.update({k: float(q) for (k, _), q in zip(PERCENTILES, qs)})
    out["max"] = float(v.max())
    out["min"] = float(v.min())
    return out
