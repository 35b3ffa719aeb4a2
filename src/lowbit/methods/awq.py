"""AWQ as a pipeline method: per-channel scales searched and folded per block, then a clip search
(numerics in `lowbit.algorithms.awq`)."""

from __future__ import annotations

import dataclasses
import logging

import torch

from lowbit.algorithms import awq
from lowbit.algorithms.hessian import output_error
from lowbit.core.qparams import choose_qparams
from lowbit.core.quantize import QuantizedWeight, quantize_codes
from lowbit.errors import LowbitError
from lowbit.methods.base import positive
from lowbit.methods.stats import HessianMethod
from lowbit.models.arch import get_module

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AWQOptions:
    n_grid: int = 20  # α grid in [0, 1), and the clip search's grid
    search_samples: int = 16  # calibration samples the α search runs on
    clip: bool = True  # per-group range-shrink search after scaling
    max_shrink: float = 0.5
    clip_skip: tuple[str, ...] = ("q_proj", "k_proj")  # outputs meet in attention scores: not clipped (AutoAWQ)

    def __post_init__(self):
        positive("awq", n_grid=self.n_grid, search_samples=self.search_samples)
        if not 0 <= self.max_shrink < 1:
            raise LowbitError(f"method 'awq' option 'max_shrink' must be in [0, 1); got {self.max_shrink}")


def _parent(names) -> str | None:
    parents = {n.rsplit(".", 1)[0] if "." in n else "" for n in names}
    return parents.pop() if len(parents) == 1 else None


def smooth_block(block, run_block, arch, plan, search, n_grid: int, search_samples: int) -> bool:
    """Search each smoothing pair's scales on `search` (a working copy of `block`, e.g. in bf16,
    that `run_block` runs; default `block` itself) and fold them into `block`. Returns whether any
    pair was scaled."""
    search = block if search is None else search
    pairs = []
    for prev_name, lin_names in arch.smooth:
        names = [n for n in lin_names if n in plan]
        if not names:
            continue
        prev = get_module(search, prev_name)
        linears = [get_module(search, n) for n in names]
        if isinstance(prev, torch.nn.Linear) and prev.out_features != linears[0].in_features:
            log.debug("awq: skipping %s -> %s (%d outputs vs %d inputs, grouped-query attention)",
                      prev_name, names, prev.out_features, linears[0].in_features)
            continue
        if len(names) > 1 and _parent(names):
            inspect = get_module(search, _parent(names))
        else:
            inspect, names, linears = linears[0], names[:1], linears[:1]
        pairs.append((prev_name, prev, names, linears, inspect))
    if not pairs:
        return False
    captured = _capture(pairs, run_block, search_samples)
    for (prev_name, prev, names, linears, inspect), cap in zip(pairs, captured):
        spec = plan[names[0]]
        if any(plan[n] != spec for n in names):
            log.info("awq: %s have different specs; searching scales with %s", names, spec.describe())
        x_absmean = cap["abs_sum"] / max(cap["count"], 1)
        ref = cap["outputs"]

        def loss_fn(qws, inspect=inspect, linears=linears, cap=cap, ref=ref):
            saved = [lin.weight.data for lin in linears]
            try:
                for lin, w in zip(linears, qws):
                    lin.weight.data = w.to(saved[0].dtype)
                total, n = 0.0, 0
                with torch.no_grad():
                    for (args, kwargs), r in zip(cap["inputs"], ref):
                        out = inspect(*args, **kwargs)
                        out = out[0] if isinstance(out, tuple) else out
                        total += float(((out.float() - r.float()) ** 2).sum())
                        n += r.numel()
                return total / max(n, 1)
            finally:
                for lin, w in zip(linears, saved):
                    lin.weight.data = w

        s, alpha, losses = awq.search_scales(x_absmean, [lin.weight.detach() for lin in linears], spec, loss_fn,
                                             n_grid=n_grid)
        awq.fold_scales(prev, linears, s, norm_offset=arch.norm_offset)  # later pairs search on folded weights
        if search is not block:
            awq.fold_scales(get_module(block, prev_name), [get_module(block, n) for n in names], s,
                            norm_offset=arch.norm_offset)
        log.debug("awq: %s -> %s alpha=%.2f loss %.4g (alpha=0: %.4g)", prev_name, names, alpha, min(losses), losses[0])
    return True


def _capture(pairs, run_block, limit: int) -> list[dict]:
    """One full-precision run of the block: input |x| sums per pair (all samples) and the
    inspected modules' inputs/outputs for the first `limit` samples."""
    caps = [{"abs_sum": 0.0, "count": 0, "inputs": [], "outputs": [], "seen": 0} for _ in pairs]
    handles = []
    for (_, _, _, linears, inspect), cap in zip(pairs, caps):
        def absmean_hook(_m, args, cap=cap):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            cap["abs_sum"] = cap["abs_sum"] + x.abs().sum(0)
            cap["count"] += x.shape[0]

        def pre_hook(_m, args, kwargs, cap=cap):
            cap["take"] = cap["seen"] < limit
            if cap["take"]:
                cap["inputs"].append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                                      dict(kwargs)))
                cap["seen"] += (args[0] if args else kwargs["hidden_states"]).shape[0]

        def out_hook(_m, _args, _kwargs, out, cap=cap):
            if cap.pop("take", False):
                cap["outputs"].append((out[0] if isinstance(out, tuple) else out).detach())

        handles.append(linears[0].register_forward_pre_hook(absmean_hook))
        handles.append(inspect.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(inspect.register_forward_hook(out_hook, with_kwargs=True))
    try:
        run_block()
    finally:
        for h in handles:
            h.remove()
    return caps


class AWQ(HessianMethod):
    name = "awq"
    smooths = True  # module_pipeline: AWQ scales found and folded on any nn.Module (module_awq)
    Options = AWQOptions

    def prepare_block(self, block, run_block, arch, plan, search=None) -> bool:
        super().prepare_block(block, run_block, arch, plan, search)
        smooth_block(block, run_block, arch, plan, search, self.options.n_grid, self.options.search_samples)
        return True

    def quantize_linear(self, name, W, spec, stats):
        o = self.options
        if o.clip and spec.granularity != "tensor" and not name.endswith(o.clip_skip):
            shrink, _ = awq.search_clip(W, None, spec, H=stats.H, max_shrink=o.max_shrink, n_grid=o.n_grid)
            scale, zero = awq.apply_clip(W, spec, shrink)
        else:
            scale, zero = choose_qparams(W, spec)
        qw = QuantizedWeight(quantize_codes(W, scale, zero, spec), scale, zero, spec)
        qw.error = output_error(W, qw.dequantize(), stats.H)
        return qw
