"""The Python API under the CLI: quantize a model end to end and save it."""

from __future__ import annotations

import logging
from pathlib import Path

from lowbit.algorithms.registry import get_method
from lowbit.calibration import calibration_batches, load_text
from lowbit.errors import LowbitError
from lowbit.io.atomic import check_output_dir
from lowbit.io.checkpoint import save_checkpoint
from lowbit.models import load_model
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe
from lowbit.spec import QuantSpec

log = logging.getLogger(__name__)


def make_spec(bits: int, group_size: int | None, symmetric: bool, dtype: str = "int",
              integer_zero: bool = True) -> QuantSpec:
    if not 2 <= bits <= 8:
        raise LowbitError(f"--bits {bits} is outside 2..8")
    common = dict(bits=bits, dtype=dtype, symmetric=symmetric, integer_zero=integer_zero)
    if group_size is None or group_size <= 0:
        return QuantSpec(granularity="channel", **common)
    return QuantSpec(granularity="group", group_size=group_size, **common)


def layer_error_report(method, qweights: dict) -> dict:
    """{layer: {rel_error, error_floor}}: relative output error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) on the
    calibration inputs, beside 4^-bits, the MSE floor of a b-bit quantizer of a unit-variance
    Gaussian source. Empty for methods without calibration statistics."""
    errors = getattr(method, "layer_errors", {}) or {}
    return {name: {"rel_error": round(float(e), 6), "error_floor": round(4.0 ** -qweights[name].spec.bits, 6)}
            for name, e in errors.items() if name in qweights}


def quantize(model_source: str, out: str | Path | None, recipe: Recipe, *, calib_text: str = "pydoc",
             n_samples: int = 64, seq_len: int = 512, overwrite: bool = False, progress: bool = True,
             state_dir: str | Path | None = None, low_memory: bool = False):
    """Load, quantize per recipe, save atomically to `out` (if given); returns (model, tokenizer)."""
    if out is not None:
        check_output_dir(out, overwrite)  # refuse before any work
    method = get_method(recipe.method, **recipe.options)
    model, tokenizer = load_model(model_source, lazy=True)  # blocks read from disk as the pipeline reaches them
    calib = None
    if method.needs_calibration:
        split = load_text(calib_text)
        calib = calibration_batches(tokenizer, split.calibration, n_samples, seq_len)
    qweights = quantize_model(model, recipe, method, calib, progress=progress, state_dir=state_dir,
                              low_memory=low_memory)
    if out is not None:
        save_checkpoint(model, tokenizer, out, method=recipe.method, source=str(model_source),
                        overwrite=overwrite, extra={"calibration": calib_text if calib is not None else None},
                        layer_extra=layer_error_report(method, qweights))
    return model, tokenizer
