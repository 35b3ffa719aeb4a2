"""HQQ-style optimisation: lower lp error than min-max rounding, valid codes, usable inside GPTQ."""

import pytest
import torch

from lowbit.algorithms import hqq
from lowbit.algorithms.gptq import gptq
from lowbit.algorithms.hessian import HessianAccumulator
from lowbit.core.quantize import quantize
from lowbit.spec import QuantSpec


def _weight(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = 0.02 * torch.randn(128, 512, generator=g)
    outliers = torch.rand(W.shape, generator=g) < 0.003
    return W + outliers * 0.2 * torch.randn(W.shape, generator=g)


@pytest.mark.parametrize("spec, ratio", [
    (QuantSpec(4, symmetric=False, group_size=64), 0.97),
    (QuantSpec(3, symmetric=False, group_size=64), 0.97),
    (QuantSpec(2, symmetric=False, group_size=64), 0.97),
    (QuantSpec(4, symmetric=True, group_size=64), 0.98),
    (QuantSpec(4, symmetric=False, granularity="channel"), 0.995),
])
def test_hqq_beats_rtn_on_lp_error(spec, ratio):
    W = _weight()
    rtn = quantize(W, spec).dequantize()
    qw = hqq.optimize(W, spec)
    assert hqq.lp_error(W, qw.dequantize()) < ratio * hqq.lp_error(W, rtn)
    assert int(qw.codes.min()) >= spec.qmin and int(qw.codes.max()) <= spec.qmax
    assert (qw.zero is None) == spec.symmetric
    if not spec.symmetric:  # float zero point: codes are round(W / s + z), not round(W / s) + z
        assert not torch.equal(qw.zero, torch.round(qw.zero))
        q = torch.round(W / qw.scale.repeat_interleave(W.shape[1] // qw.scale.shape[1], 1)
                        + qw.zero.repeat_interleave(W.shape[1] // qw.zero.shape[1], 1)).clamp(spec.qmin, spec.qmax)
        assert torch.equal(q, qw.codes.float())


def test_hqq_as_gptq_rounding_step():
    W = _weight()
    g = torch.Generator().manual_seed(3)
    X = torch.randn(1024, 512, generator=g) * (0.2 + 2 * torch.rand(512, generator=g))
    acc = HessianAccumulator(512)
    acc.add(X)
    spec = QuantSpec(3, symmetric=False, group_size=64)
    plain = gptq(W, spec, acc.H, act_order=True)
    with_hqq = gptq(W, spec, acc.H, act_order=True, qparams_fn=hqq.qparams_fn())
    assert torch.equal(with_hqq.qweight.dequantize(), with_hqq.dequantized)
    assert with_hqq.error < 1.05 * plain.error
