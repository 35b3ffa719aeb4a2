"""One option per layer minimising the total predicted error under a bits budget: an exact
multiple-choice knapsack by dynamic programming. Pure (no I/O).

Each layer's options are (storage bits, cost). The budget is floor(target_bpw x parameters)
bits. The DP runs over the bits above every layer's cheapest option, in units of `unit` bits:
the gcd of those extra bits when the budget spans at most `resolution` such units (then the
result is the exact optimum), else a coarser unit. Option bits are rounded UP to units, so the
plan never exceeds the budget; the same DP with bits rounded DOWN is a relaxation, whose optimum
is a lower bound on the true optimum: `Plan.gap` bounds how far from optimal the plan is (0 when
the unit is exact).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from lowbit.errors import LowbitError

RESOLUTION = 1 << 15


@dataclass(frozen=True)
class Plan:
    choices: dict[str, str]  # layer -> option
    bits: int  # total storage bits of the chosen options
    params: int
    budget_bits: int
    cost: float  # total cost of the chosen options
    lower_bound: float  # no plan within the budget costs less than this
    unit: int  # bits per DP step (exact when it divides every option's extra bits)

    @property
    def bpw(self) -> float:
        return self.bits / self.params

    @property
    def gap(self) -> float:
        return max(self.cost - self.lower_bound, 0.0)


def reachable(layers: Mapping[str, tuple[int, Mapping[str, tuple[int, float]]]]) -> tuple[float, float]:
    """(smallest, largest) bits per weight any plan can have."""
    params = sum(p for p, _ in layers.values())
    lo = sum(min(b for b, _ in opts.values()) for _, opts in layers.values())
    hi = sum(max(b for b, _ in opts.values()) for _, opts in layers.values())
    return lo / params, hi / params


def _check(layers) -> None:
    if not layers:
        raise LowbitError("allocate: no layers to plan")
    for name, (params, opts) in layers.items():
        if not opts:
            raise LowbitError(f"allocate: layer {name} has no measured option")
        if params <= 0:
            raise LowbitError(f"allocate: layer {name} has {params} parameters")
        for opt, (bits, cost) in opts.items():
            if bits < 0 or not math.isfinite(cost):
                raise LowbitError(f"allocate: layer {name} option {opt} has bits {bits}, cost {cost}")


def _dp(costs: list[np.ndarray], weights: list[np.ndarray], capacity: int) -> tuple[float, list[int]]:
    """Minimum total cost with sum of weights <= capacity; the chosen index per layer."""
    dp = np.zeros(capacity + 1)
    picks = []
    for c, w in zip(costs, weights):
        new = np.full(capacity + 1, np.inf)
        arg = np.zeros(capacity + 1, dtype=np.int16)
        for k in range(len(c)):  # options in a fixed order; strict < keeps the first of equal costs
            if w[k] > capacity:
                continue
            cand = np.full(capacity + 1, np.inf)
            cand[w[k]:] = dp[: capacity + 1 - w[k]] + c[k]
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        dp = new
        picks.append(arg)
    if not math.isfinite(dp[capacity]):
        return math.inf, []
    chosen, cap = [], capacity
    for arg, w in zip(reversed(picks), reversed(weights)):
        k = int(arg[cap])
        chosen.append(k)
        cap -= int(w[k])
    return float(dp[capacity]), chosen[::-1]


def allocate(layers: Mapping[str, tuple[int, Mapping[str, tuple[int, float]]]], target_bpw: float,
             resolution: int = RESOLUTION) -> Plan:
    """`layers`: {name: (parameters, {option: (storage bits, cost)})}; one option per layer with
    total bits <= floor(target_bpw x parameters) and the least total cost."""
    _check(layers)
    lo, hi = reachable(layers)
    if not lo - 1e-12 <= target_bpw <= hi + 1e-12:
        raise LowbitError(f"--target-bpw {target_bpw:g} is outside what these options reach: "
                          f"{math.ceil(lo * 1000) / 1000:.3f} to {math.floor(hi * 1000) / 1000:.3f} bits per weight")
    names = sorted(layers)  # a fixed order: the same layers give the same plan, ties included
    params = sum(layers[n][0] for n in names)
    budget = int(math.floor(target_bpw * params + 1e-9))
    opt_names = [sorted(layers[n][1]) for n in names]
    bits = [np.array([layers[n][1][o][0] for o in opts], dtype=np.int64) for n, opts in zip(names, opt_names)]
    costs = [np.array([float(layers[n][1][o][1]) for o in opts]) for n, opts in zip(names, opt_names)]
    base = sum(int(b.min()) for b in bits)
    extra = [b - b.min() for b in bits]
    capacity = budget - base
    if capacity < 0:
        raise LowbitError(f"--target-bpw {target_bpw:g} is below the smallest plan ({lo:.4f} bits per weight)")
    g = 0
    for e in extra:
        g = math.gcd(g, *[int(x) for x in e]) if len(e) > 1 else g
    g = g or 1
    unit = g if capacity // g <= resolution else -(-capacity // resolution)
    cap_units = capacity // unit
    up = [-(-e // unit) for e in extra]
    cost, chosen = _dp(costs, up, int(cap_units))
    lower = cost if unit == g else _dp(costs, [e // unit for e in extra], int(cap_units))[0]
    choices = {n: opts[k] for n, opts, k in zip(names, opt_names, chosen)}
    total = sum(int(b[k]) for b, k in zip(bits, chosen))
    assert total <= budget, (total, budget)  # guaranteed by rounding option bits up
    return Plan(choices=choices, bits=total, params=params, budget_bits=budget, cost=cost, lower_bound=lower,
                unit=int(unit))


def measurement_layers(meas) -> dict[str, tuple[int, dict[str, tuple[int, float]]]]:
    """The allocator's input from a `Measurement`: each layer's options as (bits, predicted KL)."""
    if not meas.complete:
        raise LowbitError(f"the measurement covers {meas.blocks_done} of {meas.n_blocks} blocks; "
                          "rerun the same command to finish it")
    out = {}
    for name, layer in meas.layers.items():
        if "sensitivity" not in layer:
            raise LowbitError(f"the measurement has no sensitivity for {name}; measure again")
        out[name] = (int(layer["params"]), {o: (int(layer["bits"][o]), meas.cost(name, o)) for o in layer["bits"]})
    return out
