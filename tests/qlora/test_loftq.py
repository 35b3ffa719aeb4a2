"""LoftQ init: the 4-bit base plus the adapters start closer to W than the base alone, and
alternating improves on one shot."""

import torch

from lowbit.qlora.loftq import loftq
from lowbit.qlora.lora import LoraLinear
from lowbit.qlora.storage import quantize_4bit


def test_loftq_reduces_the_residual():
    torch.manual_seed(0)
    w = torch.randn(256, 192) + 0.3 * torch.randn(256, 4) @ torch.randn(4, 192)  # a low-rank part
    plain = (w - quantize_4bit(w).dequantize()).norm()
    one = loftq(w, 8, iters=1)
    five = loftq(w, 8, iters=5)
    err1 = (w - one[0].dequantize() - one[1] @ one[2]).norm()
    err5 = (w - five[0].dequantize() - five[1] @ five[2]).norm()
    assert err1 < 0.95 * plain
    assert err5 <= err1 * 1.001


def test_set_product_matches_the_delta():
    torch.manual_seed(1)
    m = LoraLinear(torch.nn.Linear(64, 32), 64, 32, r=4, alpha=16)
    b, a = torch.randn(32, 4), torch.randn(4, 64)
    m.set_product(b, a)
    assert torch.allclose(m.delta_weight(), b @ a, atol=1e-5)
