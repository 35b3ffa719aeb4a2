import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.kvcache.key_frame import fit_key_frame, rope, rope_inv_freq


def keys(seed, b=2, h=3, n=40, d=16, offset=5.0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, n, d, generator=g)
    k[..., 3] += offset  # a token-consistent outlier channel, as in SmolLM2's keys
    return k


@given(st.integers(0, 10_000), st.integers(0, 500), st.sampled_from([0.0, 0.25, 0.5]))
def test_frame_round_trip_is_exact(seed, start, power):
    inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2) / 16))
    pos = torch.arange(start, start + 40)
    k = rope(keys(seed), pos, inv)
    frame = fit_key_frame(k, pos, inv, center=True, power=power)
    back = frame.from_frame(frame.to_frame(k, pos), pos)
    assert (back - k).abs().max().item() < 1e-4 * k.abs().max().item()


def test_undoing_rope_makes_the_offset_removable():
    inv = 1.0 / (100.0 ** (torch.arange(0, 16, 2) / 16))
    pos = torch.arange(40)
    k = rope(keys(1), pos, inv)  # post-RoPE: the offset rotates with the position
    with_rope = fit_key_frame(k, pos, inv, power=0).to_frame(k, pos)
    without = fit_key_frame(k, pos, None, power=0).to_frame(k, pos)
    # undone RoPE: the residual is the unit-variance noise; a plain mean leaves most of the rotating offset
    assert with_rope.pow(2).mean().item() == pytest.approx(1.0, abs=0.1)
    assert without.pow(2).mean().item() > 1.5


def test_quarter_power_halves_the_log_spread_of_channel_scales():
    k = keys(2)
    frame = fit_key_frame(k, torch.arange(40), None, center=False, power=0.25)
    r = frame.to_frame(k, torch.arange(40))
    rms_in, rms_out = k.pow(2).mean((0, 2)).sqrt(), r.pow(2).mean((0, 2)).sqrt()
    spread_in = (rms_in.max(-1).values / rms_in.min(-1).values).log()
    spread_out = (rms_out.max(-1).values / rms_out.min(-1).values).log()
    assert torch.allclose(spread_out, spread_in / 2, rtol=0.02)


def test_rope_matches_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=32, rope_theta=5000.0)
    x = torch.randn(1, 2, 7, 32)
    pos = torch.arange(3, 10)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, pos[None])
    ref, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert torch.allclose(rope(x, pos, rope_inv_freq(cfg)), ref, atol=1e-5)


def test_bad_power_named():
    with pytest.raises(LowbitError, match="key_scale_power"):
        fit_key_frame(keys(0), torch.arange(40), None, power=1.0)


def test_key_basis_finds_the_dominant_direction_and_is_orthogonal():
    from lowbit.kvcache.key_basis import key_basis_from_keys

    g = torch.Generator().manual_seed(3)
    u = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    k = torch.randn(2, 3, 50, 16, generator=g) * 0.1 + torch.randn(2, 3, 50, 1, generator=g) * 4 * u
    basis = key_basis_from_keys([k], None, skip_first=0)
    assert basis.shape == (3, 16, 16)
    assert torch.allclose(basis.transpose(-1, -2) @ basis, torch.eye(16).expand(3, 16, 16), atol=1e-5)
    assert (basis[:, :, 0] @ u).abs().min().item() > 0.99


def test_frame_with_basis_round_trips():
    from lowbit.kvcache.key_basis import key_basis_from_keys

    inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2) / 16))
    k = rope(keys(4), torch.arange(40), inv)
    basis = key_basis_from_keys([k], inv)
    frame = fit_key_frame(k, torch.arange(40), inv, basis=basis)
    back = frame.from_frame(frame.to_frame(k, torch.arange(40)), torch.arange(40))
    assert (back - k).abs().max().item() < 1e-4 * k.abs().max().item()
    with pytest.raises(LowbitError, match="key_basis"):
        fit_key_frame(k, torch.arange(40), inv, basis=basis[:2])
