"""Pareto fronts on hand cases; KL percentiles against numpy."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowbit.eval.kl_stats import kl_summary, token_kl
from lowbit.eval.pareto import pareto_front


@pytest.mark.parametrize("points, front", [
    ([], []),
    ([(4.0, 10.0)], [0]),
    # (bits, ppl): 3-bit worse but smaller, 4-bit better, a dominated 4.5-bit one
    ([(4.0, 10.0), (3.0, 12.0), (4.5, 11.0)], [1, 0]),
    # equal points are both kept; a point beaten on one axis and tied on the other is dropped
    ([(4.0, 10.0), (4.0, 10.0), (4.0, 10.5), (5.0, 10.0)], [0, 1]),
    # unsorted input, front sorted by cost
    ([(8.0, 9.0), (2.0, 30.0), (3.0, 12.0), (3.5, 15.0), (4.0, 9.5), (32.0, 9.0)], [1, 2, 4, 0]),
    # NaN never on the front, never dominates
    ([(4.0, float("nan")), (5.0, 10.0)], [1]),
])
def test_pareto_front_hand_cases(points, front):
    assert pareto_front(points) == front


def test_pareto_front_matches_brute_force_definition():
    g = torch.Generator().manual_seed(0)
    pts = [tuple(map(float, p)) for p in torch.randint(0, 6, (40, 2), generator=g)]
    front = set(pareto_front(pts))
    for i, (c, l) in enumerate(pts):
        dominated = any(c2 <= c and l2 <= l and (c2, l2) != (c, l) for c2, l2 in pts)
        assert (i in front) == (not dominated)


def test_kl_summary_equals_numpy_percentiles():
    g = torch.Generator().manual_seed(1)
    values = torch.rand(1001, generator=g, dtype=torch.float64) ** 4 * 3  # skewed, like KL
    s = kl_summary(values)
    v = values.numpy()
    assert s["mean"] == pytest.approx(v.mean(), rel=1e-12)
    for key, q in (("median", 50), ("p90", 90), ("p95", 95), ("p99", 99), ("p99_9", 99.9)):
        assert s[key] == pytest.approx(np.percentile(v, q), rel=1e-12), key
    assert s["max"] == v.max() and s["min"] == v.min()
    assert s["min"] <= s["median"] <= s["p90"] <= s["p95"] <= s["p99"] <= s["p99_9"] <= s["max"]


def test_kl_summary_of_a_hand_case():
    s = kl_summary(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))
    assert (s["mean"], s["median"], s["max"], s["min"]) == (2.0, 2.0, 4.0, 0.0)
    assert s["p90"] == pytest.approx(3.6)  # 0.9 * 4 = 3.6: between the 4th and 5th order statistics


def test_token_kl_equals_the_definition_and_sums_to_quality_kl():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ref_lp, lp = F.log_softmax(a, -1), F.log_softmax(b, -1)
    kl = token_kl(ref_lp, lp)
    assert kl.shape == (2, 5)
    p, q = ref_lp.exp(), lp.exp()
    manual = torch.tensor([[sum(p[i, j, k] * math.log(p[i, j, k] / q[i, j, k]) for k in range(11))
                            for j in range(5)] for i in range(2)])
    torch.testing.assert_close(kl, manual, rtol=1e-5, atol=1e-6)
    assert bool((kl >= -1e-6).all())
    assert token_kl(ref_lp, ref_lp).abs().max() < 1e-6


def test_quality_many_kl_values_average_to_its_kl():
    from lowbit.eval.quality import quality_many

    class Fixed(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(13, 13, generator=torch.Generator().manual_seed(seed)))

        def forward(self, input_ids, use_cache=False):
            return type("Out", (), {"logits": self.table[input_ids]})()

    windows = torch.randint(0, 13, (3, 9), generator=torch.Generator().manual_seed(3))
    _, res = quality_many(Fixed(0), {"a": Fixed(1)}, windows, progress=False, kl_values=True)
    values = res["a"]["kl_values"]
    assert values.shape == (3 * 8,)
    assert float(values.double().mean()) == pytest.approx(res["a"]["kl"], rel=1e-5)
    _, plain = quality_many(Fixed(0), {"a": Fixed(1)}, windows, progress=False)
    assert "kl_values" not in plain["a"] and plain["a"]["kl"] == res["a"]["kl"]
