import pytest
import torch

from lowbit.kv import TurboQuantMSE, TurboQuantProd
from lowbit.kvcache.search import recall_at_k, search


def test_search_exact_and_recall_grows_with_bits():
    g = torch.Generator().manual_seed(0)
    db = torch.randn(2000, 64, generator=g)
    db = db / db.norm(dim=-1, keepdim=True)
    q = db[:50] + 0.3 * torch.randn(50, 64, generator=g)
    assert torch.equal(search(db[:5], db, k=1).flatten(), torch.arange(5))
    recalls = [recall_at_k(q, db, TurboQuantMSE(64, b), k=10)["recall"] for b in (1, 2, 4)]
    assert recalls[0] < recalls[1] < recalls[2] and recalls[2] > 0.8
    r = recall_at_k(q, db, TurboQuantProd(64, 3), k=10)
    assert r["bits_per_coordinate"] == pytest.approx(3 + 32 / 64)
    with pytest.raises(ValueError, match="k must be"):
        search(q, db, k=0)


def test_centring_keeps_the_ranking_and_helps_a_shared_component():
    g = torch.Generator().manual_seed(1)
    db = torch.randn(1500, 64, generator=g) + 2.0  # a large component shared by every vector
    q = torch.randn(60, 64, generator=g)
    plain = recall_at_k(q, db, TurboQuantMSE(64, 2), k=10)
    centred = recall_at_k(q, db, TurboQuantMSE(64, 2), k=10, center=True)
    assert centred["recall"] > plain["recall"] + 0.1
    assert centred["bits_per_coordinate"] == pytest.approx(plain["bits_per_coordinate"] + 16 / 1500)
