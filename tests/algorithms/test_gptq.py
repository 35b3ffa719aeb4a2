"""GPTQ on single layers: error against RTN, g_idx layouts, dampening recovery, Hessian accumulation."""

import logging

import pytest
import torch

from lowbit.algorithms.gptq import gptq, quantize_weight
from lowbit.algorithms.hessian import HessianAccumulator, output_error
from lowbit.core.quantize import quantize
from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec


def _layer(out=96, inn=256, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inn, inn, generator=g) / inn**0.5 + 0.3 * torch.eye(inn)
    X = (torch.randn(n, inn, generator=g) @ mix) * (0.2 + 3 * torch.rand(inn, generator=g))
    W = 0.05 * torch.randn(out, inn, generator=g)
    acc = HessianAccumulator(inn)
    for chunk in X.split(500):
        acc.add(chunk)
    return W, X, acc.H


def test_hessian_accumulator_matches_definition():
    W, X, H = _layer()
    assert torch.allclose(H, 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-4)
    acc = HessianAccumulator(256)
    acc.add(X.reshape(4, 512, 256))  # [batch, tokens, in] counts every row
    assert acc.n == 2048 and torch.allclose(acc.H, H, rtol=1e-4, atol=1e-4)
    with pytest.raises(LowbitError, match="features"):
        acc.add(torch.randn(3, 7))
    # H is built in the sum's memory on first read; more data afterwards, and a state round trip,
    # still give the definition
    half = HessianAccumulator(256)
    half.add(X[:1000])
    assert torch.allclose(half.H, 2 * X[:1000].T @ X[:1000] / 1000, rtol=1e-4, atol=1e-4)
    half.add(X[1000:].to(torch.bfloat16))
    again = HessianAccumulator(256)
    again.load_state_dict(half.state_dict())
    Xb = torch.cat([X[:1000], X[1000:].to(torch.bfloat16).float()])
    for h in (half.H, again.H):
        assert torch.allclose(h, 2 * Xb.T @ Xb / 2048, rtol=1e-4, atol=1e-4) and torch.equal(h, h.T)


@pytest.mark.parametrize("spec, act_order, bound", [
    (QuantSpec(4, symmetric=True, group_size=64), False, 0.75),
    (QuantSpec(4, symmetric=True, group_size=64), True, 0.5),
    (QuantSpec(4, symmetric=False, group_size=64), True, 0.5),
    (QuantSpec(3, symmetric=False, group_size=32), True, 0.55),
    (QuantSpec(2, symmetric=False, group_size=64), True, 0.7),
    (QuantSpec(8, symmetric=True, granularity="channel"), True, 0.6),
])
def test_gptq_beats_rtn_on_layer_output(spec, act_order, bound):
    W, X, H = _layer()
    res = gptq(W, spec, H, act_order=act_order)
    rtn = quantize(W, spec).dequantize()
    e_rtn = float(((X @ (W - rtn).T) ** 2).mean())
    e_gptq = float(((X @ (W - res.qweight.dequantize()).T) ** 2).mean())
    assert e_gptq / e_rtn < bound
    # the reported error uses bf16 products (hessian.output_error_rows): within 0.1% of float32
    assert res.error == pytest.approx(output_error(W, res.qweight.dequantize(), H), rel=1e-3)
    codes = res.qweight.codes
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    assert codes.dtype == (torch.int8 if spec.symmetric else torch.uint8)
    assert (res.qweight.zero is None) == spec.symmetric


def test_act_order_static_groups_g_idx_matches_codes():
    W, X, H = _layer()
    spec = QuantSpec(4, symmetric=False, group_size=32)
    res = gptq(W, spec, H, act_order=True, static_groups=True)
    qw = res.qweight
    # static groups: trivial g_idx (column c in group c // gs), so kernels can use the layout as is
    assert qw.g_idx is None
    assert qw.scale.shape == (96, 256 // 32)
    assert torch.equal(qw.dequantize(), res.dequantized)
    # same numbers through an explicit g_idx
    g_idx = torch.arange(256) // 32
    from lowbit.core.quantize import dequantize
    assert torch.equal(dequantize(qw.codes, qw.scale, qw.zero, spec, g_idx), res.dequantized)


def test_act_order_dynamic_groups_store_g_idx():
    W, X, H = _layer()
    spec = QuantSpec(4, symmetric=True, group_size=64)
    res = gptq(W, spec, H, act_order=True, static_groups=False)
    qw = res.qweight
    assert qw.g_idx is not None and qw.g_idx.shape == (256,)
    assert not torch.equal(qw.g_idx.long(), torch.arange(256) // 64)
    assert torch.bincount(qw.g_idx.long()).tolist() == [64] * 4
    assert torch.equal(qw.dequantize(), res.dequantized)


def test_dead_columns_and_per_tensor():
    W, X, H = _layer()
    H = H.clone()
    H[:, 5] = 0
    H[5, :] = 0
    qw = quantize_weight(W, QuantSpec(4, symmetric=True, granularity="tensor"), H)
    assert qw.scale.numel() == 1
    assert torch.all(qw.dequantize()[:, 5] == 0)


def test_cholesky_failure_raises_dampening(caplog):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 8, generator=g) @ torch.randn(8, 128, generator=g)  # rank 8 of 128
    H = 2 * X.T @ X / 64
    H = H - 1e-3 * float(H.diagonal().mean()) * torch.eye(128)  # rounding can go either way; make it fail
    W = torch.randn(32, 128, generator=g)
    with caplog.at_level(logging.WARNING, logger="lowbit.algorithms.gptq"):
        res = gptq(W, QuantSpec(4, group_size=32), H, damp=0.0, name="blocks.0.q_proj")
    assert res.damp > 1e-3
    assert any("blocks.0.q_proj" in r.message and "raising dampening" in r.message for r in caplog.records)
    assert torch.isfinite(res.qweight.dequantize()).all()


def test_bad_input_names_layer():
    W, X, H = _layer()
    with pytest.raises(LowbitError, match="mlp.down_proj.*Hessian shape"):
        quantize_weight(W, QuantSpec(), H[:100, :100], name="mlp.down_proj")
    with pytest.raises(LowbitError, match="group_size=48 does not divide.*q_proj"):
        quantize_weight(W, QuantSpec(group_size=48), H, name="q_proj")
    W2 = W.clone()
    W2[0, 0] = float("nan")
    with pytest.raises(LowbitError, match="k_proj.*NaN"):
        quantize_weight(W2, QuantSpec(), H, name="k_proj")


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7, 8])
def test_every_width_and_odd_group_size(bits):
    W, X, H = _layer(out=16, inn=96)
    spec = QuantSpec(bits, symmetric=bits % 2 == 0, group_size=48)
    res = gptq(W, spec, H, act_order=True, block_size=40)
    assert torch.equal(res.qweight.dequantize(), res.dequantized)
    assert res.error < output_error(W, quantize(W, spec).dequantize(), H)


def test_fixed_group_params_from_clip_search():
    from lowbit.algorithms import awq

    W, X, H = _layer()
    spec = QuantSpec(2, symmetric=False, group_size=64)
    shrink, _ = awq.search_clip(W, None, spec, H=H)
    params = awq.apply_clip(W, spec, shrink)
    res = gptq(W, spec, H, act_order=True, group_params=params)
    assert res.qweight.g_idx is None
    assert torch.equal(res.qweight.scale, params[0])
    assert torch.equal(res.qweight.dequantize(), res.dequantized)
    assert res.error < gptq(W, spec, H, act_order=True).error
    with pytest.raises(LowbitError, match="group_params"):
        gptq(W, spec, H, group_params=(params[0][:, :2], params[1]))
