"""Decode-step attention computed against the stored TurboQuant codes, not a dequantized cache.

With the post-RoPE key frame (:class:`.key_frame.KeyFrame`, ``post_rope=True``) a stored key is
``k = rope(μ, p) + r / s`` with ``r = ‖r‖ · (c[codes] / √d) @ R`` per channel part (rotation ``R``,
Lloyd-Max codebook ``c``).  A query ``q`` (already rotated by RoPE) therefore scores it as

    q·k = q·rope(μ, p) + (‖r‖ / √d) · Σ_j q'_j c[code_j],      q' = (q / s) @ Rᵀ

``q'`` is computed once per step and query head (not per key); ``q·rope(μ, p)`` comes from the per-position
cos / sin table (:class:`.key_frame.RopeTable`) and two per-plane dot products; the code sum is the
per-coordinate lookup of the rotated query against the codebook values of the stored codes.  Values
are accumulated in the rotated domain, ``Σ_t p_t ‖v_t‖ c[codes_t] / √d``, and rotated back once per step.
Attention sinks and the full-precision tail are scored as usual.  Nothing of the cache is dequantized.

The two loops over the codes (scores and value sums) run in C++ (``csrc/kv_scores.cpp``, the extension
``lowbit._kv_scores``; AVX2: 8 codes per load + byte shuffle, the codebook as an in-register lookup table,
one pass over a kv head's codes for all its query heads) when it is built and the CPU has AVX2; otherwise,
or with ``kernels=False`` / ``LOWBIT_KERNELS=torch``, in pure torch (codes unpacked, codebook gathered, two
matmuls): both compute the same sums.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch

from lowbit.core.packing import unpack_bits

from ..errors import LowbitError
from .base import decode_norm
from .packed import Packed

__all__ = ["ATTENTION_NAME", "attend_codes", "attend_dequantized", "code_attention", "code_kernels",
           "enable_code_scoring", "part_scores", "part_value_sums"]

log = logging.getLogger(__name__)

ATTENTION_NAME = "lowbit_codes"
#: the same layers, attended the usual way (whole quantized part dequantized): the reference of the tests
REFERENCE_NAME = "lowbit_codes_reference"


def _parts(quantizer, packed: Packed):
    """(channel index or None, part quantizer, codes, norms) per channel part of a TurboQuantMSE."""
    split = getattr(quantizer, "_split", None)
    if split is None:
        return [(None, quantizer, packed.fields["codes"], packed.fields["norm"])]
    return [(idx, q, packed.fields[f"{pre}codes"], packed.fields[f"{pre}norm"])
            for pre, q, idx in (("hi.", split.hi, split.hi_idx), ("lo.", split.lo, split.lo_idx))]


def _code_values(q, codes: torch.Tensor) -> torch.Tensor:
    """Codebook values of the stored codes ``[b, h, n, dp]`` (rotated domain, unit scale)."""
    return q.codebook.decode(unpack_bits(codes, q.int_bits, q.dim).long())


@functools.cache
def _extension():
    try:
        from lowbit import _kv_scores
    except ImportError as e:
        log.warning("lowbit's KV scoring kernels are not built (%s): scoring against the codes uses the slower "
                    "pure-torch path; rebuild with `pip install --no-build-isolation -e .` (see README)", e)
        return None
    if not _kv_scores.supported():
        log.warning("this CPU lacks AVX2/FMA: scoring against the codes uses the pure-torch path")
        return None
    return _kv_scores


def code_kernels(kernels: bool | None, device: torch.device):
    """``lowbit._kv_scores`` (csrc/kv_scores.cpp) when it can score codes on ``device`` (CPU) and neither
    ``kernels=False`` nor ``LOWBIT_KERNELS=torch`` asks for pure torch, else None (the pure-torch path);
    ``kernels=True`` raises when the kernels cannot run."""
    off = kernels is False or os.environ.get("LOWBIT_KERNELS", "").lower() == "torch"
    ext = None if off or device.type != "cpu" else _extension()
    if ext is None and kernels:
        raise LowbitError("attend_codes(kernels=True): lowbit._kv_scores (csrc/kv_scores.cpp) is not built, this "
                          "CPU lacks AVX2/FMA, the query is not on the CPU or LOWBIT_KERNELS=torch; rebuild with "
                          "`pip install --no-build-isolation -e .` (README install step)")
    return ext


def part_scores(ext, part, codes: torch.Tensor, qp: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale[t] · Σ_j qp[g, j] c[codes[t, j]]`` ``[b, h, g, n]`` for one channel part's packed codes."""
    if ext is not None:
        return ext.kv_code_scores(codes, qp.contiguous(), scale.contiguous(), part.codebook.levels, part.int_bits)
    return (qp @ _code_values(part, codes).transpose(-1, -2)) * scale[:, :, None, :]


def part_value_sums(ext, part, codes: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``Σ_t w[g, t] c[codes[t]]`` ``[b, h, g, dp]`` (rotated domain) for one channel part's packed codes."""
    if ext is not None:
        return ext.kv_code_values(codes, w.contiguous(), part.codebook.levels, part.int_bits, part.dim)
    return w @ _code_values(part, codes)


@torch.no_grad()
def attend_codes(layer, query: torch.Tensor, scaling: float, softcap: float | None = None,
                 kernels: bool | None = None) -> torch.Tensor:
    """Attention output ``[b, hq, 1, d]`` of one decode query against a scoring layer's sinks, codes and tail.

    ``kernels``: None uses the C++ kernels when built, False the pure-torch path, True requires the kernels.
    """
    frame, kq, vq = layer._frame, layer.key_quantizer, layer.value_quantizer
    if frame is None or not frame.post_rope or layer._pk is None:
        raise LowbitError("attend_codes needs a QuantizedKVCache(score_codes=True) layer holding quantized tokens")
    b, hq, nq, d = query.shape
    h = layer._pk.shape[1]
    g = hq // h
    q = query.float().reshape(b, h, g * nq, d)
    pk, pv = layer._pk, layer._pv
    pos = layer._packed_positions()
    visible = getattr(layer, "_visible", None)
    n_fp_tail = layer.keys.shape[-2]
    if visible is not None and pk.shape[-2] + n_fp_tail > visible:  # sliding layer: oldest codes out of view
        skip = pk.shape[-2] + n_fp_tail - visible
        pk, pv, pos = pk.drop_front(skip), pv.drop_front(skip), pos[skip:]
    # keys: q·rope(μ, p) + Σ_parts (‖r‖/√dp) q'·c[codes]
    ext = code_kernels(kernels, q.device)
    scores = _mean_scores(q, frame, pos)
    qs = q / frame.scale.float()
    for idx, part, codes, norm in _parts(kq, pk):
        qp = qs if idx is None else qs[..., idx.to(q.device)]
        qp = qp @ part.rotation.to(q.device).T  # the rotated query, once per step
        scores = scores + part_scores(ext, part, codes, qp, decode_norm(norm).squeeze(-1) / math.sqrt(part.dim))
    segs = [scores]
    if layer._sk is not None:
        segs.insert(0, q @ layer._sk.float().transpose(-1, -2))
    if n_fp_tail:
        segs.append(q @ layer.keys.float().transpose(-1, -2))
    logits = torch.cat(segs, dim=-1) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    p = logits.softmax(-1)
    n_s = 0 if layer._sk is None else layer._sk.shape[-2]
    n_p = pk.shape[-2]
    p_sink, p_codes, p_tail = p[..., :n_s], p[..., n_s:n_s + n_p], p[..., n_s + n_p:]
    out = torch.zeros(b, h, g * nq, d, dtype=torch.float32, device=q.device)
    for idx, part, codes, norm in _parts(vq, pv):
        w = p_codes * (decode_norm(norm).squeeze(-1)[:, :, None, :] / math.sqrt(part.dim))
        acc = part_value_sums(ext, part, codes, w) @ part.rotation.to(q.device)  # rotated back once per step
        if idx is None:
            out = out + acc
        else:
            out[..., idx.to(q.device)] += acc
    if layer._mv is not None:
        out = out + p_codes.sum(-1, keepdim=True) * layer._mv.float()
    if n_s:
        out = out + p_sink @ layer._sv.float()
    if n_fp_tail:
        out = out + p_tail @ layer.values.float()
    return out.reshape(b, hq, nq, d).to(query.dtype)


def _mean_scores(q: torch.Tensor, frame, pos: torch.Tensor) -> torch.Tensor:
    """``q·rope(μ, p)`` for every packed position ``[b, h, gq, n]`` from the cos / sin table, per RoPE plane."""
    mu = frame.mean.float()  # [b, h, 1, d]
    if frame.inv_freq is None:
        return (q @ mu.transpose(-1, -2)).expand(*q.shape[:-1], pos.numel())
    half = frame.inv_freq.numel()
    if frame.table is not None:
        cos, sin = frame.table.cos_sin(pos)
    else:
        ang = pos.float()[:, None] * frame.inv_freq.to(pos.device)[None, :]
        cos, sin = ang.cos(), ang.sin()
    q1, q2, m1, m2 = q[..., :half], q[..., half:2 * half], mu[..., :half], mu[..., half:2 * half]
    a = q1 * m1 + q2 * m2  # rope(μ)_1 = μ1 cos - μ2 sin, rope(μ)_2 = μ2 cos + μ1 sin
    c = q2 * m1 - q1 * m2
    out = a @ cos.T.to(q.device) + c @ sin.T.to(q.device)
    if mu.shape[-1] > 2 * half:  # partial rotary: the unrotated channels
        out = out + q[..., 2 * half:] @ mu[..., 2 * half:].transpose(-1, -2)
    return out


def attend_dequantized(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """What the layer would have returned without scoring: sinks ++ dequantized codes ++ tail (in view)."""
    keys, values = layer._read()
    visible = getattr(layer, "_visible", None)
    if visible is not None:
        keys, values = keys[..., -visible:, :], values[..., -visible:, :]
    return keys, values


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def code_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """A transformers attention function: decode steps of a scoring layer go to :func:`attend_codes`,
    everything else (prefill, other caches) to SDPA."""
    layer = getattr(key, "_lowbit_layer", None)
    if layer is None:
        return _sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, softcap=softcap,
                     **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = attend_codes(layer, query, scaling, softcap)
    return out.transpose(1, 2).contiguous(), None


def reference_attention(module, query, key, value, attention_mask, **kwargs):
    """:func:`code_attention`'s reference: a scoring layer's cache dequantized whole, then SDPA."""
    layer = getattr(key, "_lowbit_layer", None)
    if layer is not None:
        key, value = attend_dequantized(layer)
        attention_mask = None  # one decode query, every held token in view
    return _sdpa(module, query, key, value, attention_mask, **kwargs)


def enable_code_scoring(model, reference: bool = False) -> None:
    """Register :func:`code_attention` with transformers and make ``model`` use it (SDPA for the rest);
    ``reference=True``: dequantize-then-attend instead (same caches, for comparison)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, code_attention)
    AttentionInterface.register(REFERENCE_NAME, reference_attention)
    model.set_attn_implementation(REFERENCE_NAME if reference else ATTENTION_NAME)
