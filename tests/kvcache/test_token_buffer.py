import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.kvcache.token_buffer import TokenBuffer

ops = st.lists(st.tuples(st.sampled_from(["append", "write", "front", "back", "select"]), st.integers(1, 40)),
               min_size=1, max_size=30)


@given(ops, st.integers(0, 1000))
def test_buffer_matches_a_plain_tensor(script, seed):
    g = torch.Generator().manual_seed(seed)
    buf, ref = TokenBuffer(), torch.zeros(2, 3, 0, 4)
    for op, n in script:
        if op == "append" or buf.data is None:
            x = torch.randn(2, 3, n, 4, generator=g)
            buf.append(x)
            ref = torch.cat([ref, x], dim=-2)
        elif op == "write" and ref.shape[-2]:
            at = n % ref.shape[-2]
            x = torch.randn(2, 3, min(n, ref.shape[-2] - at), 4, generator=g)
            buf.write(at, x)
            ref[..., at:at + x.shape[-2], :] = x
        elif op == "front":
            buf.drop_front(n)
            ref = ref[..., min(n, ref.shape[-2]):, :]
        elif op == "back":
            buf.drop_back(n)
            ref = ref[..., :ref.shape[-2] - min(n, ref.shape[-2]), :]
        elif op == "select":
            idx = torch.tensor([n % 2, 0])
            buf.index_select(idx)
            ref = ref.index_select(0, idx)
        assert torch.equal(buf.view(), ref) and len(buf) == ref.shape[-2]
        assert buf.nbytes >= ref.numel() * 4
