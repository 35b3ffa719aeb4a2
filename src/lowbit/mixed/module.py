"""Mixed precision for any nn.Module (CNNs, encoders): the decoder allocator on the generic walk's layers.

    meas = measure_module(model, batches)                 # every layer x every option: bits, error
    recipe = plan_module_recipe(meas, target_bpw=3.0)      # exact DP under the budget (mixed.allocate)
    quantize_module(model, recipe, get_method("gptq"), batches)   # sequential, per-layer overrides

The layers and their groups are those `module_pipeline.quantize_module` quantizes (Linear, Conv2d as
its [Cout, Cin·kh·kw] patch matrix). Each group's Hessian comes from the full-precision model (as in
`mixed.measure`: the measurement does not depend on a plan not made yet); every option whose group
size divides the layer's inputs runs the method's group quantizer once, giving its exact storage
bits (packed codes, scales, zeros as lowbit stores them) and relative output error. A layer's
sensitivity is measured like the decoder's: its weight replaced by the int4 probe, the model's
output on a few batches compared to the original (relative squared error), divided by the probe's
local error. The allocator minimises Σ sensitivity × error, i.e. the predicted output error.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.hessian import output_error
from lowbit.calibration.walk import execution_order, feed_inputs, run_batch
from lowbit.core.quantize import quantize
from lowbit.errors import LowbitError
from lowbit.mixed.allocate import Plan, allocate, measurement_layers
from lowbit.mixed.apply import plan_recipe
from lowbit.mixed.artifact import Measurement
from lowbit.mixed.measure import PROBE, _method, option_bits
from lowbit.mixed.options import Option, candidate_options
from lowbit.module_pipeline import _stats_for, plan_module, weight_2d
from lowbit.recipe import Recipe

log = logging.getLogger(__name__)

MODULE_BITS = (2, 3, 4, 8)
MODULE_GROUPS = (32, 64, 128, 0)


def model_output(out) -> torch.Tensor:
    """The tensor a forward's result is judged by: itself, `last_hidden_state`, `logits`, or the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("last_hidden_state", "logits"):
        v = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    items = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for v in items:
        if isinstance(v, torch.Tensor):
            return v
    raise LowbitError(f"the model's forward returned {type(out).__name__}; mixed precision needs a tensor output "
                      "(or one with last_hidden_state / logits)")


class ModuleProbe:
    """The model's outputs on `batches`; `error_with_weight` = relative squared output error with one
    layer's weight replaced (restored after)."""

    def __init__(self, model: nn.Module, batches: Sequence):
        self.model, self.batches = model, list(batches)
        with torch.no_grad():
            self.ref = [model_output(run_batch(model, b)).float() for b in self.batches]
        self.den = sum(float((r ** 2).sum()) for r in self.ref)

    @torch.no_grad()
    def error_with_weight(self, layer: nn.Module, weight_2d_new: torch.Tensor) -> float:
        saved = layer.weight.data.clone()
        try:
            layer.weight.data.copy_(weight_2d_new.reshape(saved.shape).to(saved.dtype))
            num = sum(float(((model_output(run_batch(self.model, b)).float() - r) ** 2).sum())
                      for b, r in zip(self.batches, self.ref))
        finally:
            layer.weight.data.copy_(saved)
        return num / max(self.den, 1e-30)


def _fits(opt: Option, rows: int, cols: int) -> bool:
    try:
        opt.spec.check_shape(rows, cols)
        return True
    except LowbitError:
        return False


def measure_module(model: nn.Module, batches: Sequence, *, options: Sequence[Option] | None = None,
                   method: str = "gptq", method_options: dict | None = None, probe_batches: int = 2,
                   ignore: tuple[str, ...] = (), progress: bool = True) -> Measurement:
    """Every quantizable layer of `model` under every option that fits it (left unchanged; in memory).

    options: default bits {2, 3, 4, 8} x {g32, g64, g128, per channel} (`mixed.options`: asymmetric
    below 4 bits); `probe_batches`: how many of `batches` the sensitivity probes run."""
    batches = list(batches)
    if not batches:
        raise LowbitError(f"mixed precision of {type(model).__name__} needs calibration batches; none were given")
    options = tuple(options or candidate_options(MODULE_BITS, MODULE_GROUPS))
    m = _method(method, method_options)
    if getattr(m, "smooths", False):
        raise LowbitError(f"mixed precision of any nn.Module measures with gptq; {method!r} would fold scales into "
                          "the layers while they are measured")
    model.eval()
    plan, _ = plan_module(model, Recipe(spec=PROBE, method=method, ignore=tuple(ignore)))
    modules = {n: model.get_submodule(n) for n in plan}
    order = execution_order(model, modules, batches[0])
    groups = [[n for n in g if n in modules] for g in order.groups]
    groups = [g for g in groups if g]
    if not groups:
        raise LowbitError(f"none of the quantizable layers of {type(model).__name__} ran on the calibration batch")
    probe = ModuleProbe(model, batches[:max(probe_batches, 1)])
    meas = Measurement(key="module", n_blocks=len(groups), options={o.name: o.spec for o in options},
                       meta={"method": m.fingerprint(), "probe": PROBE.describe(), "batches": len(batches),
                             "model": type(model).__name__})
    bar = tqdm(total=len(groups) * len(options), disable=not progress, desc="measure (runs)", unit="run")
    try:
        for gi, names in enumerate(groups):
            mods = [modules[n] for n in names]
            m.prepare_block(None, None, None, {})  # a fresh pool of shared Hessians
            pairs = [_stats_for(m, n, mod) for n, mod in zip(names, mods)]
            stats = [s for s, _ in pairs]
            feed_inputs(model, mods[0], batches, lambda x: [f(x) for _, f in pairs], stop=not order.repeats)
            weights = [weight_2d(mod).float() for mod in mods]
            for n, W in zip(names, weights):
                meas.layers[n] = {"block": gi, "params": W.numel(), "in_features": W.shape[1], "bits": {}, "error": {}}
            for opt in options:
                if all(_fits(opt, *W.shape) for W in weights):
                    records = m.quantize_group(names, weights, [opt.spec] * len(names), stats)
                    for n, qw in zip(names, records):
                        meas.layers[n]["bits"][opt.name] = option_bits(opt, n, qw)
                        meas.layers[n]["error"][opt.name] = float(qw.error)
                bar.update(1)
            for n, mod, W, st in zip(names, mods, weights, stats):
                layer = meas.layers[n]
                if not layer["bits"]:
                    raise LowbitError(f"no candidate option fits layer {n} ({W.shape[0]}x{W.shape[1]}); "
                                      "add a per-channel option (group 0)")
                q = quantize(W, PROBE).dequantize()
                layer["probe_error"] = output_error(W, q, st.H)
                layer["kl"] = probe.error_with_weight(mod, q)  # the output error (the decoder's KL slot)
                layer["sensitivity"] = layer["kl"] / layer["probe_error"] if layer["probe_error"] > 0 else 0.0
            meas.blocks_done = gi + 1
    finally:
        bar.close()
    return meas


def plan_module_recipe(meas: Measurement, target_bpw: float, *, method: str = "gptq",
                       options: dict | None = None, ignore: tuple[str, ...] = ()) -> tuple[Recipe, Plan]:
    """(the Recipe quantizing each measured layer with its planned option, the plan) at `target_bpw`
    bits per weight (exact storage, scales and zeros included) over the measured layers."""
    plan = allocate(measurement_layers(meas), target_bpw)
    log.info("plan at %.4f bpw (budget %.4f): predicted output error %.4g", plan.bpw,
             plan.budget_bits / plan.params, plan.cost)
    recipe = dataclasses.replace(plan_recipe(plan, meas, method=method, options=options), ignore=tuple(ignore))
    return recipe, plan
