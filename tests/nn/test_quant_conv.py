"""QuantConv2d: the patch matmul over packed codes equals conv2d with the dequantized weight
(within bf16 rounding of the activations), for any stride / padding / dilation."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit import QuantSpec
from lowbit.core import quantize
from lowbit.errors import LowbitError
from lowbit.nn.quant_conv import QuantConv2d, conv_weight_2d

SPECS = [QuantSpec(4, "int", True, "channel"), QuantSpec(8, "int", True, "channel"),
         QuantSpec(3, "int", True, "channel"), QuantSpec(4, "int", False, "group", 32)]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@settings(max_examples=30)
@given(cin=st.sampled_from([1, 3, 8, 32]), cout=st.sampled_from([4, 16]), k=st.sampled_from([1, 3, (3, 5)]),
       stride=st.sampled_from([1, 2, (1, 2)]), padding=st.sampled_from([0, 1, (2, 1)]), dilation=st.sampled_from([1, 2]),
       bias=st.booleans(), spec_i=st.integers(0, len(SPECS) - 1), seed=st.integers(0, 1000))
def test_quant_conv_equals_dequantized_conv(cin, cout, k, stride, padding, dilation, bias, spec_i, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=bias)
    spec = SPECS[spec_i]
    w2 = conv_weight_2d(conv)
    if spec.granularity == "group" and w2.shape[1] % spec.group_size:
        spec = QuantSpec(4, "int", False, "channel")
    qw = quantize(w2.float(), spec)
    q = QuantConv2d.from_quantized(qw, conv)
    x = torch.randn(2, cin, 11, 9)
    wd = qw.dequantize().reshape(conv.weight.shape)
    with torch.no_grad():
        ref = F.conv2d(x, wd, conv.bias, conv.stride, conv.padding, conv.dilation)
        y = q(x)
    assert y.shape == ref.shape
    assert _rel(y, ref) < 8e-3  # bf16 activations x exact weights, fp32 accumulation
    assert torch.equal(q.dense_weight(torch.float32), wd)


def test_quant_conv_uses_packed_codes():
    conv = nn.Conv2d(32, 64, 3, padding=1)
    qw = quantize(conv_weight_2d(conv).float(), QuantSpec(4, "int", True, "group", 32))
    q = QuantConv2d.from_quantized(qw, conv)
    assert q.inner.kernel in ("cpu", "torch")
    assert q.nbytes() < conv.weight.numel() * 4 / 6  # 4-bit codes + fp16 scales, not float weights


def test_quant_conv_rejects_grouped_and_bad_input():
    conv = nn.Conv2d(8, 8, 3, groups=2)
    with pytest.raises(LowbitError, match="groups=1"):
        QuantConv2d.from_quantized(quantize(conv.weight.reshape(8, -1).detach(), SPECS[0]), conv)
    ok = nn.Conv2d(3, 4, 3)
    q = QuantConv2d.from_quantized(quantize(conv_weight_2d(ok).float(), SPECS[0]), ok)
    with pytest.raises(LowbitError, match=r"\[batch, 3, H, W\]"):
        q(torch.randn(1, 5, 8, 8))
