"""Histogram / KL-divergence (entropy) calibration as TensorRT defines it.

A histogram of |x| (2048 bins over [0, max|x|]); for every candidate threshold bin i >= 128 the
reference distribution P is the first i bins with everything above folded into the last, and Q is
those i bins merged into 2**(bits-1) quantized bins and expanded back over the non-empty ones; the
threshold is the upper edge of bin i with the least KL(P || Q) (the last such i on ties). This is
NVIDIA pytorch-quantization's `_compute_amax_entropy` (TensorRT's entropy calibrator), vectorized.
"""

from __future__ import annotations

import numpy as np
import torch

BINS = 2048


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """scipy.stats.entropy(p, q): both normalised, sum p log(p/q) over p > 0 (inf where q = 0)."""
    p = p / p.sum()
    q = q / q.sum()
    m = p > 0
    if np.any(q[m] == 0):
        return float("inf")
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def kl_threshold(hist: np.ndarray, edges: np.ndarray, bits: int = 8, start: int = 128, stride: int = 1) -> float:
    """The entropy threshold of a histogram of |x| (counts `hist`, bin edges `edges`)."""
    hist = np.asarray(hist, dtype=np.float64)
    nbins = 1 << (bits - 1)
    stop = len(hist)
    if stop <= start:
        return float(edges[-1])
    divergences = []
    for i in range(start, stop + 1, stride):
        space = np.linspace(0, i, num=nbins + 1)
        digit = np.digitize(np.arange(i), space) - 1
        ref = hist[:i]
        used = ref != 0
        sums = np.bincount(digit[used], weights=ref[used], minlength=nbins)
        counts = np.bincount(digit[used], minlength=nbins)
        q = np.zeros(i)
        q[used] = (sums / np.maximum(counts, 1))[digit[used]]
        p = ref.copy()
        p[-1] += hist[i:].sum()
        divergences.append(_kl(p, q) if q.sum() > 0 else float("inf"))
    d = np.asarray(divergences)
    last_argmin = len(d) - 1 - int(np.argmin(d[::-1]))
    return float(edges[last_argmin * stride + start])


def abs_histogram(x: torch.Tensor, bins: int = BINS) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of |x| over [0, max|x|] (numpy's bin edges and counts)."""
    a = x.detach().abs().double().reshape(-1).numpy()
    top = float(a.max()) if a.size else 0.0
    return np.histogram(a, bins=bins, range=(0.0, top if top > 0 else 1.0))


def entropy_range(x: torch.Tensor, bits: int = 8, per_channel: bool = False, bins: int = BINS,
                  stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(-t, t) with t the entropy threshold of x [samples, channels] (per channel: one t per column)."""
    x = x.float()
    cols = [x.reshape(-1)] if not per_channel else [x[:, c] for c in range(x.shape[1])]
    ts = []
    for col in cols:
        hist, edges = abs_histogram(col, bins)
        ts.append(kl_threshold(hist, edges, bits, stride=stride) if hist.sum() > 0 else 0.0)
    t = torch.tensor(ts, dtype=torch.float32)
    if not per_channel:
        t = t[0]
    return -t, t
