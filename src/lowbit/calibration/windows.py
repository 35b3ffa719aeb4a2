"""Token windows: random calibration samples and non-overlapping evaluation windows."""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError


def tokenize(tokenizer, text: str) -> torch.Tensor:
    if not text.strip():
        raise LowbitError("the text is empty")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids


def calibration_batches(tokenizer, text: str, n_samples: int = 64, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """[n_samples, seq_len] random windows of the calibration text (deterministic for a seed)."""
    ids = tokenize(tokenizer, text)
    if ids.numel() < seq_len + 1:
        raise LowbitError(f"calibration text has {ids.numel()} tokens; need more than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def eval_windows(tokenizer, text: str, seq_len: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """[n, seq_len] consecutive non-overlapping windows of the evaluation text."""
    ids = tokenize(tokenizer, text)
    n = ids.numel() // seq_len
    if n == 0:
        raise LowbitError(f"evaluation text has {ids.numel()} tokens; need at least seq_len={seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].reshape(n, seq_len)
