"""Measure every quantizable decoder Linear under every candidate option (GPTQ by default).

Block by block as the pipeline does (`calibration.capture`): one forward of the block over the
calibration inputs gathers each Linear's Hessian (shared by the Linears that read the same
input, and by every option), then each sequential group runs once per option with the method's
own group quantizer (GPTQ stacks q/k/v and gate/up). The next block's inputs are this block's
outputs with the original weights: the measurement does not depend on a plan not made yet.
For each layer the artifact records each option's exact storage bits and relative output error,
and the layer's sensitivity (`mixed.sensitivity`). It is saved after every block; a rerun with
the same model, data and options resumes or reuses it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lowbit.algorithms.hessian import output_error
from lowbit.calibration.capture import BlockInputs, capture_first_block_inputs, run_block
from lowbit.core.cpu_features import compute_dtype
from lowbit.core.quantize import QuantizedWeight, quantize
from lowbit.errors import LowbitError
from lowbit.export.lowbit import layer_tensors
from lowbit.methods import get_method
from lowbit.mixed.artifact import Measurement, default_measurement_path, load_measurement, measurement_key
from lowbit.mixed.options import Option, candidate_options, option_spec
from lowbit.mixed.sensitivity import OutputProbe
from lowbit.models.arch import arch_for, blocks_of, get_module
from lowbit.pipeline import working_copy

log = logging.getLogger(__name__)

PROBE = option_spec(4, 0, symmetric=False)  # round-to-nearest int4 asym per channel: fits every layer


def storage_bits(name: str, qw: QuantizedWeight) -> int:
    """Bits the layer takes in lowbit's checkpoint: packed codes, scales, zeros, g_idx."""
    return sum(t.numel() * t.element_size() * 8 for t in layer_tensors(name, qw).values())


def option_bits(opt: Option, name: str, qw: QuantizedWeight) -> int:
    """The layer's bits under `opt`: the option's fixed bits per weight (GGUF blocks) when it has
    one, else lowbit's checkpoint storage (`storage_bits`)."""
    if opt.bits_per_weight is not None:
        return round(qw.codes.numel() * opt.bits_per_weight)
    return storage_bits(name, qw)


def _method(method: str, method_options: dict | None):
    m = get_method(method, method_options or {})
    if not m.needs_calibration or not hasattr(m, "make_stats"):
        raise LowbitError(f"mixed precision measures with a calibrated method (gptq); got {method!r}")
    return m


def _block_hessians(method, work, prefix: str, names: list[str], inputs: BlockInputs):
    """One forward of the working copy: each Linear's statistics, and the block's outputs."""
    method.prepare_block(work, None, None, {}, search=work)  # a fresh pool of shared Hessians
    stats = {n: method.make_stats(f"{prefix}.{n}", get_module(work, n)) for n in names}

    def hook(n):
        return lambda _mod, args: stats[n].add(args[0])

    handles = [get_module(work, n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        outputs = run_block(work, inputs)
    finally:
        for h in handles:
            h.remove()
    return stats, outputs


def _measure_block(method, block, work, prefix: str, arch, inputs: BlockInputs, options: tuple[Option, ...],
                   probe: OutputProbe | None, index: int, bar) -> tuple[dict, list[torch.Tensor]]:
    names = [n for g in arch.sequential for n in g]
    stats, outputs = _block_hessians(method, work, prefix, names, inputs)
    layers: dict[str, dict] = {}
    for group in arch.sequential:
        group = list(group)
        mods = [get_module(block, n) for n in group]
        weights = [m.weight.detach().float() for m in mods]
        for n, m in zip(group, mods):
            layers[f"{prefix}.{n}"] = {"block": index, "params": m.weight.numel(), "in_features": m.in_features,
                                       "bits": {}, "error": {}}
        for opt in options:
            fits = [o for o in group if opt.fits(get_module(block, o).in_features)]
            if len(fits) == len(group):
                full = [f"{prefix}.{n}" for n in group]
                records = method.quantize_group(full, weights, [opt.spec] * len(group), [stats[n] for n in group])
                for f, qw in zip(full, records):
                    layers[f]["bits"][opt.name] = option_bits(opt, f, qw)
                    layers[f]["error"][opt.name] = float(qw.error)
            bar.update(1)
        for n, W in zip(group, weights):
            full = f"{prefix}.{n}"
            q = quantize(W, PROBE).dequantize()
            layers[full]["probe_error"] = output_error(W, q, stats[n].H)
            if probe is not None:
                kl = probe.kl_with_weight(index, full, q)
                layers[full]["kl"] = kl
                pe = layers[full]["probe_error"]
                layers[full]["sensitivity"] = kl / pe if pe > 0 else 0.0
        for n in group:
            stats[n] = None
    return layers, outputs


def measure(model, calib_ids: torch.Tensor, sens_ids: torch.Tensor, *, options=None, method: str = "gptq",
            method_options: dict | None = None, path: str | Path | None = None, progress: bool = True,
            calib_dtype: torch.dtype | None | str = "auto") -> Measurement:
    """Measure `model` (fully loaded, left unchanged) or reuse/resume the artifact at `path`
    (default: the cache, named by the measurement's key). `calib_ids` [n, seq] feed the Hessians;
    `sens_ids` [m, seq] (a few short calibration windows) the sensitivity probes."""
    options = tuple(options or candidate_options())
    if calib_dtype == "auto":  # bfloat16 where this CPU multiplies it natively (core.cpu_features)
        calib_dtype = compute_dtype()
    m = _method(method, method_options)
    arch = arch_for(model)
    blocks = blocks_of(model, arch)
    key = measurement_key(model, calib_ids, sens_ids, options, extra=f"{calib_dtype}|{m.fingerprint()}|{PROBE}")
    path = Path(path) if path is not None else default_measurement_path(key)
    meas = None
    if path.is_file():
        meas = load_measurement(path)
        if meas.key != key:
            log.warning("%s holds a measurement of other inputs; measuring again", path)
            meas = None
        elif meas.complete:
            log.info("reusing the measurement %s", path)
            return meas
    if meas is None:
        meas = Measurement(key=key, n_blocks=len(blocks), options={o.name: o.spec for o in options},
                           meta={"method": m.fingerprint(), "calib": list(calib_ids.shape),
                                 "sensitivity_windows": list(sens_ids.shape), "probe": PROBE.describe(),
                                 "source": str(getattr(model.config, "_name_or_path", ""))})
    started = time.perf_counter()
    inputs, kwargs = capture_first_block_inputs(model, arch, calib_ids, dtype=calib_dtype)
    probe = OutputProbe(model, arch, sens_ids)
    per_block = len(arch.sequential) * len(options)
    bar = tqdm(total=len(blocks) * per_block, initial=meas.blocks_done * per_block, disable=not progress,
               desc="measure (GPTQ runs)", unit="run")
    try:
        for i, block in enumerate(blocks):
            prefix = f"{arch.blocks}.{i}"
            inputs = BlockInputs(inputs.hidden, kwargs[i])
            work = working_copy(block, calib_dtype)
            if i < meas.blocks_done:  # measured before: only its outputs are needed
                inputs = BlockInputs(run_block(work, inputs), inputs.kwargs)
                continue
            layers, outputs = _measure_block(m, block, work, prefix, arch, inputs, options, probe, i, bar)
            inputs = BlockInputs(outputs, inputs.kwargs)
            meas.layers.update(layers)
            meas.blocks_done = i + 1
            meas.meta["seconds"] = round(meas.meta.get("seconds", 0.0) + time.perf_counter() - started, 1)
            started = time.perf_counter()
            meas.save(path)
    finally:
        bar.close()
    log.info("measurement saved to %s", path)
    return meas


SENS_WINDOWS, SENS_LEN = 2, 128


def measurement_inputs(tokenizer, calib_text: str | None = None, n_samples: int = 32, seq_len: int = 512,
                       sens_windows: int = SENS_WINDOWS, sens_len: int = SENS_LEN):
    """(calibration ids, sensitivity ids), both from the calibration split of `calib_text` (pydoc
    by default; never the evaluation split), the sensitivity windows drawn with another seed."""
    from lowbit.calibration import calibration_batches, load_text

    text = load_text(calib_text or "pydoc").calibration
    return (calibration_batches(tokenizer, text, n_samples, seq_len),
            calibration_batches(tokenizer, text, sens_windows, sens_len, seed=1))
