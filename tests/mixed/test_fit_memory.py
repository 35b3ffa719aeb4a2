"""`lowbit fit`'s memory model against what a tiny Llama really holds: the KV cache's memory_report
and a DynamicCache's tensors after prefill + decode, the quantized model's bytes (lowbit eval's
memory figure) after applying a plan; and --memory parsing."""

import dataclasses

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.mixed.kv_options import KVOption, kv_options
from lowbit.mixed.memory import ModelShape, kv_bytes, parse_memory


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def _fill(model, cache, prefill: int, decode: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (1, prefill + decode), generator=g)
    with torch.no_grad():
        model(ids[:, :prefill], past_key_values=cache, use_cache=True)
        for i in range(prefill, prefill + decode):
            model(ids[:, i:i + 1], past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("option", [KVOption("turboquant", 3.0), KVOption("turboquant", 2.5), KVOption("kivi", 2.0),
                                    KVOption("kivi", 3.5), KVOption("polarquant", 4.0), KVOption("qjl", 3.0)],
                         ids=lambda o: o.name)
@pytest.mark.parametrize("prefill,decode", [(1, 0), (20, 0), (77, 5), (150, 13)])
def test_kv_bytes_equal_memory_report(tiny_llama, option, prefill, decode):
    shape = ModelShape.from_config(tiny_llama.config)
    cache = option.make_cache(tiny_llama.config)
    _fill(tiny_llama, cache, prefill, decode)
    layout = option.layout(tiny_llama.config, shape)
    assert kv_bytes(shape, layout, prefill + decode) == cache.memory_report()["kv_bytes"]


@pytest.mark.parametrize("window,keep_last", [(8, 0), (40, 1)])
def test_kv_bytes_with_window_and_kept_layers(tiny_llama, window, keep_last):
    from lowbit.kvcache.cache import QuantizedKVCache

    shape = ModelShape.from_config(tiny_llama.config)
    for method, bits in (("turboquant", 3.5), ("kivi", 2.0)):
        cache = QuantizedKVCache(method, bits, tiny_llama.config, window=window, keep_last=keep_last)
        _fill(tiny_llama, cache, 100, 7)
        layout = dataclasses.replace(KVOption(method, bits).layout(tiny_llama.config, shape), window=window,
                                     quantized_layers=2 - keep_last)
        assert kv_bytes(shape, layout, 107) == cache.memory_report()["kv_bytes"]


def test_fp_cache_bytes_are_the_dynamic_cache_tensors(tiny_llama):
    shape = ModelShape.from_config(tiny_llama.config, dtype_bytes=4)
    opt = KVOption(None)
    cache = opt.make_cache(tiny_llama.config)
    _fill(tiny_llama, cache, 60, 4)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_bytes(shape, opt.layout(tiny_llama.config, shape), 64) == held


def test_quantized_model_bytes_equal_the_prediction(tiny_dir):
    """fixed bytes (embeddings, norms, rotary tables) + each planned layer's measured bits / 8 ==
    the bytes the quantized model holds (what `lowbit eval` reports as memory)."""
    from lowbit.eval.size import memory_bytes
    from lowbit.methods import get_method
    from lowbit.mixed.allocate import allocate, measurement_layers
    from lowbit.mixed.apply import plan_recipe
    from lowbit.mixed.fit_run import fixed_weight_bytes
    from lowbit.mixed.measure import measure
    from lowbit.mixed.options import candidate_options
    from lowbit.models import load_model
    from lowbit.pipeline import quantize_model

    model, _ = load_model(tiny_dir)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 49152, (4, 64), generator=g)
    sens = torch.randint(0, 49152, (2, 32), generator=g)
    meas = measure(model, calib, sens, options=candidate_options(bits=(2, 3, 4, 8), groups=(32, 0)), path=None,
                   progress=False)
    fixed = fixed_weight_bytes(model, list(meas.layers))
    plan = allocate(measurement_layers(meas), 3.3)
    assert len(set(plan.choices.values())) > 1
    quantize_model(model, plan_recipe(plan, meas), get_method("gptq"), calib, progress=False)
    assert memory_bytes(model) == fixed + plan.bits // 8


@pytest.mark.parametrize("text,expected", [("600MB", 600_000_000), ("600M", 600_000_000), ("600 mb", 600_000_000),
                                           ("1.5GiB", 1_610_612_736), ("1.5Gi", 1_610_612_736),
                                           ("800MiB", 800 * 2**20), ("2G", 2 * 10**9), ("4096", 4096),
                                           ("0.5KB", 500)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "600XB", "-5MB", "0", "MB", "1.5.2GB", ""])
def test_parse_memory_rejects(text):
    with pytest.raises(LowbitError, match="--memory"):
        parse_memory(text)


def test_kv_options_grid():
    names = [o.name for o in kv_options(("turboquant", "kivi"), (2.5, 3.0))]
    assert names == ["fp", "turboquant-2.5", "turboquant-3", "kivi-2.5", "kivi-3"]
    with pytest.raises(LowbitError, match="unknown KV method"):
        kv_options(("turbo",), (3.0,))
