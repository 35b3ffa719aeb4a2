"""Measure a quantized KV cache against the full-precision cache on the same model and text."""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache

from ..errors import LowbitError
from ..eval.quality import logprob_stats
from .cache import QuantizedKVCache

__all__ = ["kv_eval", "greedy_agreement", "cache_factory"]

logger = logging.getLogger(__name__)


def cache_factory(config, method: str, bits: float, **kwargs) -> Callable[[], QuantizedKVCache]:
    """A zero-argument builder of fresh caches (one per evaluated window); checks arguments now."""
    QuantizedKVCache(method, bits, config, **kwargs)
    return lambda: QuantizedKVCache(method, bits, config, **kwargs)


@torch.no_grad()
def kv_eval(model, windows: torch.Tensor, factories: dict[str, Callable], progress: bool = True,
            reference=None) -> dict[str, dict]:
    """Perplexity, KL(full ‖ quantized), top-1 agreement and cache size for each cache factory.

    ``windows`` is ``[n, seq_len]`` token ids; each window is one forward pass with a fresh cache, so
    every position attends to keys/values read back from the quantized cache.  The full-precision
    reference (``DynamicCache``) is computed once per window and shared by all factories; it runs
    ``reference`` (e.g. the full-precision original of a quantized ``model``) when given, else ``model``.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise LowbitError(f"windows must be [n, seq_len >= 2] token ids, got shape {tuple(windows.shape)}")
    device = next(model.parameters()).device
    acc = {name: {"nll": 0.0, "kl": 0.0, "top1": 0, "bytes": 0, "fp16": 0, "bits": 0.0} for name in factories}
    nll_ref, n_tok = 0.0, 0
    bar = tqdm(windows, desc="kv-eval windows", disable=not progress)
    for w in bar:
        ids = w[None].to(device)
        labels = ids[0, 1:]
        ref_model = model if reference is None else reference
        ref = ref_model(ids, past_key_values=DynamicCache(config=ref_model.config), use_cache=True).logits[0, :-1]
        ref = ref.float().log_softmax(-1)
        nll_ref += -ref.gather(-1, labels[:, None]).sum().item()
        n_tok += labels.numel()
        for name, make in factories.items():
            cache = make()
            lq = model(ids, past_key_values=cache, use_cache=True).logits[0, :-1].float().log_softmax(-1)
            stats = logprob_stats(ref, lq, labels)
            a = acc[name]
            for key in ("nll", "kl", "top1"):
                a[key] += stats[key]
            mem = cache.memory_report() if hasattr(cache, "memory_report") else {}
            a["bytes"] += mem.get("kv_bytes", 0)
            a["fp16"] += mem.get("fp16_bytes", 0)
            del lq, cache
    ppl_ref = math.exp(nll_ref / n_tok)
    out = {}
    for name, a in acc.items():
        ppl = math.exp(a["nll"] / n_tok)
        out[name] = {
            "perplexity": ppl,
            "perplexity_fp": ppl_ref,
            "perplexity_change_pct": 100.0 * (ppl / ppl_ref - 1.0),
            "kl": a["kl"] / n_tok,
            "top1_agreement": a["top1"] / n_tok,
            "kv_bits_per_coordinate": 16.0 * a["bytes"] / a["fp16"] if a["fp16"] else float("nan"),
            "kv_memory_ratio": a["fp16"] / a["bytes"] if a["bytes"] else float("nan"),
            "tokens": n_tok,
        }
    return out


@torch.no_grad()
def greedy_agreement(model, prompts: torch.Tensor, make_cache: Callable, n_tokens: int = 128,
                     reference: torch.Tensor | None = None) -> dict:
    """Greedy-decode ``n_tokens`` with the quantized cache and compare with the full-precision decode.

    ``prompts`` is ``[n, L]`` (equal-length prompts, decoded as one batch) or ``[L]``.  Returns the
    position-wise match fraction over all prompts, the mean number of tokens before the first
    divergence, both per prompt, and the reference continuations ``[n, n_tokens]`` (pass them back in
    to avoid recomputing them).
    """
    device = next(model.parameters()).device
    ids = prompts.reshape(-1, prompts.shape[-1]).to(device)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False, attention_mask=mask,
              pad_token_id=getattr(model.generation_config, "eos_token_id", None) or 0)
    if reference is None:
        reference = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kw)[:, ids.shape[1]:]
    reference = reference.reshape(ids.shape[0], -1)
    got = model.generate(ids, past_key_values=make_cache(), **kw)[:, ids.shape[1]:]
    n = min(got.shape[1], reference.shape[1])
    same = (got[:, :n] == reference[:, :n].to(got.device)).cpu()
    prefix = [int(n if bool(row.all()) else int((~row).nonzero()[0])) for row in same]
    return {
        "greedy_match": float(same.float().mean()),
        "greedy_prefix": sum(prefix) / len(prefix),
        "greedy_match_per_prompt": same.float().mean(1).tolist(),
        "greedy_prefix_per_prompt": prefix,
        "reference": reference if prompts.dim() > 1 else reference[0],
    }
