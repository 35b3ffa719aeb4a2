"""Weight quantization of any nn.Module (CNNs, encoders, ...): the block pipeline's idea without an
architecture table.

    records = quantize_module(model, recipe, get_method("gptq"), batches)

Layers run in the order one calibration forward reveals (`calibration.walk`); each group of layers
that read the same input is calibrated on the outputs of the already-quantized layers before it
(sequential): the calibration batches run through the model, a hook on the group's first layer
adds each input to the method's statistics (a Hessian: bounded memory, no input is stored) and
stops the forward there. Conv2d layers are quantized as the [Cout, Cin·kh·kw] matrix their
unfolded patches multiply (the Hessian is that of the patches). Layers lowbit cannot quantize are
listed in one warning and stay in full precision.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration.walk import SUPPORTED, candidate_layers, execution_order, feed_inputs
from lowbit.core.finite import all_finite, count_nonfinite
from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.nn.quant_conv import QuantConv2d, conv_patches, conv_weight_2d
from lowbit.nn.quant_linear import QuantLinear
from lowbit.nn.replace import replace_linear
from lowbit.recipe import Recipe
from lowbit.spec import QuantSpec

log = logging.getLogger(__name__)


def weight_2d(mod: nn.Module) -> torch.Tensor:
    """The layer's weight as the [out, in] matrix its (patch) inputs multiply."""
    return conv_weight_2d(mod) if isinstance(mod, nn.Conv2d) else mod.weight.detach()


def _fitting_spec(spec: QuantSpec, rows: int, cols: int) -> QuantSpec | None:
    """`spec`, or its per-channel form when its groups do not divide `cols` (a first conv's 9 or 27
    patch values); None when even that does not fit."""
    try:
        spec.check_shape(rows, cols)
        return spec
    except LowbitError:
        pass
    alt = dataclasses.replace(spec, granularity="channel", group_size=None, superblock=None)
    try:
        alt.check_shape(rows, cols)
        return alt
    except LowbitError:
        return None


def plan_module(model: nn.Module, recipe: Recipe) -> tuple[dict[str, QuantSpec], dict[str, str]]:
    """({layer: spec} to quantize, {layer: why it stays in full precision}) for any nn.Module.

    Raises LowbitError when the model has no layer lowbit can quantize."""
    layers, skipped = candidate_layers(model)
    if not layers:
        listed = f" (it holds {', '.join(sorted(skipped)[:5])}, which lowbit cannot quantize)" if skipped else ""
        raise LowbitError(f"{type(model).__name__} has no layer lowbit can quantize{listed}; "
                          f"lowbit quantizes {SUPPORTED}")
    plan: dict[str, QuantSpec] = {}
    regrouped = []
    for name, mod in layers.items():
        spec = recipe.spec_for(name)
        if spec is None:
            continue
        rows, cols = weight_2d(mod).shape
        fit = _fitting_spec(spec, rows, cols)
        if fit is None:
            skipped[name] = f"{spec.describe()} does not fit its {rows}x{cols} weight"
            continue
        if fit is not spec:
            regrouped.append(f"{name} ({cols} inputs)")
        plan[name] = fit
    if regrouped:
        log.warning("group size %s does not divide the inputs of %s; quantized per channel instead",
                    recipe.spec.group_size, ", ".join(regrouped))
    if not plan:
        raise LowbitError(f"the recipe's ignore list leaves no layer of {type(model).__name__} to quantize")
    return plan, skipped


def _stats_for(method, name: str, mod: nn.Module):
    """The method's statistics accumulator for a layer, fed the layer's raw inputs (patches for a conv)."""
    rows, cols = weight_2d(mod).shape
    stats = method.make_stats(name, types.SimpleNamespace(in_features=cols, out_features=rows, weight=mod.weight))
    if stats is None:
        return None, None
    if isinstance(mod, nn.Conv2d):
        return stats, lambda x: stats.add(conv_patches(mod, x.float()))
    return stats, stats.add


def quantize_module(model: nn.Module, recipe: Recipe, method, batches: Sequence | None = None, *,
                    swap: bool = True, progress: bool = True) -> dict[str, QuantizedWeight]:
    """Quantize the Linear / Conv2d layers of `model` in place per `recipe` with `method`; returns
    {layer: record}.

    batches: calibration inputs, each a tensor (`model(x)`), a tuple (`model(*x)`) or a mapping
    (`model(**x)`, e.g. a tokenizer's output); needed by calibrated methods, and used by any
    method to find the layers that actually run. swap: replace the layers by QuantLinear /
    QuantConv2d (packed codes, real kernels); else their weights become the dequantized values.
    """
    model.eval()
    plan, skipped = plan_module(model, recipe)
    batches = list(batches or [])
    if method.needs_calibration and not batches:
        raise LowbitError(f"method {method.name!r} needs calibration batches for {type(model).__name__}; none were given")
    modules = {n: model.get_submodule(n) for n in plan}
    if batches:
        order = execution_order(model, modules, batches[0])
        for n in order.unreached:
            skipped[n] = "never called through its forward on the calibration batch"
            del plan[n]
        groups = order.groups
        stop = not order.repeats
    else:
        groups, stop = [[n] for n in plan], True
    if skipped:
        log.warning("%d layer(s) left in full precision: %s", len(skipped),
                    "; ".join(f"{n}: {why}" for n, why in skipped.items()))
    if not plan:
        raise LowbitError(f"none of the quantizable layers of {type(model).__name__} ran on the calibration batch")
    for n in plan:
        w = modules[n].weight
        if not all_finite(w):
            raise LowbitError(f"weight of {n} holds {count_nonfinite(w)} NaN/Inf values; fix it before quantizing")
    records: dict[str, QuantizedWeight] = {}
    bar = tqdm(groups, desc=f"{method.name} layers", unit="group", disable=not progress)
    for names in bar:
        mods = [modules[n] for n in names]
        stats: list = [None] * len(names)
        if method.needs_calibration:
            pairs = [_stats_for(method, n, m) for n, m in zip(names, mods)]
            stats = [s for s, _ in pairs]
            feeds = [f for _, f in pairs if f is not None]
            if feeds:
                fed = feed_inputs(model, mods[0], batches, lambda x: [f(x) for f in feeds], stop=stop)
                if not fed:
                    raise LowbitError(f"{names[0]}: no calibration input reached this layer")
        weights = [weight_2d(m).float() for m in mods]
        specs = [plan[n] for n in names]
        qws = method.quantize_group(names, weights, specs, stats)
        for n, m, qw in zip(names, mods, qws):
            records[n] = qw
            m.weight.data.copy_(qw.dequantize(m.weight.dtype).reshape(m.weight.shape))  # later layers see it
        del stats
    if swap:
        swap_layers(model, records)
    return records


def swap_layers(model: nn.Module, records: dict[str, QuantizedWeight], kernel: str | None = None) -> None:
    """Replace each quantized Linear / Conv2d by its QuantLinear / QuantConv2d (packed codes)."""
    for name, qw in records.items():
        mod = model.get_submodule(name)
        if isinstance(mod, nn.Conv2d):
            new = QuantConv2d.from_quantized(qw, mod, name=name, kernel=kernel)
        else:
            bias = None if mod.bias is None else mod.bias.detach()
            new = QuantLinear.from_quantized(qw, bias, name=name, kernel=kernel)
        replace_linear(model, name, new)
