"""csrc/kv_scores.cpp (decode attention against TurboQuant codes) equals the pure-torch path to fp rounding."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.kvcache.base import decode_norm
from lowbit.kvcache.cache_layer import QuantizedKVLayer, QuantizedSlidingKVLayer
from lowbit.kvcache.code_scoring import attend_codes, attend_dequantized, code_kernels, part_scores, part_value_sums
from lowbit.kvcache.key_frame import RopeTable, rope
from lowbit.kvcache.methods import make_kv_quantizers
from lowbit.kvcache.turboquant import TurboQuantMSE

EXT = code_kernels(None, torch.device("cpu"))
needs_ext = pytest.mark.skipif(EXT is None, reason="lowbit._cpu (kv_code_scores) not built or CPU lacks AVX-512")


@needs_ext
@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), dp=st.sampled_from([2, 7, 16, 20, 48, 64, 100, 256]), g=st.integers(1, 9),
       n=st.integers(1, 300), cut=st.integers(0, 3), seed=st.integers(0, 1000))
def test_part_kernels_equal_torch(bits, dp, g, n, cut, seed):
    gen = torch.Generator().manual_seed(seed)
    part = TurboQuantMSE(dp, bits, seed)
    packed = part.quantize(torch.randn(2, 3, n + cut, dp, generator=gen))
    codes = packed.fields["codes"][..., cut:, :]  # a strided view, as a sliding layer's newest tokens
    scale = decode_norm(packed.fields["norm"][..., cut:, :]).squeeze(-1) / math.sqrt(dp)
    qp = torch.randn(2, 3, g, dp, generator=gen)
    want = part_scores(None, part, codes, qp, scale)
    got = part_scores(EXT, part, codes, qp, scale)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5 * (1 + want.abs().max().item()), rtol=0)
    w = torch.rand(2, 3, g, n, generator=gen)
    want = part_value_sums(None, part, codes, w)
    got = part_value_sums(EXT, part, codes, w)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5 * (1 + want.abs().max().item()), rtol=0)
    # and the sums are not trivially zero: the codes carry the vectors
    assert want.abs().max() > 0


def _layer(bits, n, kv_heads, d, window, sink, sliding=None, seed=0):
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(1, kv_heads, n, d, generator=gen)
    k[..., :3] = k[..., :3] * 6 + 4  # a few large channels, as real keys
    k = rope(k, torch.arange(n), inv)
    v = torch.randn(1, kv_heads, n, d, generator=gen)

    def make(kd, vd):
        return make_kv_quantizers("turboquant", kd, vd, bits, 0, norm_bits=8)

    kw = dict(window=window, inv_freq=inv, key_scale_power=0.25, score_codes=True, rope_table=RopeTable(inv))
    if sliding:
        layer = QuantizedSlidingKVLayer(make, sliding, **kw)
    else:
        layer = QuantizedKVLayer(make, sink=sink, **kw)
    layer.update(k[..., :-1, :], v[..., :-1, :])
    mk, _ = layer.update(k[..., -1:, :], v[..., -1:, :])  # one decode step: the layer now scores its codes
    assert getattr(mk, "_lowbit_layer", None) is layer
    return layer, k, v


@needs_ext
@pytest.mark.parametrize("bits", [2, 2.5, 3, 3.25, 3.5, 4])
@pytest.mark.parametrize("shape", [(3, 9, 64), (1, 4, 256), (2, 2, 64)], ids=["gqa3", "gqa4-d256", "mha"])
def test_attend_codes_kernels_equal_torch_and_reference(bits, shape):
    kv_heads, q_heads, d = shape
    layer, k, v = _layer(bits, 300, kv_heads, d, window=7, sink=1)
    assert layer.keys.shape[-2] == 7 and layer._sk.shape[-2] == 1  # a recent-token buffer and a sink
    q = torch.randn(1, q_heads, 1, d, generator=torch.Generator().manual_seed(5)) * 2
    scale = d ** -0.5
    fast = attend_codes(layer, q, scale, kernels=True)
    slow = attend_codes(layer, q, scale, kernels=False)
    assert torch.allclose(fast, slow, atol=1e-5 * slow.abs().max().item(), rtol=0)
    keys, values = attend_dequantized(layer)
    ref = F.scaled_dot_product_attention(q, keys.float(), values.float(), scale=scale, enable_gqa=True)
    assert torch.allclose(fast, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    # the quantization is real: the full-precision cache attends differently (by far more than the tolerance)
    fp = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    assert (fp - ref).abs().max() > 1e-2 * ref.abs().max()


@needs_ext
def test_attend_codes_kernels_sliding_layer():
    layer, _, _ = _layer(3.5, 200, 1, 64, window=0, sink=0, sliding=64)
    assert layer.quantized_length < 200  # tokens out of the window were forgotten
    q = torch.randn(1, 4, 1, 64, generator=torch.Generator().manual_seed(2))
    fast = attend_codes(layer, q, 0.125, softcap=20.0, kernels=True)
    slow = attend_codes(layer, q, 0.125, softcap=20.0, kernels=False)
    assert torch.allclose(fast, slow, atol=1e-5 * slow.abs().max().item(), rtol=0)


def test_kernels_false_needs_no_extension_and_true_reports_it(monkeypatch):
    assert code_kernels(False, torch.device("cpu")) is None
    monkeypatch.setenv("LOWBIT_KERNELS", "torch")
    assert code_kernels(None, torch.device("cpu")) is None
    with pytest.raises(LowbitError, match="_kv_scores"):
        code_kernels(True, torch.device("cpu"))
