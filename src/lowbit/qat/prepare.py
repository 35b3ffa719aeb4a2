"""prepare_qat(model, config): fold BatchNorm, plan {module: scheme}, swap in FakeQuantLayers
initialised from min-max, from PTQ records (hybrid: GPTQ / AWQ / RTN weights and scales) and,
for static activation specs, from calibration observers."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from torch import nn

from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.nn.replace import replace_linear
from lowbit.observers.state import RangeState
from lowbit.ptq.fold_bn import fold_batchnorm, sequential_pairs
from lowbit.ptq.calibrate import watch_inputs
from lowbit.ptq.observe import features_last
from lowbit.ptq.prepare import plan_modules
from lowbit.qat.config import QATConfig
from lowbit.qat.fake_quant_layer import FakeQuantLayer

log = logging.getLogger(__name__)
ATTR = "_lowbit_qat"


def _observe_inputs(model: nn.Module, plan: dict, config: QATConfig, calib: Iterable | None) -> dict:
    """{name: (scale, zero)} of each static input spec from calibration batches (the PTQ observers)."""
    static = {n: s for n, s in plan.items() if s.input is not None and not s.input.dynamic}
    if not static:
        return {}
    if calib is None:
        raise LowbitError(f"{next(iter(static))}: a static activation spec needs calibration batches to start its "
                          "range; pass calib=[...] to prepare_qat (or use a dynamic scheme)")
    states = {name: RangeState(s.input, name, config.max_values, config.percentile) for name, s in static.items()}

    def on_input(name, x):
        states[name].update(features_last(model.get_submodule(name), x, name))

    watch_inputs(model, list(states), calib, on_input)
    return {name: st.qparams() for name, st in states.items()}


def prepare_qat(model: nn.Module, config: QATConfig, init: Mapping[str, QuantizedWeight] | None = None,
                calib: Iterable | None = None) -> nn.Module:
    """In place; returns the model with each planned Linear / Conv2d a FakeQuantLayer.

    init: PTQ records by module name (`lowbit.quantize_module(..., swap=False)` or the LLM
    pipeline's records): the layer starts from the record's dequantized weights, scales and zeros
    (act-order g_idx kept), so step 0 is the PTQ model exactly. calib: batches for the static
    activation ranges (run through the model before the swap). Train, then `convert_qat`."""
    if getattr(model, ATTR, None) is not None:
        raise LowbitError(f"{type(model).__name__} is already prepared for QAT; convert_qat() it or start fresh")
    folded = []
    init = dict(init or {})
    if config.fold_bn:
        pairs = [*sequential_pairs(model), *config.bn_pairs]
        clash = [conv for conv, _ in pairs if conv in init]
        if clash:
            raise LowbitError(f"{clash[0]}: its PTQ record is of the conv before BatchNorm folding; fold first "
                              "(lowbit.ptq.fold_bn.fold_batchnorm(model.eval())), then quantize and prepare_qat")
        if pairs:
            was_training = model.training
            model.eval()
            folded = fold_batchnorm(model, pairs)
            model.train(was_training)
    plan = plan_modules(model, config)
    unknown = [n for n in init if n not in plan]
    if unknown:
        raise LowbitError(f"PTQ records for {unknown[:3]} match no module QAT trains; quantize the same modules")
    act = _observe_inputs(model, plan, config, calib)
    for name, s in plan.items():
        mod = model.get_submodule(name)
        layer = FakeQuantLayer(mod, s, name, config.weight_range, config.learn_zero, init.get(name))
        layer.to(mod.weight.device)
        if name in act:
            layer.set_input_range(*act[name], learn=config.act_range == "lsq")
        replace_linear(model, name, layer)
    log.info("QAT: %d modules fake-quantized (%d from PTQ records), %d BatchNorms folded", len(plan), len(init),
             len(folded))
    object.__setattr__(model, ATTR, {"plan": plan, "folded": folded})
    return model


def qat_layers(model: nn.Module) -> dict[str, FakeQuantLayer]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLayer)}
    if not layers:
        raise LowbitError(f"{type(model).__name__} has no fake-quantized layer; call lowbit.qat.prepare_qat first")
    return layers


def qat_parameters(model: nn.Module, train_weights: bool = True, train_bias: bool = True) -> tuple[list, list]:
    """(weights, quantization parameters) of the fake-quantized layers; every other parameter of
    the model is frozen (requires_grad False)."""
    layers = qat_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    weights, qparams = [], []
    for layer in layers.values():
        if train_weights:
            weights.append(layer.weight)
        if train_bias and layer.bias is not None:
            weights.append(layer.bias)
        for p, learn in ((layer.weight_scale, layer.weight_range == "lsq"),
                         (layer.weight_zero, getattr(layer, "_learn_zero", False)),
                         (layer.input_scale, getattr(layer, "_learn_input", False))):
            if p is not None and learn:
                qparams.append(p)
    for p in (*weights, *qparams):
        p.requires_grad_(True)
    return weights, qparams
