"""AWQ: scale folding is exact in full precision, the α search helps, clip search never hurts."""

import pytest
import torch

from lowbit.algorithms import awq
from lowbit.core.quantize import quantize
from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec


class RMSNorm(torch.nn.Module):
    def __init__(self, dim, offset=0.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(dim) + 0.5)
        self.offset = offset

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * (self.offset + self.weight)


def _acts(n=512, dim=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    x[:, :4] *= 20  # outlier channels, the case AWQ is for
    return x


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_folding_into_norm_leaves_outputs_unchanged(offset):
    torch.manual_seed(0)
    norm = RMSNorm(128, offset)
    q, k = torch.nn.Linear(128, 64, bias=False), torch.nn.Linear(128, 32, bias=True)
    x = _acts()
    with torch.no_grad():
        ref = [q(norm(x)), k(norm(x))]
        s = awq.compute_scales(norm(x).abs().mean(0), [q.weight, k.weight], 0.5, QuantSpec(group_size=32))
        awq.fold_scales(norm, [q, k], s, norm_offset=offset)
        out = [q(norm(x)), k(norm(x))]
    assert s.std() > 0.1  # a real rescaling, not ~1
    for a, b in zip(ref, out):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_folding_into_previous_linear_and_layernorm():
    torch.manual_seed(0)
    up, down = torch.nn.Linear(64, 96), torch.nn.Linear(96, 64)
    ln = torch.nn.LayerNorm(64)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.2, 0.2)
    x = _acts(dim=64)
    f = lambda: down(torch.relu(up(ln(x))))  # relu is positively homogeneous: up→down folding through it is exact
    with torch.no_grad():
        ref = f()
        awq.fold_scales(up, [down], torch.rand(96) + 0.5)
        awq.fold_scales(ln, [up], torch.rand(64) + 0.5)
        assert torch.allclose(f(), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(LowbitError, match="shapes allow"):
        awq.fold_scales(torch.nn.Linear(8, 32), [down], torch.ones(96))


def test_scale_search_lowers_output_error_against_rtn():
    x = _acts(dim=256)
    g = torch.Generator().manual_seed(1)
    W = 0.05 * torch.randn(192, 256, generator=g)
    spec = QuantSpec(3, symmetric=False, group_size=64)
    ref = x @ W.T
    loss = lambda ws: float(((x @ ws[0].T - ref) ** 2).mean())
    s, alpha, losses = awq.search_scales(x.abs().mean(0), [W], spec, loss)
    assert len(losses) == 20 and 0.0 <= alpha < 1.0
    rtn_loss = loss([quantize(W, spec).dequantize()])
    assert min(losses) < 0.8 * rtn_loss
    assert min(losses) == pytest.approx(loss([awq.fake_quant_rtn(W * s, spec) / s]))


@pytest.mark.parametrize("spec", [QuantSpec(4, symmetric=True, group_size=32), QuantSpec(3, symmetric=False, group_size=64),
                                  QuantSpec(4, symmetric=False, granularity="channel")])
def test_clip_search_never_increases_error(spec):
    x = _acts(dim=256)
    g = torch.Generator().manual_seed(2)
    W = 0.05 * torch.randn(64, 256, generator=g) * (1 + 4 * (torch.rand(64, 256, generator=g) < 0.01))
    shrink, err = awq.search_clip(W, x, spec)
    assert float(shrink.min()) >= 0.5 and float(shrink.max()) <= 1.0
    base_shrink, base_err = awq.search_clip(W, x, spec, max_shrink=0.0)
    assert torch.all(base_shrink == 1.0)
    assert torch.all(err <= base_err)
    scale, zero = awq.apply_clip(W, spec, shrink)
    from lowbit.core.quantize import dequantize, quantize_codes
    Wc = dequantize(quantize_codes(W, scale, zero, spec), scale, zero, spec)
    e_clip = float(((x @ (W - Wc).T) ** 2).mean())
    e_rtn = float(((x @ (W - quantize(W, spec).dequantize()).T) ** 2).mean())
    assert e_clip < e_rtn
    # the group Gram from a Hessian gives the same choice
    shrink_h, _ = awq.search_clip(W, None, spec, H=x.T @ x / x.shape[0])
    assert (shrink_h == shrink).float().mean() > 0.98


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=64), QuantSpec(bits=3, group_size=32, symmetric=False),
                                  QuantSpec(bits=4, granularity="channel", symmetric=False)])
def test_clip_search_fast_path_equals_the_reference_arithmetic(spec):
    """The grouped-view search picks exactly what choose_qparams -> quantize -> dequantize gives."""
    from lowbit.algorithms.awq import _group_err, group_gram
    from lowbit.core.qparams import choose_qparams
    from lowbit.core.quantize import dequantize, quantize_codes

    torch.manual_seed(0)
    W = torch.randn(48, 128)
    X = torch.randn(256, 128) @ torch.randn(128, 128)
    H = X.T @ X / 256
    shrink, err = awq.search_clip(W, None, spec, H=H, n_grid=10, max_shrink=0.5)
    gs = spec.group_size if spec.granularity == "group" else 128
    G = group_gram(None, spec, 128, H)
    best = None
    for i in range(6):
        f = 1.0 - i / 10
        scale, zero = choose_qparams(W, spec, shrink=f)
        e = _group_err(W - dequantize(quantize_codes(W, scale, zero, spec), scale, zero, spec), G, gs)
        best = e if best is None else torch.minimum(best, e)
    assert torch.allclose(err, best, rtol=1e-5, atol=1e-7)
