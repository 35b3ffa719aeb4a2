"""Peers of bench/kv_bench.py: transformers' own QuantizedCache (quanto / HQQ backends), run the way it runs.

transformers' ``QuantizedLayer`` returns the full-precision states on the call that first fills it (the
prefill), so a one-pass perplexity would measure nothing of it.  It is therefore evaluated token by token
(teacher forcing: every position decoded with the cache as in ``generate``).  It keeps up to
``residual_length`` newest tokens in full precision and re-quantizes the whole cache (dequantized old part
included) when that buffer fills; ``residual_length=1`` (re-quantize every step, nothing in full precision)
compounds the re-quantization error (HQQ 4-bit: +699% perplexity on 64 tokens vs -0.2% at 16), so the
peers run with a residual buffer and pay for it: their bits/coordinate are ``nbits`` plus a scale and a
zero per ``q_group_size`` values counted as fp16 (on CPU the backends keep them in the model dtype, fp32:
this favours the peers), with the residual tokens at 16 bits, averaged over the decode steps.

Gemma 3 has sliding-window layers, which ``QuantizedCache`` refuses; there the same backend layers are put
in a plain ``Cache`` for every layer (a sliding layer then keeps all its tokens, the sliding mask still
applies): the quantization is the backend's, only the memory of the sliding layers is not trimmed.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from transformers.cache_utils import Cache, DynamicCache, QuantizedCache

from lowbit.eval.quality import logprob_stats

PEERS = {"quanto": "optimum.quanto", "hqq": "hqq"}


def available(backend: str) -> bool:
    try:
        return importlib.util.find_spec(PEERS[backend]) is not None
    except ModuleNotFoundError:
        return False


def peer_bits(nbits: int, group: int) -> float:
    """Stored bits/coordinate: codes plus an fp16 scale and zero per group."""
    return nbits + 2 * 16 / group


def peer_factory(backend: str, nbits: int, config, group: int = 64, residual_length: int = 32):
    text = config.get_text_config(decoder=True)
    kw = dict(nbits=nbits, q_group_size=group, residual_length=residual_length)
    if all(t == "full_attention" for t in getattr(text, "layer_types", None) or ["full_attention"]):
        return lambda: QuantizedCache(backend, config, **kw)
    from transformers.cache_utils import HQQQuantizedLayer, QuantoQuantizedLayer

    layer = {"quanto": QuantoQuantizedLayer, "hqq": HQQQuantizedLayer}[backend]
    return lambda: Cache(layers=[layer(**kw) for _ in range(text.num_hidden_layers)])


@torch.no_grad()
def stepwise_eval(model, windows: torch.Tensor, factories: dict, progress=None) -> dict[str, dict]:
    """Perplexity / KL / top-1 like ``lowbit.kv.kv_eval``, but each position is one decode step of the cache."""
    acc = {k: {"nll": 0.0, "kl": 0.0, "top1": 0} for k in factories}
    bits = {k: [] for k in factories}
    nll_ref = n_tok = 0
    for w in windows:
        ids = w[None]
        labels = ids[0, 1:]
        ref = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True).logits[0, :-1]
        ref = ref.float().log_softmax(-1)
        nll_ref += -ref.gather(-1, labels[:, None]).sum().item()
        n_tok += labels.numel()
        for name, make in factories.items():
            cache = make()
            out = []
            for t in range(ids.shape[1] - 1):
                out.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1].float())
                bits[name].append(_stored_bits(cache))
            lq = torch.stack(out).log_softmax(-1)
            s = logprob_stats(ref, lq, labels)
            for key in acc[name]:
                acc[name][key] += s[key]
            if progress is not None:
                progress.update(1)
    ppl_ref = math.exp(nll_ref / n_tok)
    return {name: {"perplexity": math.exp(a["nll"] / n_tok), "perplexity_fp": ppl_ref,
                   "perplexity_change_pct": 100.0 * (math.exp(a["nll"] / n_tok) / ppl_ref - 1.0),
                   "kl": a["kl"] / n_tok, "top1_agreement": a["top1"] / n_tok, "tokens": n_tok,
                   "kv_bits_per_coordinate": sum(bits[name]) / len(bits[name]),
                   "kv_memory_ratio": 16 * len(bits[name]) / sum(bits[name])}
            for name, a in acc.items()}


def _stored_bits(cache) -> float:
    """Bits/coordinate now: quantized tokens at nbits + fp16 scale/zero per group, residual tokens at 16."""
    if hasattr(cache, "memory_report"):  # lowbit's cache counts its own bytes
        return cache.memory_report()["kv_bits_per_coordinate"]
    num = den = 0.0
    for layer in cache.layers:
        n = layer.cumulative_length
        r = layer.keys.shape[-2] if layer.keys is not None and layer.keys.dim() == 4 else 0
        num += (n - r) * peer_bits(layer.nbits, layer.q_group_size) + 16 * r
        den += n
    return num / den
