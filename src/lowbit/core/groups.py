"""Reshaping a 2-D tensor into its quantization groups and back."""

from __future__ import annotations

import torch

from lowbit.spec import QuantSpec


def as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(1, -1) if x.dim() == 1 else x.reshape(-1, x.shape[-1])


def to_groups(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """[rows, cols] -> [rows, n_groups, group_len] for tensor/channel/token/group granularity."""
    rows, cols = x.shape
    if spec.granularity == "tensor":
        return x.reshape(1, 1, rows * cols)
    if spec.granularity in ("channel", "token"):
        return x.reshape(rows, 1, cols)
    spec.check_shape(rows, cols)
    return x.reshape(rows, cols // spec.group_size, spec.group_size)


def expand_params(p: torch.Tensor, shape: tuple[int, int], spec: QuantSpec,
                  g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Broadcast a [rows|1, n_groups] parameter to the full [rows, cols] tensor."""
    rows, cols = shape
    if spec.granularity != "group":
        return p.reshape(p.shape[0], 1).expand(rows, cols)
    if g_idx is None:
        return p.repeat_interleave(spec.group_size, dim=1)
    return p[:, g_idx.long()]
