"""pack_bits / unpack_bits are inverse for every width and container; nn's fast unpack agrees."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.core import pack_bits, unpack_bits
from lowbit.core.packing import packed_len


@st.composite
def codes(draw):
    bits = draw(st.sampled_from([2, 3, 4, 5, 6, 7, 8]))
    rows = draw(st.integers(1, 4))
    n = draw(st.integers(1, 100))
    seed = draw(st.integers(0, 2**31 - 1))
    c = torch.randint(0, 2**bits, (rows, n), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    if draw(st.booleans()):  # extremes: all-ones words exercise the int32 sign bit
        c[:, ::2] = 2**bits - 1
    return bits, c


@given(codes(), st.sampled_from([torch.int32, torch.uint8]))
def test_pack_unpack_identity(bc, container):
    bits, c = bc
    p = pack_bits(c, bits, container)
    assert p.dtype == container
    assert p.shape[-1] == packed_len(c.shape[-1], bits, container)
    assert torch.equal(unpack_bits(p, bits, c.shape[-1]), c)


@given(codes())
def test_packing_is_dense(bc):
    bits, c = bc
    p = pack_bits(c, bits, torch.uint8)
    assert p.numel() * 8 < c.shape[0] * (c.shape[1] * bits + 8)  # at most one partly-filled byte per row


@given(codes())
def test_fast_unpack_matches_reference(bc):
    bits, c = bc
    p = pack_bits(c, bits, torch.int32)
    assert torch.equal(unpack_bits(p, bits, c.shape[-1], torch.int32).to(torch.uint8), c)


def test_three_bit_layout_fills_three_words_per_32_codes():
    c = torch.arange(64, dtype=torch.uint8).reshape(1, 64) % 8
    assert pack_bits(c, 3, torch.int32).shape == (1, 6)
    assert pack_bits(torch.full((1, 8), 15, dtype=torch.uint8), 4, torch.int32).item() == -1


def test_out_of_range_codes_are_refused():
    import pytest

    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="outside 0..7"):
        pack_bits(torch.tensor([[1, 8]]), 3)
    with pytest.raises(LowbitError, match="offset signed codes"):
        pack_bits(torch.tensor([[-1, 2]]), 4)


def test_nan_weight_is_refused():
    import pytest

    from lowbit import QuantSpec
    from lowbit.core import quantize
    from lowbit.errors import LowbitError

    w = torch.ones(2, 32)
    w[1, 3] = float("nan")
    with pytest.raises(LowbitError, match="1 NaN/Inf"):
        quantize(w, QuantSpec(4, "int", True, "group", 32))
