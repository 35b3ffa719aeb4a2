"""A per-(layer, kv-head) principal basis of the keys, calibrated once per model on sample text.

In the basis, a few directions carry most of the key variance; with the key frame's ``var^-1/4``
scaling and the fractional-bit split (whose extra bit goes to the highest-energy directions) the
code budget follows the variance.  The basis is model-level data (``d × d`` per kv-head per layer,
like a quantizer's calibration), not per-sequence side data, so it is not in the cache's
bits/coordinate; :func:`basis_nbytes` says what it costs.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache, get_layer_types_and_kwargs

from ..errors import LowbitError
from .key_frame import rope, rope_inv_freq

__all__ = ["key_basis_from_keys", "calibrate_key_bases", "basis_nbytes"]


def key_basis_from_keys(keys: list[torch.Tensor], inv_freq: torch.Tensor | None, skip_first: int = 1) -> torch.Tensor:
    """Orthogonal ``[h, d, d]`` (columns by descending variance) from post-RoPE keys ``[b, h, n, d]``.

    RoPE is undone at positions ``0..n-1``, the first ``skip_first`` tokens (attention sinks) are left out
    and each sequence is centred on its own mean, as the cache does before quantizing.
    """
    if not keys:
        raise LowbitError("key_basis_from_keys: keys must be a non-empty list of [b, h, n, d] tensors")
    cov = None
    for k in keys:
        if k.dim() != 4 or k.shape[-2] <= skip_first + 1:
            raise LowbitError(f"key_basis_from_keys: each keys tensor must be [b, h, n > {skip_first + 1}, d], "
                              f"got {tuple(k.shape)}")
        x = k.float() if inv_freq is None else rope(k, torch.arange(k.shape[-2]), inv_freq, inverse=True)
        x = x[..., skip_first:, :]
        x = x - x.mean(-2, keepdim=True)
        c = (x.transpose(-1, -2) @ x).sum(0).double()  # [h, d, d]
        cov = c if cov is None else cov + c
    _, vecs = torch.linalg.eigh(cov)
    return vecs.flip(-1).float()


@torch.no_grad()
def calibrate_key_bases(model, windows: torch.Tensor, skip_first: int = 1, progress: bool = True) -> list[torch.Tensor]:
    """One key basis per decoder layer from full-precision forwards over ``windows`` ``[n, seq_len]``."""
    if windows.dim() != 2:
        raise LowbitError(f"calibrate_key_bases: windows must be [n, seq_len] token ids, got {tuple(windows.shape)}")
    config = model.config
    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    device = next(model.parameters()).device
    per_layer: list[list[torch.Tensor]] = [[] for _ in layer_types]
    for w in tqdm(windows, desc="key basis", disable=not progress):
        cache = DynamicCache(config=config)
        model(w[None].to(device), past_key_values=cache, use_cache=True)
        for i, layer in enumerate(cache.layers):
            per_layer[i].append(layer.keys.detach().float().cpu())
    out = []
    for i, ks in enumerate(per_layer):
        inv = rope_inv_freq(config, layer_types[i], ks[0].shape[-1])
        out.append(key_basis_from_keys(ks, inv, skip_first))
    return out


def basis_nbytes(bases: list[torch.Tensor]) -> int:
    """Bytes of the bases stored in fp16 (once per model)."""
    return sum(2 * b.numel() for b in bases)
