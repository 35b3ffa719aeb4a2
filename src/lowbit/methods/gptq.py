"""GPTQ as a pipeline method (numerics in `lowbit.algorithms.gptq`)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import torch

from lowbit.algorithms import awq, gptq, hqq
from lowbit.core.quantize import split_rows
from lowbit.errors import LowbitError
from lowbit.methods.base import positive
from lowbit.methods.stats import HessianMethod

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GPTQOptions:
    damp: float = 0.01  # dampening, a fraction of mean(diag H); raised x10 while Cholesky fails
    block_size: int = 128  # lazy batch updates
    act_order: bool = True  # columns by decreasing Hessian diagonal
    static_groups: bool = True  # group parameters fixed up front, in the original column order
    clip: bool = True  # each group's scale/zero from the output-aware range-shrink search
    max_shrink: float = 0.5  # the clip search shrinks the range by up to this fraction
    rounding: Literal["minmax", "hqq"] = "minmax"  # hqq: per-group parameters chosen as GPTQ goes

    def __post_init__(self):
        positive("gptq", damp=self.damp, block_size=self.block_size)
        if not 0 <= self.max_shrink < 1:
            raise LowbitError(f"method 'gptq' option 'max_shrink' must be in [0, 1); got {self.max_shrink}")


def run_gptq(o, name: str, W: torch.Tensor, spec, H: torch.Tensor) -> gptq.GPTQResult:
    """One GPTQ run with options `o` (any options object with GPTQ's fields)."""
    group_params = qparams_fn = None
    if o.rounding == "hqq":
        qparams_fn = hqq.qparams_fn()
    elif o.clip and spec.dtype == "int" and spec.granularity in ("group", "channel"):
        # static group parameters from the output-aware clip search (AWQ's), then GPTQ rounding
        shrink, _ = awq.search_clip(W, None, spec, H=H, max_shrink=o.max_shrink)
        group_params = awq.apply_clip(W, spec, shrink)
    res = gptq.gptq(W, spec, H, block_size=o.block_size, damp=o.damp, act_order=o.act_order,
                    static_groups=o.static_groups, qparams_fn=qparams_fn, name=name, group_params=group_params)
    res.qweight.error = res.error
    log.debug("%s: gptq relative output error %.4g (damp %g)", name, res.error, res.damp)
    return res


def gptq_group(o, names, weights, specs, stats) -> list:
    """Linears that read the same input (shared Hessian) and share a per-channel or per-group
    spec are stacked row-wise into one GPTQ run: rows are independent given H, so the result
    equals separate runs while the column loop, Cholesky and clip search run once."""
    buckets: dict = {}
    for i, (spec, st) in enumerate(zip(specs, stats)):
        acc = getattr(st, "acc", None)
        stackable = acc is not None and spec.granularity in ("group", "channel")
        buckets.setdefault((id(acc), repr(spec)) if stackable else ("alone", i), []).append(i)
    out: list = [None] * len(names)
    for idx in buckets.values():
        if len(idx) == 1:
            i = idx[0]
            out[i] = run_gptq(o, names[i], weights[i], specs[i], stats[i].H).qweight
            continue
        joined = "+".join(names[i] for i in idx)
        res = run_gptq(o, joined, torch.cat([weights[i] for i in idx]), specs[idx[0]], stats[idx[0]].H)
        sizes = [weights[i].shape[0] for i in idx]
        nums, dens = (t.split(sizes) for t in res.row_error)
        for i, part, num, den in zip(idx, split_rows(res.qweight, sizes), nums, dens):
            part.error = float(num.sum() / den.sum().clamp_min(1e-30))
            out[i] = part
    return out


class GPTQ(HessianMethod):
    name = "gptq"
    Options = GPTQOptions

    def quantize_linear(self, name, W, spec, stats):
        return run_gptq(self.options, name, W, spec, stats.H).qweight

    def quantize_group(self, names, weights, specs, stats):
        return gptq_group(self.options, names, weights, specs, stats)
