"""Weights and KV cache under one memory budget at a context length: the joint choice of `lowbit fit`.

For each KV option the bytes left after the fixed weights (embeddings, norms...), that option's
cache at `context` tokens and the decode working set go to the planned Linears: the mixed
allocator (`mixed.allocate`, exact DP) picks one option per layer within those bits. The pair with
the least predicted KL wins:

    predicted KL = weight_kl_scale x Σ_layers sensitivity x error  +  measured KL of the KV option

The KL of two independent small perturbations of the logits adds to first order, so the two parts
are summed (bench/fit.py measures weights alone, cache alone and both on held-out text to check it).
`weight_kl_scale` corrects the weight prediction, which counts each layer's error alone: measured
over SmolLM2 plans at 2.5-4.5 bpw (bench/results/mixed.json), the measured KL is 1.91-2.14 x the
predicted one (layer errors compound), hence the default 2.0. Pure: no model, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.mixed.allocate import Plan, allocate, reachable
from lowbit.mixed.memory import format_bytes

WEIGHT_KL_SCALE = 2.0


@dataclass(frozen=True)
class KVCandidate:
    name: str
    bytes: int  # cache at the context + the decode working set with this cache
    kl: float  # measured


@dataclass(frozen=True)
class FitRow:
    """One KV option's best weights plan (None: the weights cannot fit beside this cache)."""

    kv: KVCandidate
    plan: Plan | None
    weight_budget_bits: int
    weight_kl_scale: float = WEIGHT_KL_SCALE

    @property
    def weight_kl(self) -> float:
        return math.inf if self.plan is None else self.weight_kl_scale * self.plan.cost

    @property
    def predicted_kl(self) -> float:
        return self.weight_kl + self.kv.kl


@dataclass(frozen=True)
class FitChoice:
    best: FitRow
    rows: tuple[FitRow, ...]
    budget: int
    fixed_bytes: int

    def total_bytes(self, row: FitRow | None = None) -> int:
        row = row or self.best
        return self.fixed_bytes + -(-row.plan.bits // 8) + row.kv.bytes


def minimum_bytes(layers, fixed_bytes: int, kv: Sequence[KVCandidate]) -> int:
    """The least memory any choice needs: cheapest option everywhere, the smallest cache."""
    lo_bits = sum(min(b for b, _ in opts.values()) for _, opts in layers.values())
    return fixed_bytes + -(-lo_bits // 8) + min(c.bytes for c in kv)


def choose(layers: Mapping[str, tuple[int, Mapping[str, tuple[int, float]]]], fixed_bytes: int,
           kv: Sequence[KVCandidate], budget: int, *, weight_kl_scale: float = WEIGHT_KL_SCALE,
           resolution: int | None = None, what: str = "the model", context: int | None = None) -> FitChoice:
    """The (KV option, weights plan) with the least predicted KL whose total bytes
    (fixed + planned Linears + cache + working set) stay within `budget`.

    layers: the allocator's input ({name: (parameters, {option: (bits, predicted KL)})});
    kv: the cache options, bytes at the context already computed; ties keep the first."""
    if not kv:
        raise LowbitError("lowbit fit needs at least one KV option")
    if not weight_kl_scale > 0:
        raise LowbitError(f"--weight-kl-scale must be > 0; got {weight_kl_scale}")
    lo, hi = reachable(layers)
    params = sum(p for p, _ in layers.values())
    lo_bits = sum(min(b for b, _ in opts.values()) for _, opts in layers.values())
    hi_bits = sum(max(b for b, _ in opts.values()) for _, opts in layers.values())
    kw = {} if resolution is None else {"resolution": resolution}
    rows = []
    for cand in kv:
        bits = (budget - fixed_bytes - cand.bytes) * 8
        plan = None
        if bits >= lo_bits:
            target = min(bits, hi_bits) / params
            plan = allocate(layers, max(min(target, hi), lo), **kw)
            assert plan.bits <= bits, (plan.bits, bits)
        rows.append(FitRow(cand, plan, bits, weight_kl_scale))
    feasible = [r for r in rows if r.plan is not None]
    if not feasible:
        need = minimum_bytes(layers, fixed_bytes, kv)
        smallest = min(kv, key=lambda c: c.bytes)
        at = f" at --context {context}" if context is not None else ""
        raise LowbitError(f"--memory {format_bytes(budget)} is below what {what} needs{at}: at least "
                          f"{format_bytes(need)} ({format_bytes(fixed_bytes)} embeddings/norms + "
                          f"{format_bytes(lo_bits / 8)} decoder weights at their smallest option + "
                          f"{format_bytes(smallest.bytes)} for the {smallest.name} KV cache and decode working set)")
    best = min(feasible, key=lambda r: r.predicted_kl)
    return FitChoice(best=best, rows=tuple(rows), budget=budget, fixed_bytes=fixed_bytes)
