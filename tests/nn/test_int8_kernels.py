"""Int8Linear / Int8Conv2d against float references: error within the quantization steps involved,
bit-exact integer accumulation, SQNR floors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.core import int8
from lowbit.nn.int8_conv import Int8Conv2d
from lowbit.nn.int8_linear import Int8Linear
from lowbit.observers import minmax_range, range_qparams
from lowbit.spec import W8, ActSpec, LayerScheme, scheme

DYN = scheme("w8a8-dynamic")
STATIC = scheme("w8a8-static")


def sqnr(ref, got):
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))


@pytest.mark.parametrize("m,k,n", [(33, 70, 19), (1, 1, 5), (4, 1, 48), (2, 3, 1)])
def test_int_mm_is_exact(m, k, n):
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    assert torch.equal(int8.int_matmul(q, w.t()), (q.long() @ w.long().t()).int())


@pytest.mark.parametrize("slow", [True, False])
def test_int_mm_paths_are_exact_at_the_extremes(monkeypatch, slow):
    """Both the `_int_mm` path and the chunked float32 path (CPUs without VNNI) give the exact int32
    sums, also where every product is 127**2 and K is large (sums far beyond float32's 2**24)."""
    monkeypatch.setattr(int8, "fast_int8", lambda: not slow)
    g = torch.Generator().manual_seed(1)
    for m, k, n in ((17, 4096, 9), (5, 300, 33)):
        q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        q[0], w[0] = 127, -127
        ref = (q.long() @ w.long().t()).int()
        assert int(ref[0, 0]) == -(127**2) * k
        assert torch.equal(int8.int_matmul(q, w.t()), ref)


@given(st.integers(1, 40), st.integers(1, 96), st.integers(1, 48), st.integers(0, 2**31 - 1))
@settings(max_examples=30)
def test_dynamic_linear_equals_its_quantized_operands(m, k, n, seed):
    """y is exactly (q_x s_x) @ (q_w s_w)^T + b (float32 rounding only): the rescale is fused, not approximate."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n).requires_grad_(False)
    lin.weight.data = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g) * 3
    mod = Int8Linear.from_float(lin, DYN)
    lin.requires_grad_(False)
    qx, sx = int8.quantize_per_token(x)
    ref = (qx.float() * sx) @ (mod.weight_codes.float() * mod.weight_scale[:, None]).t() + lin.bias
    torch.testing.assert_close(mod(x), ref.detach(), rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # and within one step of each operand of the float result
    bound = (0.5 * sx * lin.weight.abs().sum(1)[None, :] + 0.5 * mod.weight_scale[None, :] * x.abs().sum(1, keepdim=True)
             + 0.25 * sx * mod.weight_scale[None, :] * k)
    assert bool(((mod(x) - lin(x)).abs() <= bound * (1 + 1e-4) + 1e-5).all())


@pytest.mark.parametrize("act", [ActSpec(granularity="tensor", dynamic=False),
                                 ActSpec(granularity="tensor", dynamic=False, symmetric=False),
                                 ActSpec(granularity="channel", dynamic=False),
                                 ActSpec(granularity="channel", dynamic=False, symmetric=False)])
def test_static_linear_matches_fake_quant_reference(act):
    g = torch.Generator().manual_seed(1)
    k, n = 96, 40
    lin = torch.nn.Linear(k, n).requires_grad_(False)
    x = torch.randn(64, k, generator=g) * torch.linspace(0.1, 4, k) + 0.5  # channels of different ranges
    s = LayerScheme(W8, act)
    qp = range_qparams(*minmax_range(x, act.granularity == "channel"), act)
    mod = Int8Linear.from_float(lin, s, qp)
    scale, zero = qp
    xq = (torch.clamp(torch.round(x / scale) + zero, act.qmin, act.qmax) - zero) * scale
    w_eff = mod.weight_codes.float() * mod.weight_scale[:, None]
    if act.granularity == "channel":
        w_eff = w_eff / scale[None, :]
    ref = xq @ w_eff.t() + lin.bias
    torch.testing.assert_close(mod(x), ref.detach(), rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert sqnr(lin(x).detach(), mod(x)) > 35


def test_sqnr_floor_dynamic_vs_static_per_tensor():
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(256, 128).requires_grad_(False)
    x = torch.randn(200, 256, generator=g)
    x[:20] *= 30  # a few loud tokens: per-token scales follow them, one per-tensor scale cannot
    ref = lin(x)
    dyn = Int8Linear.from_float(lin, DYN)(x)
    st_ = Int8Linear.from_float(lin, STATIC, range_qparams(*minmax_range(x), STATIC.input))(x)
    # measured 41.7 dB (per token) and 31.3 dB (per tensor)
    assert sqnr(ref, dyn) > 40
    assert 29 < sqnr(ref, st_) < sqnr(ref, dyn) - 5


def test_output_spec_rounds_onto_its_grid():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(10, 16)
    s = LayerScheme(W8, ActSpec(granularity="tensor", dynamic=False), ActSpec(granularity="tensor", dynamic=False))
    y = lin(x).detach()
    out_qp = range_qparams(*minmax_range(y.reshape(-1, 1)), s.output)
    mod = Int8Linear.from_float(lin, s, range_qparams(*minmax_range(x), s.input), out_qp)
    codes = mod(x) / out_qp[0]
    torch.testing.assert_close(codes, torch.round(codes), atol=1e-3, rtol=0)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (1, 1, 0), (3, 2, 0), (5, 1, 2)])
@pytest.mark.parametrize("name", ["w8a8-dynamic", "w8a8-static"])
def test_conv_matches_float(kernel, stride, padding, name):
    g = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(6, 12, kernel, stride, padding)
    x = torch.randn(3, 6, 11, 11, generator=g)
    s = scheme(name)
    qp = None if s.input.dynamic else range_qparams(*minmax_range(x.permute(0, 2, 3, 1).reshape(-1, 6)), s.input)
    mod = Int8Conv2d.from_float(conv, s, qp)
    ref = conv(x).detach()
    assert mod(x).shape == ref.shape
    assert sqnr(ref, mod(x)) > 35


def test_w4_codes_run_in_the_int8_kernel():
    from lowbit.core.quantize import quantize

    lin = torch.nn.Linear(64, 32)
    w4 = scheme("w4a8")
    qw = quantize(lin.weight.detach(), w4.weight)
    mod = Int8Linear.from_record(qw, lin.bias, w4)
    x = torch.randn(8, 64)
    ref = torch.nn.functional.linear(x, qw.dequantize(), lin.bias)
    qx, sx = int8.quantize_per_token(x)
    ref_q = (qx.float() * sx) @ qw.dequantize().t() + lin.bias
    torch.testing.assert_close(mod(x), ref_q.detach(), rtol=1e-5, atol=1e-5)
    assert sqnr(ref.detach(), mod(x)) > 35


def test_bad_shapes_name_the_module():
    from lowbit.errors import LowbitError

    mod = Int8Linear.from_float(torch.nn.Linear(8, 4), DYN, name="encoder.fc")
    with pytest.raises(LowbitError, match="encoder.fc.*9 features"):
        mod(torch.randn(2, 9))
    with pytest.raises(LowbitError, match="symmetric per-channel"):
        Int8Linear(8, 4, LayerScheme(scheme("w8a8-dynamic").weight.__class__(bits=4, granularity="group",
                                                                               group_size=4), DYN.input))


@pytest.mark.skipif(__import__("lowbit.nn.cpu_kernels", fromlist=["load"]).load() is None,
                    reason="lowbit._cpu not built for this CPU")
@pytest.mark.parametrize("name", ["dynamic", "static", "static-asym"])
@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (37, 100, 30), (256, 384, 1536), (5, 70, 19)])
def test_compiled_quantize_and_rescale_equal_the_torch_ops(monkeypatch, name, m, k, n):
    """lowbit._cpu's one-pass quantize / rescale give bit-identical outputs to core.int8's torch ops."""
    g = torch.Generator().manual_seed(m * 7 + n)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
    x = torch.randn(m, k, generator=g) * 3
    x[0, 0] = 40.0  # an outlier
    if name == "dynamic":
        mod = Int8Linear.from_float(lin, DYN)
    else:
        s = STATIC if name == "static" else LayerScheme(STATIC.weight, ActSpec(granularity="tensor", dynamic=False, symmetric=False))
        mod = Int8Linear.from_float(lin, s, range_qparams(*minmax_range(x), s.input))
    fused = mod(x)
    monkeypatch.setenv("LOWBIT_KERNELS", "torch")
    assert torch.equal(fused, mod(x))


def test_shared_input_is_quantized_once_and_equals_fresh_quantization(monkeypatch):
    """q / k / v reading one tensor reuse its codes; an in-place change or another tensor does not."""
    from lowbit.nn import cpu_kernels, shared_input

    ext = cpu_kernels.load()
    if ext is None:
        pytest.skip("compiled kernels not built")
    g = torch.Generator().manual_seed(0)
    lins = [Int8Linear.from_float(torch.nn.Linear(24, n), DYN) for n in (24, 8, 8)]
    x = torch.randn(2, 5, 24, generator=g)
    fresh = [lin.linear2d(x.reshape(-1, 24)).reshape(2, 5, -1) for lin in lins]
    calls = []
    real = ext.quantize_rows_i8
    monkeypatch.setattr(ext, "quantize_rows_i8", lambda t: calls.append(1) or real(t))
    shared_input.forget()
    got = [lin(x) for lin in lins]
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(got, fresh))
    x.mul_(2)  # same object, new version: quantized again
    doubled = lins[0](x)
    assert len(calls) == 2 and torch.equal(doubled, lins[0].linear2d(x.reshape(-1, 24)).reshape(2, 5, -1))
    y = x.clone()  # equal values, another tensor
    lins[1](y)
    assert len(calls) == 4

