"""The joint (KV option, weights plan) choice of `lowbit fit` on random instances: never over the
budget, equal to brute force over every combination, and an infeasible budget names the minimum."""

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.mixed.fit import KVCandidate, choose, minimum_bytes


@st.composite
def instances(draw):
    n_layers = draw(st.integers(1, 4))
    layers = {}
    for i in range(n_layers):
        params = draw(st.integers(1, 64))
        n_opts = draw(st.integers(1, 3))
        opts = {f"o{k}": (8 * draw(st.integers(1, 40)), draw(st.floats(0, 5, allow_nan=False)))
                for k in range(n_opts)}
        layers[f"l{i}"] = (params, opts)
    kv = [KVCandidate(f"kv{j}", draw(st.integers(0, 200)), draw(st.floats(0, 3, allow_nan=False)))
          for j in range(draw(st.integers(1, 4)))]
    fixed = draw(st.integers(0, 100))
    budget = draw(st.integers(1, 600))
    scale = draw(st.sampled_from([1.0, 2.0, 0.5]))
    return layers, kv, fixed, budget, scale


def brute_force(layers, kv, fixed, budget, scale):
    best = math.inf
    names = sorted(layers)
    for cand in kv:
        for combo in itertools.product(*[sorted(layers[n][1]) for n in names]):
            bits = sum(layers[n][1][o][0] for n, o in zip(names, combo))
            if fixed + bits // 8 + cand.bytes <= budget:
                best = min(best, scale * sum(layers[n][1][o][1] for n, o in zip(names, combo)) + cand.kl)
    return best


@given(instances())
def test_choice_fits_and_is_optimal(inst):
    layers, kv, fixed, budget, scale = inst
    want = brute_force(layers, kv, fixed, budget, scale)
    if math.isinf(want):
        with pytest.raises(LowbitError) as e:
            choose(layers, fixed, kv, budget, weight_kl_scale=scale)
        assert minimum_bytes(layers, fixed, kv) > budget
        assert f"at least {minimum_bytes(layers, fixed, kv) / 1e6:,.1f} MB" in str(e.value)
        return
    c = choose(layers, fixed, kv, budget, weight_kl_scale=scale)
    assert c.total_bytes() <= budget
    for row in c.rows:
        if row.plan is not None:
            assert c.total_bytes(row) <= budget
    assert c.best.predicted_kl == pytest.approx(want, abs=1e-9)
    assert c.best.predicted_kl == pytest.approx(scale * c.best.plan.cost + c.best.kv.kl)


@given(instances(), st.integers(2, 40))
def test_coarse_units_never_exceed_the_budget(inst, resolution):
    """With a coarse DP unit (large models) the plan may be suboptimal but never over budget."""
    layers, kv, fixed, budget, scale = inst
    try:
        c = choose(layers, fixed, kv, budget, weight_kl_scale=scale, resolution=resolution)
    except LowbitError:
        assert minimum_bytes(layers, fixed, kv) > budget
        return
    assert all(c.total_bytes(r) <= budget for r in c.rows if r.plan is not None)


def test_infeasible_budget_names_the_minimum():
    layers = {"a": (10, {"w2": (800, 1.0), "w4": (1600, 0.1)}), "b": (10, {"w2": (800, 1.0)})}
    kv = [KVCandidate("fp", 5000, 0.0), KVCandidate("tq3", 1000, 0.1)]
    assert minimum_bytes(layers, 300, kv) == 300 + 200 + 1000
    with pytest.raises(LowbitError, match=r"at least 0\.0 MB .* tq3 KV cache"):
        choose(layers, 300, kv, 1499)
    c = choose(layers, 300, kv, 1500)
    assert c.best.kv.name == "tq3" and c.total_bytes() == 1500
    c = choose(layers, 300, kv, 10**6)
    assert c.best.kv.name == "fp" and c.best.plan.choices == {"a": "w4", "b": "w2"}


def test_more_memory_never_predicts_worse():
    layers = {f"l{i}": (100, {"w2": (200, 1.0 + i), "w3": (300, 0.4), "w4": (400, 0.1 * i)}) for i in range(4)}
    kv = [KVCandidate("fp", 400, 0.0), KVCandidate("kv3", 100, 0.3), KVCandidate("kv2", 60, 0.9)]
    prev = math.inf
    for budget in range(160, 700, 10):
        try:
            kl = choose(layers, 0, kv, budget).best.predicted_kl
        except LowbitError:
            continue
        assert kl <= prev + 1e-12
        prev = kl
