"""`lowbit fit` end to end: measure (or reuse) weights and KV options, choose under the budget,
print the plan, quantize with it and measure what it costs with the chosen cache."""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.mixed.allocate import measurement_layers
from lowbit.mixed.artifact import Measurement
from lowbit.mixed.fit import WEIGHT_KL_SCALE, FitChoice, KVCandidate, choose
from lowbit.mixed.kv_options import KVMeasurement, KVOption
from lowbit.mixed.memory import MemoryBreakdown, ModelShape, breakdown, decode_overhead_bytes, format_bytes, kv_bytes

log = logging.getLogger(__name__)


@dataclass
class FitSetup:
    """Everything the choice needs, measured once per model and data."""

    source: str
    meas: Measurement
    kv_meas: KVMeasurement
    kv_options: tuple[KVOption, ...]
    layouts: dict
    shape: ModelShape
    fixed_bytes: int
    config: object

    def candidates(self, context: int) -> list[KVCandidate]:
        return [KVCandidate(o.name, kv_bytes(self.shape, self.layouts[o.name], context)
                            + decode_overhead_bytes(self.shape, context, o.method is not None), self.kv_meas.kl(o.name))
                for o in self.kv_options]

    def option(self, name: str) -> KVOption:
        return next(o for o in self.kv_options if o.name == name)

    def breakdown(self, choice: FitChoice, context: int) -> MemoryBreakdown:
        return breakdown(self.shape, self.layouts[choice.best.kv.name], context, self.fixed_bytes,
                         choice.best.plan.bits)


def fixed_weight_bytes(model, planned: list[str]) -> int:
    """What the runtime holds besides the planned Linears' weights (lowbit eval's memory count)."""
    from lowbit.eval.size import memory_bytes
    from lowbit.models.arch import get_module

    linear = 0
    for name in planned:
        w = get_module(model, name).weight
        linear += w.numel() * w.element_size()
    return memory_bytes(model) - linear


def prepare(model, tokenizer, source: str, *, calib: str | None = None, samples: int = 32, seq_len: int = 512,
            bits=None, groups=None, symmetric: bool | None = None, method_options: dict | None = None,
            measurement: str | Path | None = None, kv_options=None, kv_windows: int = 2, kv_seq_len: int = 512,
            kv_measurement: str | Path | None = None, progress: bool = True) -> FitSetup:
    """Measure the weights' options (the mixed measurement, cached) and the KV options (cached) of
    `model` (full precision, left unchanged)."""
    from lowbit.mixed.kv_options import kv_calibration_ids, kv_options as default_kv_options, measure_kv
    from lowbit.mixed.measure import measure, measurement_inputs
    from lowbit.mixed.options import candidate_options

    kw = {k: v for k, v in (("bits", bits), ("groups", groups)) if v}
    options = candidate_options(**kw, symmetric=symmetric)
    shape = ModelShape.from_config(model.config, next(model.parameters()).element_size())
    calib_ids, sens_ids = measurement_inputs(tokenizer, calib, samples, seq_len)
    meas = measure(model, calib_ids, sens_ids, options=options, method_options=method_options, path=measurement,
                   progress=progress)
    kv_opts = tuple(kv_options or default_kv_options())
    kv_ids = kv_calibration_ids(tokenizer, calib, kv_windows, kv_seq_len)
    kv_meas = measure_kv(model, kv_ids, kv_opts, path=kv_measurement, progress=progress)
    layouts = {o.name: o.layout(model.config, shape) for o in kv_opts}
    return FitSetup(source, meas, kv_meas, kv_opts, layouts, shape, fixed_weight_bytes(model, list(meas.layers)),
                    model.config)


def fit(setup: FitSetup, budget: int, context: int, weight_kl_scale: float = WEIGHT_KL_SCALE) -> FitChoice:
    from lowbit.errors import LowbitError

    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise LowbitError(f"--context must be a positive number of tokens; got {context!r}")
    return choose(measurement_layers(setup.meas), setup.fixed_bytes, setup.candidates(context), budget,
                  weight_kl_scale=weight_kl_scale, what=setup.source, context=context)


def layer_summary(choice: FitChoice) -> list[str]:
    """Per layer kind (q_proj, ..., down_proj): how many blocks take each option."""
    kinds: dict[str, Counter] = {}
    for name, opt in choice.best.plan.choices.items():
        kind = re.sub(r"^.*?\.\d+\.", "", name)
        kinds.setdefault(kind, Counter())[opt] += 1
    return [f"  {kind:<22} " + ", ".join(f"{o} x{c}" for o, c in sorted(kinds[kind].items()))
            for kind in sorted(kinds)]


def format_fit(choice: FitChoice, setup: FitSetup, context: int) -> str:
    """The KV options table, the chosen plan, its memory breakdown and predicted quality."""
    ppl_fp = next((r["perplexity_fp"] for r in setup.kv_meas.results.values()), None)
    lines = [f"lowbit fit {setup.source}: --memory {format_bytes(choice.budget)} at --context {context} tokens "
             f"(batch 1)",
             f"{'KV cache':<16} {'KV+work MB':>10} {'weights MB':>10} {'bpw':>6} {'weight KL':>10} {'KV KL':>8} "
             f"{'pred. KL':>9}"]
    for r in choice.rows:
        mark = " <- chosen" if r is choice.best else ""
        if r.plan is None:
            lines.append(f"{r.kv.name:<16} {r.kv.bytes / 1e6:>10.1f} {'does not fit':>10}")
            continue
        weights = (choice.total_bytes(r) - r.kv.bytes) / 1e6
        lines.append(f"{r.kv.name:<16} {r.kv.bytes / 1e6:>10.1f} {weights:>10.1f} {r.plan.bpw:>6.3f} "
                     f"{r.weight_kl:>10.4f} {r.kv.kl:>8.4f} {r.predicted_kl:>9.4f}{mark}")
    b = setup.breakdown(choice, context)
    best = choice.best
    opt = setup.option(best.kv.name)
    coords = setup.shape.layers * setup.shape.coords_per_token * context
    kvdesc = "full precision (model dtype)" if opt.method is None else \
        f"{opt.method} at {opt.bits:g} bits ({8 * b.kv / coords:.3f} stored bits/coordinate)"
    lines += [f"chosen: KV cache {kvdesc}; decoder Linears at {best.plan.bpw:.3f} bits per weight "
              f"(optimality gap <= {best.plan.gap:.2g})",
              "per layer kind:", *layer_summary(choice),
              f"memory: {format_bytes(b.fixed_weights)} embeddings/norms + {format_bytes(b.linear_weights)} decoder "
              f"Linears + {format_bytes(b.kv)} KV cache at {context} tokens + {format_bytes(b.overhead)} decode "
              f"working set = {format_bytes(b.total)} of {format_bytes(choice.budget)}",
              f"predicted: KL {best.predicted_kl:.4f} = {best.weight_kl_scale:g} x {best.plan.cost:.4f} (weights, "
              f"Σ sensitivity x error) + {best.kv.kl:.4f} (KV, measured)"
              + (f"; perplexity ~{ppl_fp * math.exp(best.predicted_kl):.3f} (full precision {ppl_fp:.3f} x "
                 f"exp(KL), KV calibration windows)" if ppl_fp else "")]
    return "\n".join(lines)


def fit_json(choice: FitChoice, setup: FitSetup, context: int) -> dict:
    best = choice.best
    return {"budget_bytes": choice.budget, "context": context, "kv": best.kv.name, "kv_kl": best.kv.kl,
            "weight_bpw": best.plan.bpw, "weight_kl_predicted": best.plan.cost, "weight_kl_scale": best.weight_kl_scale,
            "predicted_kl": best.predicted_kl, "memory": setup.breakdown(choice, context).to_json(),
            "choices": best.plan.choices,
            "rows": [{"kv": r.kv.name, "kv_and_work_bytes": r.kv.bytes, "kv_kl": r.kv.kl,
                      "bpw": None if r.plan is None else r.plan.bpw,
                      "predicted_kl": None if r.plan is None else r.predicted_kl} for r in choice.rows]}


@torch.no_grad()
def evaluate_fit(fp_model, q_model, tokenizer, option: KVOption, *, text: str = "pydoc", seq_len: int = 512,
                 windows: int = 8, progress: bool = True) -> dict:
    """Held-out perplexity / KL against the full-precision model with its full-precision cache, for:
    quantized weights + full-precision cache, full-precision weights + the chosen cache, and both
    (what the plan runs); and the chosen cache's kv_bytes on one window."""
    from lowbit.calibration import eval_windows, load_text
    from lowbit.kvcache.evaluate import kv_eval

    ids = eval_windows(tokenizer, load_text(text).evaluation, seq_len=seq_len, max_windows=windows)
    fp = KVOption(None)
    facs = {"weights": lambda: fp.make_cache(q_model.config), "both": lambda: option.make_cache(q_model.config)}
    if option.method is None:
        del facs["both"]
    r = kv_eval(q_model, ids, facs, progress=progress, reference=fp_model)
    out = {"weights": r["weights"], "both": r.get("both", r["weights"])}
    out["kv"] = kv_eval(fp_model, ids, {"kv": lambda: option.make_cache(fp_model.config)},
                        progress=progress)["kv"] if option.method is not None else {**r["weights"], "kl": 0.0}
    cache = option.make_cache(q_model.config)
    q_model(ids[:1], past_key_values=cache, use_cache=True)
    out["kv_bytes_measured"] = cache.memory_report()["kv_bytes"] if option.method is not None else \
        sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    out["kv_bytes_tokens"] = int(ids.shape[1])
    return out
