import pytest
import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

from lowbit.kv import METHODS, QuantizedKVCache

transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def ids(n, seed=0, batch=1):
    return torch.randint(0, 96, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_high_bits_match_full_precision(tiny):
    x = ids(48)
    ref = tiny(x, past_key_values=DynamicCache(config=tiny.config)).logits
    for method in METHODS:
        got = tiny(x, past_key_values=QuantizedKVCache(method, 8, tiny.config)).logits
        # QJL keys are an unbiased sketch, not a reconstruction: looser
        tol = 0.3 if method == "qjl" else 0.02
        assert (got - ref).abs().max().item() < tol * ref.abs().max().item(), method


@torch.no_grad()
def test_error_falls_with_bits(tiny):
    x = ids(64, 1)
    ref = tiny(x, past_key_values=DynamicCache(config=tiny.config)).logits
    errs = [(tiny(x, past_key_values=QuantizedKVCache("turboquant", b, tiny.config)).logits - ref).pow(2).mean()
            for b in (2, 3, 4)]
    assert errs[0] > errs[1] > errs[2]


@torch.no_grad()
@pytest.mark.parametrize("method", sorted(METHODS))
def test_generate_streams_decoded_tokens(tiny, method):
    x = ids(12, 2, batch=2)
    cache = QuantizedKVCache(method, 3, tiny.config, window=4)
    out = tiny.generate(x, attention_mask=torch.ones_like(x), past_key_values=cache, max_new_tokens=40,
                        min_new_tokens=40, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 52)
    assert cache.get_seq_length() == 51  # the last token is never fed back
    layer = cache.layers[0]
    # one attention-sink token stays in full precision (none for KIVI, whose keys move in groups of 32
    # tokens); the others keep exactly the window in full precision
    assert layer.sink == (0 if method == "kivi" else 1)
    assert layer.keys.shape[-2] == (4 if method not in ("kivi",) else 51 - 32)
    assert layer.sink + layer.quantized_length + layer.keys.shape[-2] == 51
    mem = cache.memory_report()
    assert (1.5 if method == "kivi" else 2) < mem["kv_memory_ratio"] < 16 / 3


@torch.no_grad()
def test_generate_close_to_full_precision_at_8_bits(tiny):
    x = ids(16, 3)
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False, pad_token_id=0)
    ref = tiny.generate(x, **kw)
    got = tiny.generate(x, past_key_values=QuantizedKVCache("turboquant", 8, tiny.config), **kw)
    assert (ref == got).float().mean() > 0.9


@torch.no_grad()
def test_window_covering_everything_is_exact(tiny):
    x = ids(30, 4)
    ref = tiny(x, past_key_values=DynamicCache(config=tiny.config)).logits
    got = tiny(x, past_key_values=QuantizedKVCache("turboquant", 2, tiny.config, window=64)).logits
    assert torch.allclose(ref, got, atol=1e-5)


def test_keep_first_last_layers_and_memory(tiny):
    cache = QuantizedKVCache("turboquant", 4, tiny.config, keep_first=1, keep_last=1)
    assert type(cache.layers[0]) is DynamicLayer and type(cache.layers[2]) is DynamicLayer
    assert cache.quantized_layers == [1]
    with torch.no_grad():
        tiny(ids(64), past_key_values=cache)
    # one quantized layer at 4 + 16/32 bits (+ the fp16 means), two fp16 layers
    assert cache.memory_report()["kv_bits_per_coordinate"] == pytest.approx((16 + 16 + 4.5) / 3, rel=0.02)


def test_beam_search_runs(tiny):
    x = ids(10, 5)
    out = tiny.generate(x, attention_mask=torch.ones_like(x), num_beams=2, max_new_tokens=8, min_new_tokens=8,
                        do_sample=False,
                        past_key_values=QuantizedKVCache("turboquant", 4, tiny.config), pad_token_id=0)
    assert out.shape[1] == 18


def test_fractional_bits_pick_outlier_channels_per_layer(tiny):
    cache = QuantizedKVCache("turboquant", 2.5, tiny.config)
    with torch.no_grad():
        tiny(ids(40), past_key_values=cache)
    q = cache.layers[0].key_quantizer
    assert len(q._split.hi_idx) == 16


def _tiny_gemma3_generate():
    """A 2-layer Gemma3 (one sliding, one full layer), a prompt batch and greedy generate() arguments."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256)
    model = Gemma3ForCausalLM(cfg).eval()
    x = ids(20, 6)
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    return cfg, model, x, kw


def test_gemma3_sliding_layers():
    cfg, model, x, kw = _tiny_gemma3_generate()
    cache = QuantizedKVCache("turboquant", 8, cfg)
    got = model.generate(x, past_key_values=cache, **kw)
    assert cache.layers[0].is_sliding and cache.quantized_layers == [0, 1]
    assert cache.layers[0].quantized_length < 20  # old tokens out of the sliding window are dropped
    assert cache.layers[1].quantized_length == 35 - 1  # the first token is a full-precision sink
    # teacher-forced full-precision logits of the generated text match the quantized decode's scores
    with torch.no_grad():
        ref = model(got.sequences).logits[0, 19:-1]
    scores = torch.cat(got.scores)
    assert (scores - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_unsupported_models_say_so():
    from transformers import T5Config

    with pytest.raises(ValueError, match="encoder-decoder"):
        QuantizedKVCache("turboquant", 3, T5Config())
    cfg = LlamaConfig(num_hidden_layers=2)
    cfg.layer_types = ["linear_attention", "full_attention"]
    with pytest.raises(ValueError, match="linear_attention"):
        QuantizedKVCache("turboquant", 3, cfg)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="nope"), "method"),
    (dict(bits=0), "bits"),
    (dict(window=-1), "window"),
    (dict(keep_last=1, config=None), "keep_last"),
    (dict(key_scale_power=0.9), "key_scale_power"),
    (dict(key_scale_power=True), "key_scale_power"),
    (dict(sink=-1), "sink"),
])
def test_bad_arguments_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizedKVCache(**{"method": "turboquant", "bits": 3, **kwargs})


def test_sinks_and_window_stay_exact_middle_is_quantized():
    cache = QuantizedKVCache("turboquant", 3, None, window=5, sink=2)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 20, 32, generator=g), torch.randn(1, 2, 20, 32, generator=g)
    k1, v1 = cache.update(k[..., :12, :], v[..., :12, :], 0)
    k2, v2 = cache.update(k[..., 12:, :], v[..., 12:, :], 0)
    assert k2.shape == k.shape and cache.get_seq_length() == 20
    assert torch.equal(k2[..., :2, :], k[..., :2, :]) and torch.equal(v2[..., -5:, :], v[..., -5:, :])
    mid = (k2[..., 2:15, :] - k[..., 2:15, :]).pow(2).sum() / k[..., 2:15, :].pow(2).sum()
    assert 0.005 < mid.item() < 0.1
    layer = cache.layers[0]
    assert layer.quantized_length == 13
    cache.crop(-7)  # through the window into the quantized part
    assert cache.get_seq_length() == 13 and layer.quantized_length == 11


@torch.no_grad()
@pytest.mark.parametrize("method", ["turboquant", "kivi"])
def test_decode_buffer_reads_what_the_packed_cache_reads(tiny, method):
    x = ids(10, 7, batch=2)
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=45, min_new_tokens=45, do_sample=False,
              pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    plain_cache = QuantizedKVCache(method, 3, tiny.config, window=3)
    plain = tiny.generate(x, past_key_values=plain_cache, **kw)
    buf_cache = QuantizedKVCache(method, 3, tiny.config, window=3, decode_buffer=True)
    buf = tiny.generate(x, past_key_values=buf_cache, **kw)
    assert torch.equal(plain.sequences, buf.sequences)
    assert torch.allclose(torch.cat(plain.scores), torch.cat(buf.scores), atol=1e-4)  # -inf = suppressed
    mem = buf_cache.memory_report()
    assert mem["decode_buffer_bytes"] >= 2 * 3 * 2 * 2 * 54 * 32 * 4  # K+V, 3 layers, [2, 2, 54, 32] fp32
    assert mem["kv_bytes"] == plain_cache.memory_report()["kv_bytes"]  # the buffer is reported apart
    assert plain_cache.memory_report()["decode_buffer_bytes"] == 0
    buf_cache.crop(-5)
    assert buf_cache.layers[0]._bk.view().shape[-2] == buf_cache.get_seq_length() == 54 - 5


def test_decode_buffer_on_sliding_layers():
    cfg, model, x, kw = _tiny_gemma3_generate()
    a = model.generate(x, past_key_values=QuantizedKVCache("turboquant", 4, cfg), **kw)
    b = model.generate(x, past_key_values=QuantizedKVCache("turboquant", 4, cfg, decode_buffer=True), **kw)
    assert torch.allclose(torch.cat(a.scores), torch.cat(b.scores), atol=1e-4)


def test_greedy_agreement_over_a_batch_of_prompts(tiny):
    from lowbit.kv import greedy_agreement

    prompts = ids(8, 8, batch=3)
    exact = greedy_agreement(tiny, prompts, lambda: QuantizedKVCache("turboquant", 2, tiny.config, window=64),
                             n_tokens=10)
    assert exact["greedy_match"] == 1.0 and exact["greedy_prefix_per_prompt"] == [10, 10, 10]
    r = greedy_agreement(tiny, prompts, lambda: QuantizedKVCache("turboquant", 1, tiny.config, plain=True),
                         n_tokens=10, reference=exact["reference"])
    assert r["reference"].shape == (3, 10)
    assert r["greedy_match"] == pytest.approx(sum(r["greedy_match_per_prompt"]) / 3)
    assert r["greedy_prefix"] <= 10 * r["greedy_match"] + 1e-9


def test_frame_fitted_on_the_whole_tail_and_no_scales_from_few_tokens():
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(1, 2, 40, 32, generator=g) + 3.0, torch.randn(1, 2, 40, 32, generator=g)
    cache = QuantizedKVCache("turboquant", 4, None, window=8, derotate=False, sink=0)
    cache.update(k[..., :9, :], v[..., :9, :], 0)  # one token leaves the window: the frame sees all nine
    frame = cache.layers[0]._frame
    assert torch.allclose(frame.mean.float(), k[..., :9, :].mean(-2, keepdim=True), atol=1e-2)
    assert torch.equal(frame.scale, torch.ones_like(frame.scale))  # 9 < MIN_SCALE_TOKENS
    cache = QuantizedKVCache("turboquant", 4, None, window=8, derotate=False, sink=0)
    cache.update(k, v, 0)
    assert not torch.equal(cache.layers[0]._frame.scale, torch.ones_like(cache.layers[0]._frame.scale))


def test_key_basis_must_cover_every_layer(tiny):
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="key_basis.*per decoder layer"):
        QuantizedKVCache("turboquant", 3, tiny.config, key_basis=[torch.eye(32).expand(2, 32, 32)])
