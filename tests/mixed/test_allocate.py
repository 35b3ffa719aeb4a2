"""The allocator: exact against brute force, never over budget, deterministic, clear errors."""

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.mixed.allocate import allocate, reachable


@st.composite
def instances(draw, max_layers=5, max_options=4, max_bits=40):
    n = draw(st.integers(1, max_layers))
    layers = {}
    for i in range(n):
        params = draw(st.integers(1, 8))
        k = draw(st.integers(1, max_options))
        opts = {f"o{j}": (draw(st.integers(1, max_bits)), draw(st.floats(0, 10, allow_nan=False)))
                for j in range(k)}
        layers[f"layer{i}"] = (params, opts)
    lo, hi = reachable(layers)
    target = draw(st.floats(lo, hi))
    return layers, target


def brute_force(layers, budget):
    names = list(layers)
    best = math.inf
    for combo in itertools.product(*[sorted(layers[n][1].items()) for n in names]):
        bits = sum(b for _, (b, _) in combo)
        if bits <= budget:
            best = min(best, sum(c for _, (_, c) in combo))
    return best


def plan_cost(layers, plan):
    return sum(layers[n][1][o][1] for n, o in plan.choices.items())


@given(instances())
def test_equals_brute_force_and_within_budget(inst):
    layers, target = inst
    plan = allocate(layers, target)
    params = sum(p for p, _ in layers.values())
    budget = math.floor(target * params + 1e-9)
    assert plan.budget_bits == budget
    assert plan.bits == sum(layers[n][1][o][0] for n, o in plan.choices.items()) <= budget
    best = brute_force(layers, budget)
    assert plan_cost(layers, plan) == pytest.approx(best, rel=1e-12, abs=1e-12)
    assert plan.gap == 0.0


@given(instances(max_bits=10_000))
def test_coarse_units_stay_within_budget_and_bound_the_optimum(inst):
    layers, target = inst
    plan = allocate(layers, target, resolution=7)  # a few units: rounded, never over budget
    assert plan.bits <= plan.budget_bits
    best = brute_force(layers, plan.budget_bits)
    assert plan.lower_bound <= best + 1e-9
    assert plan_cost(layers, plan) >= best - 1e-9
    assert plan.cost == pytest.approx(plan_cost(layers, plan), rel=1e-12, abs=1e-12)


@given(instances())
def test_same_input_same_plan(inst):
    layers, target = inst
    a, b = allocate(layers, target), allocate(dict(reversed(list(layers.items()))), target)
    assert a.choices == b.choices and a == allocate(layers, target)


def test_target_outside_reach_says_what_is_reachable():
    layers = {"a": (4, {"x": (8, 1.0), "y": (16, 0.5)}), "b": (4, {"x": (8, 2.0), "y": (32, 0.1)})}
    with pytest.raises(LowbitError, match=r"outside what these options reach: 2.000 to 6.000"):
        allocate(layers, 1.5)
    with pytest.raises(LowbitError, match=r"2.000 to 6.000"):
        allocate(layers, 6.5)
    assert allocate(layers, 6.0).choices == {"a": "y", "b": "y"}
    assert allocate(layers, 2.0).choices == {"a": "x", "b": "x"}
    assert allocate(layers, 4.0).choices == {"a": "y", "b": "x"}  # 24 bits, cost 2.5
