import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.kv import KIVI, PolarQuant, make_kv_quantizers
from lowbit.kvcache.polarquant import allocate_angle_bits


def unit(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("bits", [2, 2.5, 3, 4])
def test_polarquant_distortion_and_size(bits):
    d = 64
    x = unit(2000, d, 1)
    q = PolarQuant(d, bits, seed=2)
    p = q.quantize(x)
    assert ((q.dequantize(p) - x) ** 2).sum(-1).mean().item() == pytest.approx(q.expected_mse, rel=0.08)
    # bits·d angle bits in one gap-free stream plus a single fp16 radius (full recursion at d = 64)
    assert p.bits_per_coordinate == pytest.approx(bits + 16 / d, abs=1 / 64)
    assert p.fields["radius"].shape == (2000, 1)


def test_polarquant_allocation_spends_the_budget_and_favours_level_one():
    bits = allocate_angle_bits(64, 6, 192)
    assert sum((64 >> (lvl + 1)) * b for lvl, b in enumerate(bits)) == 192
    assert bits[0] >= max(bits[1:4])


@given(seed=st.integers(0, 1000), mode=st.sampled_from(["key", "value"]), bits=st.sampled_from([2, 3, 4, 8]))
@settings(max_examples=25)
def test_kivi_error_within_half_a_step(seed, mode, bits):
    x = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(seed)) * 3
    q = KIVI(64, bits, mode=mode, group_size=32)
    p = q.quantize(x)
    step = p.fields["scale"].float()
    err = (q.dequantize(p) - x).abs()
    if mode == "key":  # scale per (token group, channel)
        bound = step.repeat_interleave(32, dim=-2)
    else:  # scale per (token, channel group)
        bound = step.repeat_interleave(32, dim=-1)
    assert torch.all(err <= bound * 0.5 + 2e-2 * x.abs().max() * 2.0**-bits + 1e-3)


def test_kivi_side_data_counted():
    p = KIVI(64, 2, mode="value", group_size=32).quantize(torch.randn(10, 64))
    assert p.bits_per_coordinate == pytest.approx(2 + 2 * 16 / 32)


def test_kivi_key_mode_needs_whole_groups():
    with pytest.raises(ValueError, match="groups of 32 tokens"):
        KIVI(64, 2, mode="key", group_size=32).quantize(torch.randn(1, 40, 64))


@pytest.mark.parametrize("factory,match", [
    (lambda: PolarQuant(63, 3), "dim"),
    (lambda: PolarQuant(64, 3, levels=7), "levels"),
    (lambda: KIVI(64, 3, mode="channel"), "mode"),
    (lambda: KIVI(48, 3, group_size=32), "group_size"),
    (lambda: make_kv_quantizers("turbo", 64, 64, 3), "unknown KV method"),
])
def test_bad_input_named(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_kivi_constant_group_is_finite_and_exact():
    # a channel constant over a 32-token key group (Gemma 3 has some) has range 0: no 0/0 in the codes
    x = torch.randn(1, 2, 64, 64, generator=torch.Generator().manual_seed(0))
    x[..., 3] = 0.5
    for mode in ("key", "value"):
        y = KIVI(64, 2, mode=mode)(x if mode == "key" else x.transpose(-1, -2).contiguous())
        assert torch.isfinite(y).all()
    assert (KIVI(64, 2, mode="key")(x)[..., 3] - 0.5).abs().max() == 0
