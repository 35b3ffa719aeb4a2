"""A plan as a Recipe (one exact-name override per layer), and the end-to-end helpers the CLI
and the bench call: measure (or reuse) -> allocate -> recipe."""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.mixed.allocate import Plan, allocate, measurement_layers
from lowbit.mixed.artifact import Measurement
from lowbit.mixed.options import candidate_options
from lowbit.recipe import Recipe
from lowbit.spec import QuantSpec

log = logging.getLogger(__name__)


def plan_recipe(plan: Plan, meas: Measurement, *, method: str = "gptq", options: dict | None = None,
                head_spec: QuantSpec | None = None) -> Recipe:
    """The Recipe that quantizes every planned layer with its option (overrides matching exactly
    that layer's name) and nothing else of the decoder blocks' Linears differently."""
    specs = {name: meas.options[opt] for name, opt in plan.choices.items()}
    default = Counter(specs.values()).most_common(1)[0][0]
    overrides = tuple((f"^{re.escape(name)}$", spec) for name, spec in sorted(specs.items()))
    return Recipe(spec=default, method=method, overrides=overrides, quantize_head=head_spec is not None,
                  head_spec=head_spec, options=dict(options or {}))


def plan_for(meas: Measurement, target_bpw: float) -> Plan:
    plan = allocate(measurement_layers(meas), target_bpw)
    log.info("plan at %.4f bpw (budget %.4f): predicted KL %.4g, optimality gap <= %.3g", plan.bpw,
             plan.budget_bits / plan.params, plan.cost, plan.gap)
    return plan


def measure_source(source: str, *, calib_text: str | None = None, n_samples: int = 32, seq_len: int = 512,
                   bits=None, groups=None, symmetric: bool | None = None, method_options: dict | None = None, path: str | Path | None = None,
                   progress: bool = True, options=None) -> Measurement:
    """Load `source` in full precision and measure it (or reuse the saved measurement).
    `options` (e.g. `gguf_options()`) replaces the bits x groups candidates."""
    from lowbit.mixed.measure import measure, measurement_inputs
    from lowbit.models import load_model

    kw = {k: v for k, v in (("bits", bits), ("groups", groups)) if v}
    options = tuple(options) if options else candidate_options(**kw, symmetric=symmetric)
    model, tokenizer = load_model(source)
    calib, sens = measurement_inputs(tokenizer, calib_text, n_samples, seq_len)
    return measure(model, calib, sens, options=options, method_options=method_options, path=path,
                   progress=progress)


def format_plan(plan: Plan, meas: Measurement) -> str:
    """One line per layer: layer, option, its spec, bits per weight, measured error, predicted KL."""
    lines = [f"{'layer':<40} {'option':<8} {'spec':<22} {'bits/w':>7} {'rel. error':>11} {'pred. KL':>10}"]
    for name in sorted(plan.choices, key=lambda n: (meas.layers[n]["block"], n)):
        opt = plan.choices[name]
        layer = meas.layers[name]
        lines.append(f"{name:<40} {opt:<8} {meas.options[opt].describe():<22} "
                     f"{layer['bits'][opt] / layer['params']:>7.3f} {layer['error'][opt]:>11.4g} "
                     f"{meas.cost(name, opt):>10.3g}")
    counts = Counter(plan.choices.values())
    lines.append(f"total: {plan.bpw:.4f} bits per weight (budget {plan.budget_bits / plan.params:.4f}) over "
                 f"{plan.params:,} parameters; predicted KL {plan.cost:.4g} (optimality gap <= {plan.gap:.2g}); "
                 + ", ".join(f"{o} x{c}" for o, c in sorted(counts.items())))
    return "\n".join(lines)


def check_target(target_bpw: float) -> None:
    if not target_bpw > 0:
        raise LowbitError(f"--target-bpw must be > 0; got {target_bpw}")
