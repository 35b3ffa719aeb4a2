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

__all__ = ["KeyFrame", "fit_key_frame", "rope", "rope_inv_freq"]


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


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Apply (or undo) HF's rotate-half RoPE at ``positions`` ``[n]`` to ``x`` ``[..., n, d]`` (float32 out).

    Channels beyond ``2 · len(inv_freq)`` (partial rotary) pass through.
    """
    half = inv_freq.numel()
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
    """

    mean: torch.Tensor
    scale: torch.Tensor
    inv_freq: torch.Tensor | None
    basis: torch.Tensor | None = None

    def to_frame(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = k.float() if self.inv_freq is None else rope(k, positions, self.inv_freq, inverse=True)
        x = x - self.mean.float()
        if self.basis is not None:
            x = x @ self.basis.to(x.device)
        return x * self.scale.float()

    def from_frame(self, r: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = r.float() / self.scale.float()
        if self.basis is not None:
            x = x @ self.basis.to(x.device).transpose(-1, -2)
        x = x + self.mean.float()
        return x if self.inv_freq is None else rope(x, positions, self.inv_freq)

    @property
    def nbytes(self) -> int:
        """Per-sequence side data: fp16 mean and scale (the model-level basis is not counted here)."""
        return 2 * (self.mean.numel() + self.scale.numel())

    def index_select(self, index: torch.Tensor) -> "KeyFrame":
        def pick(t):
            return None if t is None else t.index_select(0, index.to(t.device))

        return KeyFrame(pick(self.mean), pick(self.scale), self.inv_freq, self.basis)


def fit_key_frame(k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor | None = None,
                  center: bool = True, power: float = 0.25, basis: torch.Tensor | None = None) -> KeyFrame:
    """Fit the frame on keys ``[b, h, n, d]`` at cache ``positions`` ``[n]`` (each batch row on its own).

    ``center``: subtract the per-channel mean; ``power``: scale channel ``i`` by ``var_i^-power`` of the
    residual (normalised to mean 1 per head; 0 = no scaling); ``basis``: ``[h, d, d]`` orthogonal matrices
    applied after centring (the scale is then per basis direction).
    """
    if k.dim() != 4 or positions.shape != (k.shape[-2],):
        raise LowbitError(f"fit_key_frame: keys must be [b, h, n, d] with positions [n], got keys "
                          f"{tuple(k.shape)} and positions {tuple(positions.shape)}")
    if not 0.0 <= power <= 0.5:
        raise LowbitError(f"fit_key_frame: power must be in [0, 0.5], got key_scale_power={power!r}")
    h, d = k.shape[1], k.shape[-1]
    if basis is not None and tuple(basis.shape) != (h, d, d):
        raise LowbitError(f"fit_key_frame: key_basis must be [heads={h}, {d}, {d}], got {tuple(basis.shape)}")
    x = k.float() if inv_freq is None else rope(k, positions, inv_freq, inverse=True)
    mean = x.mean(-2, keepdim=True) if center else torch.zeros_like(x[..., :1, :])
    mean = mean.half()
    x = x - mean.float()
    if basis is not None:
        basis = basis.float()
        x = x @ basis.to(x.device)
    scale = torch.ones_like(mean)
    if power > 0:
        s = x.pow(2).mean(-2, keepdim=True).clamp_min(1e-12).pow(-power)  # [b, h, 1, d]
        scale = (s / s.mean(-1, keepdim=True)).half()
    return KeyFrame(mean, scale, inv_freq, basis)
