"""The calibrated methods as pipeline objects: gptq, hqq, awq, awq+gptq (see `registry` for the protocol).

The numerics live in gptq.py / hqq.py / awq.py as pure functions; these classes only adapt them
to the block pipeline: Hessian statistics fed by the pipeline's hooks, AWQ's block-level scale
search and folding in `prepare_block`, and per-Linear quantization.
"""

from __future__ import annotations

import logging
import weakref

import torch

from lowbit.algorithms import awq, gptq, hqq
from lowbit.algorithms.hessian import HessianAccumulator, output_error
from lowbit.core.qparams import choose_qparams
from lowbit.core.quantize import QuantizedWeight, quantize_codes, split_rows
from lowbit.errors import LowbitError
from lowbit.models.arch import get_module

log = logging.getLogger(__name__)


class _SharedHessian(HessianAccumulator):
    """A Hessian shared by Linears that read the same input tensor (q/k/v, gate/up): each
    activation is added once, however many of those Linears' hooks see it."""

    def __init__(self, in_features: int, name: str):
        super().__init__(in_features, name=name)
        self._last = None

    def add_once(self, x: torch.Tensor) -> None:
        if self._last is not None and self._last() is x:
            return
        self._last = weakref.ref(x)
        self.add(x)


class HessianStats:
    """What the pipeline's forward hook feeds (`.add(x)`); resolves to a shared accumulator."""

    def __init__(self, pool: list, name: str, in_features: int):
        self.pool, self.name, self.in_features = pool, name, in_features
        self.acc: _SharedHessian | None = None

    def add(self, x: torch.Tensor) -> None:
        if self.acc is None:
            for ref, acc in self.pool:
                if ref() is x:
                    self.acc = acc
                    break
            else:
                self.acc = _SharedHessian(self.in_features, self.name)
                self.pool.append((weakref.ref(x), self.acc))
                self.pool[:] = [(r, a) for r, a in self.pool if r() is not None]
        self.acc.add_once(x)

    @property
    def H(self) -> torch.Tensor:
        if self.acc is None:
            raise LowbitError(f"{self.name}: no calibration activations reached this layer; its Hessian is empty")
        return self.acc.H


class _Base:
    name = "base"
    needs_calibration = True

    def __init__(self, **options):
        self.options = dict(options)
        self.layer_errors: dict[str, float] = {}  # relative output error per quantized Linear
        self._pool: list = []

    def make_stats(self, name, linear):
        if not self.needs_calibration:
            return None
        return HessianStats(self._pool, name, linear.in_features)

    def prepare_block(self, block, run_block, arch, plan, search=None):
        self._pool.clear()
        return False

    def _record(self, name: str, W: torch.Tensor, qw: QuantizedWeight, stats) -> None:
        if stats is not None:
            self.layer_errors[name] = output_error(W, qw.dequantize(), stats.H)


class GPTQ(_Base):
    """Options: damp (0.01), block_size (128), act_order (True), static_groups (True),
    clip (True: each group's scale/zero from the output-aware range-shrink search, fixed up front),
    max_shrink (0.5), rounding ('minmax' or 'hqq': per-group parameters chosen as GPTQ goes)."""

    name = "gptq"

    def _gptq(self, name, W, spec, stats, qparams_fn=None) -> gptq.GPTQResult:
        o = self.options
        H = stats.H
        group_params = None
        if qparams_fn is None and o.get("rounding", "minmax") == "hqq":
            qparams_fn = hqq.qparams_fn()
        elif o.get("clip", True) and spec.dtype == "int" and spec.granularity in ("group", "channel"):
            # static group parameters from the output-aware clip search (AWQ's), then GPTQ rounding
            shrink, _ = awq.search_clip(W, None, spec, H=H, max_shrink=float(o.get("max_shrink", 0.5)))
            group_params = awq.apply_clip(W, spec, shrink)
        res = gptq.gptq(W, spec, H, block_size=int(o.get("block_size", 128)), damp=float(o.get("damp", 0.01)),
                        act_order=bool(o.get("act_order", True)), static_groups=bool(o.get("static_groups", True)),
                        qparams_fn=qparams_fn, name=name, group_params=group_params)
        self.layer_errors[name] = res.error
        log.debug("%s: gptq relative output error %.4g (damp %g)", name, res.error, res.damp)
        return res

    def quantize_linear(self, name, W, spec, stats):
        return self._gptq(name, W, spec, stats).qweight

    def quantize_group(self, names, weights, specs, stats) -> list[QuantizedWeight]:
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
                out[i] = self.quantize_linear(names[i], weights[i], specs[i], stats[i])
                continue
            joined = "+".join(names[i] for i in idx)
            res = self._gptq(joined, torch.cat([weights[i] for i in idx]), specs[idx[0]], stats[idx[0]])
            self.layer_errors.pop(joined, None)
            sizes = [weights[i].shape[0] for i in idx]
            nums, dens = (t.split(sizes) for t in res.row_error)
            for i, part, num, den in zip(idx, split_rows(res.qweight, sizes), nums, dens):
                out[i] = part
                self.layer_errors[names[i]] = float(num.sum() / den.sum().clamp_min(1e-30))
        return out


class HQQ(_Base):
    """Calibration-free. Options: p (0.7), iters (20), beta (10), kappa (1.01), optimize_scale."""

    name = "hqq"
    needs_calibration = False

    def quantize_linear(self, name, W, spec, stats):
        keys = ("p", "iters", "beta", "kappa", "optimize_scale")
        return hqq.optimize(W, spec, name=name, **{k: v for k, v in self.options.items() if k in keys})


def _parent(names) -> str | None:
    parents = {n.rsplit(".", 1)[0] if "." in n else "" for n in names}
    return parents.pop() if len(parents) == 1 else None


class AWQ(GPTQ):
    """Options: n_grid (20), search_samples (16 calibration samples for the α search), clip (True),
    max_shrink (0.5), clip_skip (('q_proj', 'k_proj'): Linears whose outputs meet in attention
    scores are not clipped, as in AutoAWQ), then ('rtn' or 'gptq')."""

    name = "awq"

    def prepare_block(self, block, run_block, arch, plan, search=None):
        """Search each smoothing pair's scales on `search` (a working copy of `block`, e.g. in bf16,
        that `run_block` runs; default `block` itself) and fold them into `block`. Returns True."""
        super().prepare_block(block, run_block, arch, plan)
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
        captured = self._capture(pairs, run_block)
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
                                                 n_grid=int(self.options.get("n_grid", 20)))
            awq.fold_scales(prev, linears, s, norm_offset=arch.norm_offset)  # later pairs search on folded weights
            if search is not block:
                awq.fold_scales(get_module(block, prev_name), [get_module(block, n) for n in names], s,
                                norm_offset=arch.norm_offset)
            log.debug("awq: %s -> %s alpha=%.2f loss %.4g (alpha=0: %.4g)", prev_name, names, alpha, min(losses), losses[0])
        return True

    def _capture(self, pairs, run_block) -> list[dict]:
        """One full-precision run of the block: input |x| sums per pair (all samples) and the
        inspected modules' inputs/outputs for the first `search_samples` samples."""
        limit = int(self.options.get("search_samples", 16))
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

    def quantize_group(self, names, weights, specs, stats):
        if self.options.get("then", "rtn") == "gptq":
            return super().quantize_group(names, weights, specs, stats)
        return [self.quantize_linear(*a) for a in zip(names, weights, specs, stats)]

    def quantize_linear(self, name, W, spec, stats):
        if self.options.get("then", "rtn") == "gptq":
            return self._gptq(name, W, spec, stats).qweight
        skip = tuple(self.options.get("clip_skip", ("q_proj", "k_proj")))
        if self.options.get("clip", True) and spec.granularity != "tensor" and not name.endswith(skip):
            shrink, _ = awq.search_clip(W, None, spec, H=stats.H, max_shrink=float(self.options.get("max_shrink", 0.5)),
                                        n_grid=int(self.options.get("n_grid", 20)))
            scale, zero = awq.apply_clip(W, spec, shrink)
        else:
            scale, zero = choose_qparams(W, spec)
        qw = QuantizedWeight(quantize_codes(W, scale, zero, spec), scale, zero, spec)
        self._record(name, W, qw, stats)
        return qw


class AWQGPTQ(AWQ):
    """AWQ scales folded first, then GPTQ on the scaled weights (options of both)."""

    name = "awq+gptq"

    def __init__(self, **options):
        options.setdefault("then", "gptq")
        super().__init__(**options)


METHODS = {"gptq": GPTQ, "hqq": HQQ, "awq": AWQ, "awq+gptq": AWQGPTQ}

__all__ = ["METHODS", "GPTQ", "HQQ", "AWQ", "AWQGPTQ", "HessianStats"]
