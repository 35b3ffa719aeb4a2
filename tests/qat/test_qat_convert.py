"""prepare_qat -> train -> convert_qat: identical integer codes, outputs of the real modules equal
to the fake-quant forward; LSQ arithmetic; BN folding; PTQ-record init; bad input."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.core.fake_quant import learned_codes, stored_qparams
from lowbit.core.qparams import choose_qparams
from lowbit.core.quantize import dequantize, quantize_codes
from lowbit.errors import LowbitError
from lowbit.nn.int8_linear import Int8Linear
from lowbit.nn.quant_linear import QuantLinear
from lowbit.qat import QATConfig, convert_qat, prepare_qat, qat_layers, qat_parameters, qat_scheme
from lowbit.spec import SCHEMES, ActSpec, LayerScheme, QuantSpec


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 16, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def data(n=48):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def trained(scheme, **cfg):
    model = cnn()
    for m in model.modules():  # non-trivial running statistics to fold
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    x, y = data()
    prepare_qat(model, QATConfig(scheme, **cfg), calib=[x])
    w, q = qat_parameters(model)
    opt = torch.optim.Adam([*w, *q], 1e-2)
    for _ in range(5):  # move weights and grids off their start
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x


W4 = QuantSpec(bits=4, granularity="channel", scale_dtype="float32")
W2 = QuantSpec(bits=2, granularity="channel", scale_dtype="float32")
INT8_SCHEMES = {
    "w4a8-dynamic": SCHEMES["w4a8"],
    "w4a8-static": LayerScheme(W4, ActSpec(granularity="tensor", dynamic=False)),
    "w2a8-static-asym": LayerScheme(W2, ActSpec(granularity="tensor", dynamic=False, symmetric=False)),
    "w8a8-static": SCHEMES["w8a8-static"],
}


@pytest.mark.parametrize("key", list(INT8_SCHEMES))
def test_int8_convert_is_exact(key):
    model, x = trained(INT8_SCHEMES[key])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # folded
    with torch.no_grad():
        y_fake = model(x)
        codes = {n: layer.record().codes for n, layer in qat_layers(model).items()}
    records = convert_qat(model)
    for name, c in codes.items():
        mod = model.get_submodule(name)
        lin = mod.inner if hasattr(mod, "inner") else mod
        assert isinstance(lin, Int8Linear)
        assert torch.equal(lin.record().codes, c.to(torch.int8))  # atol 0 on the integer codes
        assert torch.equal(records[name].codes, c)
    y_real = model(x)
    assert (y_real - y_fake).abs().max().item() <= 1e-5


@pytest.mark.parametrize("cfg", [dict(weight_range="lsq", learn_zero=True), dict(weight_range="minmax")])
def test_weight_only_convert_is_exact(cfg):
    spec = QuantSpec(bits=3, symmetric=False, granularity="group", group_size=8)
    model, x = trained(LayerScheme(spec), ignore=(r"^0$",), **cfg)  # the first conv has 9 patch values
    with torch.no_grad():
        y_fake = model(x)
        fake = {n: (layer.fake_weight()[0], layer.record().codes) for n, layer in qat_layers(model).items()}
    records = convert_qat(model, kernel="torch")
    for name, (w, c) in fake.items():
        mod = model.get_submodule(name)
        lin = mod.inner if hasattr(mod, "inner") else mod
        assert isinstance(lin, QuantLinear)
        assert torch.equal(records[name].codes, c)
        assert torch.equal(lin.dense_weight(torch.float32), w)  # the packed codes dequantize to the fake weight
    # the real arithmetic in float32 equals the fake-quant forward; QuantLinear's own forward runs
    # bf16 activations (its documented kernel numerics), within bf16 rounding of it
    last = model.get_submodule("9")
    h = model[:9](x)
    ref = nn.functional.linear(h, last.dense_weight(torch.float32), last.bias)
    assert (model(x) - y_fake).abs().max().item() <= 2e-2 * y_fake.abs().max().item()
    assert (ref - y_fake).abs().max().item() <= 2e-2 * y_fake.abs().max().item()


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 3), bits=st.integers(2, 8), sym=st.booleans(),
       seed=st.integers(0, 1000), scale_dtype=st.sampled_from(["float16", "float32", "bfloat16"]))
def test_learned_codes_forward_is_dequantize_of_codes(rows, groups, bits, sym, seed, scale_dtype):
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits=bits, symmetric=sym, granularity="group", group_size=8, scale_dtype=scale_dtype)
    x = torch.randn(rows, groups * 8, generator=g) * 3
    s0, z0 = choose_qparams(x, spec)
    scale = (s0.float() * (0.5 + torch.rand(s0.shape, generator=g))).requires_grad_()  # clips some values
    zero = None if z0 is None else (z0.float() + 0.3).requires_grad_()
    s, z = stored_qparams(scale, zero, spec)
    xr = x.clone().requires_grad_()
    q, codes, se = learned_codes(xr, s, z, spec)
    assert torch.equal(codes, quantize_codes(x, s.detach(), None if z is None else z.detach(), spec))
    assert torch.equal(q * se, dequantize(codes, s.detach(), None if z is None else z.detach(), spec))
    (q * se).sum().backward()
    u = x / se.detach() + (0 if z is None else z.detach().repeat_interleave(8, 1))
    inside = (u >= spec.qmin - 0.5) & (u <= spec.qmax + 0.5)
    assert torch.equal(xr.grad, inside.float())  # straight-through inside the clip range only
    assert scale.grad is not None and bool(torch.isfinite(scale.grad).all())


def test_hybrid_init_starts_at_the_ptq_model():
    from lowbit.ptq.fold_bn import fold_batchnorm

    model = cnn()
    x, _ = data()
    with pytest.raises(LowbitError, match="fold first"):
        recs = lowbit.quantize_module(copy.deepcopy(model), [x], method="rtn", bits=4, group_size=8, swap=False,
                                      progress=False, ignore=(r"^0$",))
        prepare_qat(copy.deepcopy(model), QATConfig(LayerScheme(recs["3"].spec), ignore=(r"^0$",)), init=recs)
    fold_batchnorm(model)  # BN folded before PTQ, so the records are of the convs QAT trains
    ptq = copy.deepcopy(model)
    records = lowbit.quantize_module(ptq, [x], method="gptq", bits=4, group_size=8, swap=False, progress=False,
                                     ignore=(r"^0$",))
    prepare_qat(model, QATConfig(LayerScheme(records["3"].spec), ignore=(r"^0$",)), init=records)
    for name, layer in qat_layers(model).items():
        assert torch.equal(layer.record().codes, records[name].codes)
        assert torch.equal(layer.record().scale, records[name].scale)
    with torch.no_grad():
        y_fake = model(x)
    convert_qat(model, kernel="torch")
    with torch.no_grad():
        y_ptq = ptq(x)
        y_real = model(x)
    for name in records:
        lin = model.get_submodule(name)
        lin = lin.inner if hasattr(lin, "inner") else lin
        ref = ptq.get_submodule(name)
        w_ptq = records[name].dequantize().reshape(ref.weight.shape)
        assert torch.equal(lin.dense_weight(torch.float32).reshape(ref.weight.shape), w_ptq)
    assert (y_real - y_fake).abs().max() <= 2e-2 * y_fake.abs().max()
    assert (y_ptq - y_fake).abs().max() <= 1e-5  # step 0 is the PTQ model (its weights written back)


def test_bad_input():
    with pytest.raises(LowbitError, match="symmetric per-channel"):
        QATConfig(LayerScheme(QuantSpec(bits=4, symmetric=False), ActSpec()))
    with pytest.raises(LowbitError, match="group_size=64 does not divide"):
        prepare_qat(cnn(), QATConfig(qat_scheme("w3g64")))
    with pytest.raises(LowbitError, match="calibration batches"):
        prepare_qat(cnn(), QATConfig(INT8_SCHEMES["w4a8-static"]))
    with pytest.raises(LowbitError, match="unknown"):
        qat_scheme("w9z3")


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 5), groups=st.integers(1, 3), bits=st.integers(2, 8), sym=st.booleans(),
       seed=st.integers(0, 1000), gran=st.sampled_from(["group", "channel", "tensor"]))
def test_grouped_fast_path_matches_autograd_path(rows, groups, bits, sym, seed, gran):
    from lowbit.core.fake_quant import fake_quantize_grouped

    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits=bits, symmetric=sym, granularity=gran, group_size=8 if gran == "group" else None)
    x = torch.randn(rows, groups * 8, generator=g) * 3
    s0, z0 = choose_qparams(x, spec)
    grads = []
    for fast in (False, True):
        scale = (s0.float() * 0.7).requires_grad_()
        zero = None if z0 is None else (z0.float() + 0.4).requires_grad_()
        s, z = stored_qparams(scale, zero, spec)
        xr = x.clone().requires_grad_()
        if fast:
            dq, codes = fake_quantize_grouped(xr, s, z, spec)
        else:
            q, codes, se = learned_codes(xr, s, z, spec)
            dq = q * se
        w = torch.linspace(-1, 1, dq.numel()).reshape(dq.shape)
        (dq * w).sum().backward()
        grads.append((dq.detach(), codes.float(), xr.grad, scale.grad, None if zero is None else zero.grad))
    a, b = grads
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.allclose(a[2], b[2], rtol=1e-6, atol=0)  # autograd's path goes through (1/s)·s
    for ga, gb in zip(a[3:], b[3:]):
        if ga is not None:
            assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-5)


def test_act_order_record_trains_in_permuted_order():
    from lowbit.core.quantize import QuantizedWeight, quantize

    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    spec = QuantSpec(bits=3, symmetric=False, granularity="group", group_size=8)
    p = torch.randperm(32)
    qp = quantize(lin.weight.detach()[:, p], spec)  # groups contiguous in the permuted order
    codes = torch.empty_like(qp.codes).index_copy_(1, p, qp.codes)
    g_idx = torch.empty(32, dtype=torch.int32).index_copy_(0, p, (torch.arange(32) // 8).to(torch.int32))
    rec = QuantizedWeight(codes, qp.scale, qp.zero, spec, g_idx)
    model = nn.Sequential(lin)
    prepare_qat(model, QATConfig(LayerScheme(spec)), init={"0": rec})
    layer = qat_layers(model)["0"]
    assert layer.perm is not None
    back = layer.record()
    assert torch.equal(back.codes, rec.codes) and torch.equal(back.g_idx, rec.g_idx)
    x = torch.randn(5, 32)
    with torch.no_grad():
        ref = nn.functional.linear(x, rec.dequantize(), lin.bias)
        assert (model(x) - ref).abs().max() <= 1e-5
