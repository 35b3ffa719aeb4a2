import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.core import packing
from lowbit.kvcache.packing import pack_mixed, unpack_mixed

pack_bits = functools.partial(packing.pack_bits, container=torch.uint8)


def unpack_bits(p, bits, n):
    return packing.unpack_bits(p, bits, n).long()


def packed_nbytes(n, bits):
    return packing.packed_len(n, bits, torch.uint8)



@given(bits=st.integers(1, 8), n=st.integers(1, 70), rows=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_pack_round_trip_and_exact_size(bits, n, rows, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, (n * bits + 7) // 8) == (rows, packed_nbytes(n, bits))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@given(widths=st.lists(st.tuples(st.integers(1, 9), st.integers(0, 8)), min_size=1, max_size=5),
       seed=st.integers(0, 1000))
def test_pack_mixed_is_gap_free(widths, seed):
    if all(b == 0 for _, b in widths):
        widths = widths + [(3, 2)]
    g = torch.Generator().manual_seed(seed)
    groups = [(torch.randint(0, 1 << b, (2, n), generator=g), b) for n, b in widths]
    packed = pack_mixed(groups)
    assert packed.shape[-1] == (sum(n * b for n, b in widths) + 7) // 8
    out = unpack_mixed(packed, widths)
    for (codes, b), got in zip(groups, out):
        assert got is None if b == 0 else torch.equal(got, codes)


def test_bad_bits_named():
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(3, dtype=torch.long), 9)
    with pytest.raises(ValueError, match="words per row"):
        unpack_bits(torch.zeros(1, 5, dtype=torch.uint8), 3, 8)
