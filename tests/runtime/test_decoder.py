"""lowbit.runtime.decoder: the same logits and greedy tokens as the Hugging Face forward of the same model,
with the fused projections holding no second copy of the weights."""

import copy

import pytest
import torch

from lowbit import QuantSpec
from lowbit.nn import QuantLinear, cpu_kernels
from lowbit.runtime.decoder import Decoder, supports


def _quantized(model, spec):
    from lowbit.methods import get_method
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    model = copy.deepcopy(model)
    quantize_model(model, Recipe(spec), get_method("rtn"), progress=False)
    return model


def _hf_logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0].float()


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def test_fp32_logits_equal_hf_at_every_position(tiny):
    ids = torch.randint(100, 40000, (24,), generator=torch.Generator().manual_seed(0))
    ref = _hf_logits(tiny, ids)
    dec = Decoder(copy.deepcopy(tiny), 32)
    got = [dec.forward(ids[:16], 0)]  # prefill, then one token at a time
    got += [dec.forward(ids[p:p + 1], p) for p in range(16, 24)]
    torch.testing.assert_close(torch.stack(got), ref[15:], atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_greedy_tokens_equal_hf_generate_on_smollm2(smol):
    model, tok = smol
    ids = tok("The Python interpreter reads", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, temperature=None,
                             top_p=None, top_k=None)[0, ids.shape[1]:].tolist()
    streamed = []
    out = Decoder(copy.deepcopy(model), 64).generate(ids, 24, on_token=streamed.append)
    assert out["tokens"] == ref == streamed


@pytest.mark.parametrize("spec", [QuantSpec(4, "int", True, "group", 64), QuantSpec(3, "int", False, "group", 64),
                                  QuantSpec(8, "int", True, "channel")], ids=["w4g64", "w3g64a", "w8"])
def test_quantized_decode_matches_hf_forward_of_the_same_model(tiny, spec):
    """Decode steps run the GEMV kernels (bf16 activations), the HF forward over many rows the bf16
    dequantize + GEMM path: they differ by bf16 rounding only (prefill on bf16 activations here too;
    the int8 prefill has its own test below)."""
    model = _quantized(tiny, spec)
    ids = torch.randint(100, 40000, (20,), generator=torch.Generator().manual_seed(1))
    ref = _hf_logits(model, ids)
    dec = Decoder(model, 32, int8_prefill=False)
    assert (dec.native is not None) == (cpu_kernels.load() is not None)  # decode steps in lowbit._cpu.Decoder
    got = torch.stack([dec.forward(ids[:12], 0)] + [dec.forward(ids[p:p + 1], p) for p in range(12, 20)]).float()
    err = (got - ref[11:]).abs().max() / ref.std()
    assert err < 0.02, float(err)


@pytest.mark.skipif(cpu_kernels.load() is None or not cpu_kernels.vnni(), reason="no VNNI kernels here")
def test_int8_prefill_runs_every_projection_on_int8_activations_close_to_bf16(tiny, monkeypatch):
    """Prefill multiplies every integer-code projection with int8 activations (blocks of 32); the last
    position's logits stay within activation rounding of the bf16 prefill and rank the same top token."""
    model = _quantized(tiny, QuantSpec(4, "int", True, "group", 64))
    ids = torch.randint(100, 40000, (24,), generator=torch.Generator().manual_seed(3))
    bf16 = Decoder(model, 32, int8_prefill=False).forward(ids, 0)
    calls = []
    real = QuantLinear.forward_int8_activations
    monkeypatch.setattr(QuantLinear, "forward_int8_activations", lambda m, x: calls.append(m) or real(m, x))
    int8 = Decoder(model, 32).forward(ids, 0)
    assert len(calls) == 4 * len(model.model.layers)  # fused qkv, o, fused gate/up, down
    assert (int8 - bf16).abs().max() / bf16.std() < 0.05
    assert int(int8.argmax()) == int(bf16.argmax())


@pytest.mark.skipif(cpu_kernels.load() is None, reason="lowbit._cpu not built for this CPU")
def test_native_step_equals_the_python_step(tiny, monkeypatch):
    """The C++ decode step (float16 cache) against the same step in torch ops over the same kernels."""
    model = _quantized(tiny, QuantSpec(4, "int", True, "group", 64))
    ids = torch.randint(100, 40000, (40,), generator=torch.Generator().manual_seed(2))
    native = Decoder(model, 48)
    monkeypatch.setattr(Decoder, "_native_ok", lambda self: False)
    python = Decoder(model, 48)
    assert native.native is not None and python.native is None
    a = [native.forward(ids[:8], 0)] + [native.forward(ids[p:p + 1], p) for p in range(8, 40)]
    b = [python.forward(ids[:8], 0)] + [python.forward(ids[p:p + 1], p) for p in range(8, 40)]
    a, b = torch.stack(a), torch.stack(b)
    assert (a - b).abs().max() / b.std() < 0.015  # float16 cache vs float32, then bf16 rounding of activations


def test_fused_projections_share_the_layers_storage(tiny):
    model = _quantized(tiny, QuantSpec(4, "int", True, "group", 64))
    attn = model.model.layers[0].self_attn
    before = attn.k_proj.qweight.clone()
    block = Decoder(model, 8).blocks[0]
    fused = block.qkv.qweight
    start, end = fused.data_ptr(), fused.data_ptr() + fused.numel() * fused.element_size()
    for m in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert start <= m.qweight.data_ptr() < end  # a view into the fused buffer, not a copy
    assert torch.equal(attn.k_proj.qweight, before)


def test_supports_only_plain_rope_gqa_decoders(tiny):
    assert supports(tiny)
    other = copy.deepcopy(tiny)
    other.config.model_type = "gemma3_text"
    assert not supports(other)
    assert not supports(torch.nn.Linear(2, 2))


def test_context_beyond_the_cache_is_refused(tiny):
    dec = Decoder(copy.deepcopy(tiny), 16)
    with pytest.raises(ValueError, match="exceeds"):
        dec.forward(torch.arange(17), 0)
