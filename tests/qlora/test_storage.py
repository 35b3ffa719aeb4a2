"""QLoRA storage: bit-exact with bitsandbytes' quantize_4bit on CPU; 4.127 bits/param; Linear4bit."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lowbit.errors import LowbitError
from lowbit.qlora.linear4bit import Linear4bit
from lowbit.qlora.storage import quantize_4bit

F = pytest.importorskip("bitsandbytes.functional")


def _bnb_bytes(p):
    flat = p.codes.reshape(-1)
    return (flat[::2] << 4) | flat[1::2]


@given(rows=st.integers(1, 6), cols=st.integers(1, 5), exp=st.integers(-4, 2), seed=st.integers(0, 2**16),
       quant_type=st.sampled_from(["nf4", "fp4"]), dq=st.booleans(), bf16=st.booleans())
def test_bit_exact_with_bitsandbytes(rows, cols, exp, seed, quant_type, dq, bf16):
    torch.manual_seed(seed)
    w = torch.randn(rows * 64, cols * 64) * 10.0**exp
    w = w.bfloat16() if bf16 else w
    w[0, :5] = 0.0  # exact zeros and a tie-free edge
    q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type=quant_type)
    p = quantize_4bit(w, quant_type, dq)
    assert torch.equal(_bnb_bytes(p), q.reshape(-1))
    assert torch.equal(p.absmax, state.absmax)
    if dq:
        assert torch.equal(p.nested_absmax, state.state2.absmax)
        assert torch.equal(p.nested_code, state.state2.code)
        assert p.offset == float(state.offset)
    assert torch.equal(p.dequantize(w.dtype), F.dequantize_4bit(q, state))


def test_bits_per_param_is_4_127():
    w = torch.randn(1536, 576)
    assert round(quantize_4bit(w).bits_per_param(), 3) == 4.127
    assert round(Linear4bit.from_linear(nn.Linear(576, 1536)).bits_per_param(), 3) == 4.127
    assert quantize_4bit(w, double_quant=False).bits_per_param() == pytest.approx(4.5)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_forward_backward_match_dequantized_weight(quant_type):
    torch.manual_seed(0)
    lin = nn.Linear(256, 192)
    m = Linear4bit.from_linear(lin, quant_type)
    ref = m.packed().dequantize()
    assert torch.equal(m.packed().codes, quantize_4bit(lin.weight.detach(), quant_type).codes)
    # the kernels dequantize to bf16 (rounded once); the pure-torch path (CPUs without them) is exact
    assert torch.equal(m.dense(torch.float32), ref.to(torch.bfloat16).float() if m.use_kernels else ref)
    x = torch.randn(2, 24, 256, requires_grad=True)
    y = m(x)
    want = x.detach() @ ref.t() + lin.bias.detach()
    assert (y.float() - want).abs().max() / want.abs().max() < 1e-2  # bf16 compute
    y.float().pow(2).sum().backward()
    gx = (2 * y.detach().float()) @ ref
    assert (x.grad - gx).abs().max() / gx.abs().max() < 1e-2
    assert all(not b.requires_grad for b in m.buffers())
    with torch.no_grad():  # the GEMV path (few rows) agrees with the GEMM path
        small = m(x[0, :3])
    assert (small.float() - y[0, :3].float()).abs().max() / want.abs().max() < 1e-2


def test_linear4bit_refuses_partial_blocks():
    with pytest.raises(LowbitError, match="blocks of 64"):
        Linear4bit.from_linear(nn.Linear(96, 64))
