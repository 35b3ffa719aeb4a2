"""The frame keys are quantized in: RoPE undone, per-channel mean removed, channels rescaled.

Keys reach the cache after RoPE, so a channel's constant offset (SmolLM2's keys have a few large,
token-consistent channels) turns into a rotating one that a plain mean cannot remove.  Undoing RoPE
at the token's cache index makes it constant again; the mean over the first tokens is then
subtracted and each channel is multiplied by ``var^(-power)`` of the residual (``power = 1/4``
halves the spread of channel magnitudes: the outlier channels get more of the code budget without
the small channels losing all of theirs).  Every step is invertible and stored exactly (mean and
scale in fp16, ``2·d`` numbers per head), so ``from_frame(to_frame(k)) == k`` up to fp rounding and
the only error left is the quantizer's.  Exactness does not depend on the frequencies matching the
model's: the same rotation is applied back, only the benefit does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowbitError

__all__ = ["KeyFrame", "fit_key_frame", "rope", "rope_inv_freq", "RopeTable"]


def rope_inv_freq(config, layer_type: str = "full_attention", head_dim: int | None = None) -> torch.Tensor | None:
    """RoPE inverse frequencies ``[rotary_dim / 2]`` of ``config`` (``rope_theta``; scaling ignored), or None.

    ``rope_parameters`` may be per layer type (Gemma 3: local and global layers differ).
    """
    if config is None:
        return None
    text = config.get_text_config(decoder=True)
    params = getattr(text, "rope_parameters", None) or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    theta = params.get("rope_theta", getattr(text, "rope_theta", None))
    if theta is None:
        return None
    d = head_dim or getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rot = int(d * params.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", 1.0) or 1.0))
    rot -= rot % 2
    if rot < 2:
        return None
    return 1.0 / (float(theta) ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)).float()


class RopeTable:
    """cos / sin of RoPE angles, computed once per position and kept (one table per set of frequencies,
    shared by the cache's layers): ``cos_sin(positions)`` slices it, growing it when needed."""

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq
        self.cos = self.sin = torch.empty(0, inv_freq.numel())

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self.cos.shape[0]:
            n = max(need, 2 * self.cos.shape[0], 256)
            ang = torch.arange(n, dtype=torch.float64)[:, None] * self.inv_freq.double()[None, :]
            self.cos, self.sin = ang.cos().float(), ang.sin().float()
        pos = positions.cpu()
        n = pos.numel()
        if n and int(pos[-1]) - int(pos[0]) == n - 1 and bool((pos.diff() == 1).all() if n > 1 else True):
            sl = slice(int(pos[0]), int(pos[0]) + n)  # contiguous positions: a view, no gather
            return self.cos[sl].to(positions.device), self.sin[sl].to(positions.device)
        return self.cos[pos].to(positions.device), self.sin[pos].to(positions.device)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False,
         table: RopeTable | None = None) -> torch.Tensor:
    """Apply (or undo) HF's rotate-half RoPE at ``positions`` ``[n]`` to ``x`` ``[..., n, d]`` (float32 out).

    Channels beyond ``2 · len(inv_freq)`` (partial rotary) pass through.  ``table``: cos / sin kept per position.
    """
    half = inv_freq.numel()
    if table is not None:
        cos, sin = table.cos_sin(positions)
    else:
        ang = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
        cos, sin = ang.cos(), ang.sin()
    if inverse:
        sin = -sin
    xf = x.float()
    a, b, rest = xf[..., :half], xf[..., half:2 * half], xf[..., 2 * half:]
    out = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


@dataclass
class KeyFrame:
    """Per-(batch row, head) key frame fitted on the first tokens.

    ``r = ((unrope(k) - mean) @ basis) · scale``: ``mean``, ``scale`` ``[b, h, 1, d]`` fp16 (per-sequence side
    data); ``basis`` ``[h, d, d]`` an optional orthogonal per-head basis calibrated once per model
    (:mod:`.key_basis`), not per sequence.  ``inv_freq`` is None when the model has no RoPE.

    ``post_rope``: ``r = (k - rope(mean, pos)) · scale`` with the scale tied within each RoPE pair, i.e.
    ``rope((unrope(k) - mean) · scale, pos)``: the same centring and scaling, but the keys stay rotated, so a
    query scores them as ``q·rope(mean, pos) + (q / scale)·r`` — one query transform for every key
    (:mod:`.code_scoring`).  No basis then.
    """

    mean: torch.Tensor
    scale: torch.Tensor
    inv_freq: torch.Tensor | None
    basis: torch.Tensor | None = None
    post_rope: bool = False
    table: RopeTable | None = None

    def mean_at(self, positions: torch.Tensor) -> torch.Tensor:
        """``rope(mean, positions)`` ``[b, h, n, d]`` (the post-RoPE frame's per-position offset)."""
        m = self.mean.float().expand(*self.mean.shape[:-2], positions.numel(), self.mean.shape[-1])
        return m if self.inv_freq is None else rope(m, positions, self.inv_freq, table=self.table)

    def to_frame(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.post_rope:
            return (k.float() - self.mean_at(positions)) * self.scale.float()
        x = k.float() if self.inv_freq is None else rope(k, positions, self.inv_freq, inverse=True, table=self.table)
        x = x - self.mean.float()
        if self.basis is not None:
            x = x @ self.basis.to(x.device)
        return x * self.scale.float()

    def from_frame(self, r: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.post_rope:
            return r.float() / self.scale.float() + self.mean_at(positions)
        x = r.float() / self.scale.float()
        if self.basis is not None:
            x = x @ self.basis.to(x.device).transpose(-1, -2)
        x = x + self.mean.float()
        return x if self.inv_freq is None else rope(x, positions, self.inv_freq, table=self.table)

    @property
    def nbytes(self) -> int:
        """Per-sequence side data: fp16 mean and scale (the model-level basis is not counted here)."""
        return 2 * (self.mean.numel() + self.scale.numel())

    def index_select(self, index: torch.Tensor) -> "KeyFrame":
        def pick(t):
            return None if t is None else t.index_select(0, index.to(t.device))

        return KeyFrame(pick(self.mean), pick(self.scale), self.inv_freq, self.basis, self.post_rope, self.table)


def fit_key_frame(k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor | None = None,
                  center: bool = True, power: float = 0.25, basis: torch.Tensor | None = None,
                  post_rope: bool = False, table: RopeTable | None = None) -> KeyFrame:
    """Fit the frame on keys ``[b, h, n, d]`` at cache ``positions`` ``[n]`` (each batch row on its own).

    ``center``: subtract the per-channel mean; ``power``: scale channel ``i`` by ``var_i^-power`` of the
    residual (normalised to mean 1 per head; 0 = no scaling); ``basis``: ``[h, d, d]`` orthogonal matrices
    applied after centring (the scale is then per basis direction); ``post_rope``: see :class:`KeyFrame`
    (the variance is averaged within each RoPE pair so that the scale commutes with RoPE).
    """
    if k.dim() != 4 or positions.shape != (k.shape[-2],):
        raise LowbitError(f"fit_key_frame: keys must be [b, h, n, d] with positions [n], got keys "
                          f"{tuple(k.shape)} and positions {tuple(positions.shape)}")
    if not 0.0 <= power <= 0.5:
        raise LowbitError(f"fit_key_frame: power must be in [0, 0.5], got key_scale_power={power!r}")
    h, d = k.shape[1], k.shape[-1]
    if basis is not None and tuple(basis.shape) != (h, d, d):
        raise LowbitError(f"fit_key_frame: key_basis must be [heads={h}, {d}, {d}], got {tuple(basis.shape)}")
    if post_rope and basis is not None:
        raise LowbitError("fit_key_frame: post_rope=True (scoring against the codes) takes no key_basis")
    x = k.float() if inv_freq is None else rope(k, positions, inv_freq, inverse=True, table=table)
    mean = x.mean(-2, keepdim=True) if center else torch.zeros_like(x[..., :1, :])
    mean = mean.half()
    x = x - mean.float()
    if basis is not None:
        basis = basis.float()
        x = x @ basis.to(x.device)
    scale = torch.ones_like(mean)
    if power > 0:
        var = x.pow(2).mean(-2, keepdim=True)
        if post_rope and inv_freq is not None:  # one scale per RoPE pair (i, i + half): commutes with RoPE
            half = inv_freq.numel()
            pair = (var[..., :half] + var[..., half:2 * half]) / 2
            var = torch.cat([pair, pair, var[..., 2 * half:]], dim=-1)
        s = var.clamp_min(1e-12).pow(-power)  # [b, h, 1, d]
        scale = (s / s.mean(-1, keepdim=True)).half()
    return KeyFrame(mean, scale, inv_freq, basis, post_rope, table)
