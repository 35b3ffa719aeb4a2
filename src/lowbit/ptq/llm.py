"""Activation quantization of a Hugging Face causal LM (the Llama family lowbit knows): optional
SmoothQuant, then W8A8 (dynamic / static) through prepare -> calibrate -> convert, or W4A8 (GPTQ
W4 per-channel weights run in the int8 kernel with dynamic int8 activations); and the lowbit
checkpoint that holds the result (records + per-layer schemes + static activation scales)."""

from __future__ import annotations

import logging

import torch

from lowbit.errors import LowbitError
from lowbit.nn.int8_linear import ACT_TENSORS, Int8Linear
from lowbit.nn.replace import replace_linear
from lowbit.ptq.calibrate import calibrate
from lowbit.ptq.config import PTQConfig
from lowbit.ptq.convert import convert
from lowbit.ptq.prepare import prepare
from lowbit.ptq.smooth_search import sample_inputs, search_clip
from lowbit.ptq.smoothquant import smooth
from lowbit.spec import LayerScheme, scheme

log = logging.getLogger(__name__)


def block_linears(model) -> list[str]:
    from lowbit.models.arch import arch_for, blocks_of

    arch = arch_for(model)
    return [f"{arch.blocks}.{i}.{n}" for i, _ in enumerate(blocks_of(model, arch)) for n in arch.linears]


def quantize_llm(model, scheme_name: str, calib_ids: torch.Tensor | None, *, observer: str | None = None,
                 smoothquant: float | str | None = None, clip_search: bool = False, batch_size: int = 4,
                 progress: bool = True):
    """In place; returns the model with Int8Linear in every decoder-block Linear (lm_head stays).
    smoothquant: alpha in [0, 1], or "auto" to search it per smoothing pair for this scheme.
    clip_search (static per-tensor schemes): each layer's calibrated input range is then shrunk by
    the factor whose int8 output is closest to the float output on sampled calibration inputs."""
    s = scheme(scheme_name, observer)
    targets = block_linears(model)
    if clip_search and (s.input.dynamic or s.input.granularity != "tensor" or not s.input.symmetric):
        raise LowbitError(f"clip_search applies to static symmetric per-tensor inputs; {scheme_name} has "
                          f"{s.input.describe()}")
    needs_data = smoothquant is not None or not s.input.dynamic or scheme_name == "w4a8"
    if needs_data and calib_ids is None:
        raise LowbitError(f"scheme {scheme_name}{' with SmoothQuant' if smoothquant is not None else ''} needs "
                          "calibration text")
    batches = [] if calib_ids is None else list(calib_ids.split(batch_size))
    if smoothquant is not None:
        alphas: dict = {}
        smooth(model, batches, smoothquant, dynamic=s.input.dynamic, alphas=alphas)
        if alphas:
            log.info("SmoothQuant alphas searched per pair: %s", alphas)
    if scheme_name == "w4a8":
        return _w4a8(model, s, calib_ids, progress)
    samples = sample_inputs(model, targets, batches) if clip_search else {}
    weights = {n: model.get_submodule(n).weight.detach().float() for n in samples}
    prepare(model, PTQConfig(s, targets=tuple(targets)))
    if not s.input.dynamic:
        calibrate(model, batches, progress=progress)
    convert(model)
    if clip_search:
        clips = {}
        for name, x in samples.items():
            mod = model.get_submodule(name)
            c, _ = search_clip(x, [weights[name]], mod.input_scale * s.input.qmax)
            mod.input_scale = mod.input_scale * c
            mod._after_apply()
            clips[name] = c
        log.info("static input ranges clipped per layer: %s", clips)
    return model


def _w4a8(model, s: LayerScheme, calib_ids, progress):
    from lowbit.methods import get_method
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    records = quantize_model(model, Recipe(spec=s.weight, method="gptq"), get_method("gptq"), calib_ids,
                             progress=progress)
    plan = {}
    for name in records:
        qw = records[name]
        old = model.get_submodule(name)
        replace_linear(model, name, Int8Linear.from_record(qw, getattr(old, "bias", None), s, name=name))
        plan[name] = s.to_dict()
    model._lowbit_converted = {"plan": plan, "folded": []}
    return model


def to_quantized_model(model, tokenizer, **meta):
    """The converted model as a QuantizedModel for `export.lowbit.write`: each Int8Linear's weight
    record, its static activation scales as `<name>.input_scale` etc., and its scheme in
    meta["schemes"]."""
    from lowbit.export.model import QuantizedModel

    layers, extra, schemes = {}, {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, Int8Linear):
            layers[name] = mod.record()
            schemes[name] = mod.scheme.to_dict()
            for t in ACT_TENSORS:
                v = getattr(mod, t)
                if v is not None:
                    extra[f"{name}.{t}"] = v.detach().clone()
    if not layers:
        raise LowbitError("the model holds no Int8Linear layers to save")
    qm = QuantizedModel.from_model(model, tokenizer, layers, schemes=schemes, **meta)
    qm.tensors.update(extra)
    return qm


def quantize_act_to(model_source: str, out, scheme_name: str, *, observer: str | None = None,
                    smoothquant: float | str | None = None, calib_text: str | None = None, n_samples: int = 64,
                    seq_len: int = 512, overwrite: bool = False, progress: bool = True):
    """`lowbit quantize MODEL --scheme ...`: check everything that can be checked before loading,
    load, quantize, save atomically to `out` (when given); returns (model, tokenizer)."""
    from lowbit.calibration import calibration_batches, load_text
    from lowbit.export.lowbit import write
    from lowbit.models import load_model
    from lowbit.models.arch import arch_for
    from lowbit.pipeline import check_finite
    from lowbit.preflight import check_counts, check_source_and_output
    from lowbit.ptq.smoothquant import check_alpha

    s = scheme(scheme_name, observer)  # unknown scheme / observer: before any work
    if smoothquant is not None:
        check_alpha(smoothquant)
    check_counts(n_samples=n_samples, seq_len=seq_len)
    check_source_and_output(model_source, out, overwrite)
    needs_data = smoothquant is not None or not s.input.dynamic or scheme_name == "w4a8"
    split = load_text(calib_text or "pydoc") if needs_data else None
    model, tokenizer = load_model(model_source)
    arch_for(model)
    check_finite(model, block_linears(model))
    calib = None if split is None else calibration_batches(tokenizer, split.calibration, n_samples, seq_len)
    quantize_llm(model, scheme_name, calib, observer=observer, smoothquant=smoothquant, progress=progress)
    if out is not None:
        qm = to_quantized_model(model, tokenizer, method=scheme_name, source=str(model_source),
                                observer=None if s.input.dynamic else s.input.observer, smoothquant=smoothquant,
                                calibration=(calib_text or "pydoc") if split is not None else None)
        write(qm, out, overwrite=overwrite)
    return model, tokenizer
