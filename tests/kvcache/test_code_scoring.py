"""Decode attention scored against the TurboQuant codes equals dequantize-then-attend (fp rounding)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.kv import QuantizedKVCache
from lowbit.kvcache.code_scoring import _mean_scores, enable_code_scoring
from lowbit.kvcache.key_frame import RopeTable, fit_key_frame, rope


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=500, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def _gemma():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=64, vocab_size=500, sliding_window=24,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           max_position_embeddings=512)
    return Gemma3ForCausalLM(cfg).eval()


@torch.no_grad()
def _decode(model, cache, prompt_len=40, steps=12):
    ids = torch.randint(3, 500, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    out = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
    res = [out]
    for _ in range(steps):
        out = model(out.argmax(-1, keepdim=True), past_key_values=cache, use_cache=True).logits[:, -1]
        res.append(out)
    return torch.stack(res)


@pytest.mark.parametrize("make", [_llama, _gemma], ids=["llama", "gemma3-sliding"])
@pytest.mark.parametrize("bits", [3, 3.5])
def test_code_scoring_equals_dequantize_then_attend(make, bits):
    model = make()
    try:
        enable_code_scoring(model, reference=True)
        ref = _decode(model, QuantizedKVCache("turboquant", bits, model.config, score_codes=True))
        enable_code_scoring(model)
        got = _decode(model, QuantizedKVCache("turboquant", bits, model.config, score_codes=True))
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.allclose(got, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    # and the quantization is real: the full-precision cache decodes different logits
    fp = _decode(model, None)
    assert (fp - ref).abs().max() > 1e-3


def test_code_scoring_cache_stores_pair_split_and_fewer_bits():
    model = _llama()
    cache = QuantizedKVCache("turboquant", 3.5, model.config, score_codes=True, norm_bits=8)
    _decode(model, cache, steps=0)
    layer = cache.layers[0]
    hi = set(layer.key_quantizer._split.hi_idx.tolist())
    assert all((i + 16) % 32 in hi for i in hi if i < 32)  # RoPE pairs (i, i + 16 of 32 planes) stay together
    assert cache.memory_report()["kv_bits_per_coordinate"] < 5.0  # 3.5 + 2 8-bit norms / 32 + frame and sink of 40 tokens
    with pytest.raises(LowbitError, match="score_codes"):
        QuantizedKVCache("kivi", 4, model.config, score_codes=True)


@given(seed=st.integers(0, 1000), n=st.integers(1, 40), start=st.integers(0, 5000))
def test_mean_scores_and_post_rope_frame(seed, n, start):
    g = torch.Generator().manual_seed(seed)
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    k = torch.randn(1, 2, n, 16, generator=g) * 3
    pos = torch.arange(start, start + n)
    frame = fit_key_frame(k, pos, inv, power=0.25, post_rope=True, table=RopeTable(inv))
    back = frame.from_frame(frame.to_frame(k, pos), pos)
    assert torch.allclose(back, k, atol=1e-4 * k.abs().max().item())
    q = torch.randn(1, 2, 3, 16, generator=g)
    mu_at = rope(frame.mean.float().expand(1, 2, n, 16), pos, inv)
    want = q @ mu_at.transpose(-1, -2)
    assert torch.allclose(_mean_scores(q, frame, pos), want, atol=1e-4 * (1 + want.abs().max().item()))
