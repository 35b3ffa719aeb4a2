"""The Python API under the CLI: quantize a model end to end and save it; load a checkpoint.

    import lowbit
    model, tok = lowbit.quantize("default", method="gptq", bits=4, group_size=64, out="out/w4g64")
    model, tok = lowbit.load("out/w4g64")
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from lowbit.calibration import calibration_batches
from lowbit.calibration.resume import claim_state_dir, default_state_dir
from lowbit.errors import LowbitError
from lowbit.export.model import QuantizedModel
from lowbit.methods import get_method
from lowbit.recipe import Recipe
from lowbit.spec import QuantSpec

log = logging.getLogger(__name__)


def make_spec(bits: int, group_size: int | None, symmetric: bool, dtype: str = "int",
              integer_zero: bool = True) -> QuantSpec:
    if dtype == "int" and not 2 <= bits <= 8:
        raise LowbitError(f"--bits {bits} is outside 2..8")
    common = dict(bits=bits, dtype=dtype, symmetric=symmetric, integer_zero=integer_zero)
    if dtype in ("nf4", "fp4"):
        common["bits"] = 4
    elif dtype.startswith("fp8"):
        common["bits"] = 8
    if group_size is None or group_size <= 0:
        return QuantSpec(granularity="channel", **common)
    return QuantSpec(granularity="group", group_size=group_size, **common)


def head_spec(head_bits: int, group_size: int | None) -> QuantSpec:
    """lm_head's spec for `--head-bits`: 8-bit symmetric per channel (the int8 kernel), or fewer bits
    with the body's group size."""
    if head_bits == 8:
        return make_spec(8, None, True)
    return make_spec(head_bits, group_size, True)


def embed_spec(embed_bits: int | None) -> QuantSpec | None:
    """The input embedding's spec for `--embed-bits`: symmetric int8 in groups of 32 with float16
    scales (llama.cpp's Q8_0, which its Q4_0 models keep token_embd at)."""
    if embed_bits is None:
        return None
    if embed_bits != 8:
        raise LowbitError(f"--embed-bits {embed_bits}: the embedding table is held as int8 only (--embed-bits 8)")
    return make_spec(8, 32, True)


def make_recipe(*, method: str = "gptq", bits: int = 4, group_size: int | None = 64, symmetric: bool = True,
                dtype: str = "int", integer_zero: bool = True, quantize_head: bool = False,
                head_bits: int | None = None, ignore: tuple[str, ...] = (), options: dict | None = None,
                embed_bits: int | None = None) -> Recipe:
    """`head_bits` quantizes lm_head too, at its own bit width (quantize_head: at the body's spec);
    `embed_bits` (8) holds the input embedding as an int8 table (`embed_spec`)."""
    recipe = Recipe(spec=make_spec(bits, group_size, symmetric, dtype, integer_zero), method=method,
                    ignore=tuple(ignore), quantize_head=quantize_head or head_bits is not None,
                    head_spec=None if head_bits is None else head_spec(head_bits, group_size),
                    options=dict(options or {}), embed_spec=embed_spec(embed_bits))
    get_method(recipe.method, recipe.options)  # unknown or mistyped options fail before any work
    return recipe


def quantize_to(model_source: str, out: str | Path | None, recipe: Recipe, *, calib_text: str | None = None,
                n_samples: int = 64, seq_len: int = 512, overwrite: bool = False, progress: bool = True,
                state_dir: str | Path | None = None, fmt: str = "lowbit", format_options: dict | None = None,
                record_stats: bool = False, meta: dict | None = None):
    """Load, quantize per recipe, save atomically to `out` (if given) in format `fmt`; returns
    (model, tokenizer).

    record_stats: store the run's wall time and the process's peak RSS in the checkpoint's
    metadata (`quantize_stats`, for `lowbit report`); off by default, since it makes the same
    inputs give different files. meta: extra manifest entries (e.g. `lowbit fit`'s `kv_cache`).

    calib_text: None is the stdlib pydoc text for methods that need calibration (a text given to
    one that does not is a warning). A calibrated run writing `out` keeps its state beside it
    (`.OUT.lowbit-state`, removed after the save) unless `state_dir` is given, so rerunning an
    interrupted call resumes."""
    from lowbit.export import format_module
    from lowbit.models import load_model
    from lowbit.pipeline import quantize_model
    from lowbit.preflight import check_quantize_args

    import time

    started = time.perf_counter()
    writer = format_module(fmt)  # an unknown format fails before any work
    method = get_method(recipe.method, recipe.options)
    split = check_quantize_args(model_source, out, recipe, method, calib_text=calib_text, n_samples=n_samples,
                                seq_len=seq_len, overwrite=overwrite)  # refuse before any work
    model, tokenizer = load_model(model_source, lazy=True)  # blocks read from disk as the pipeline reaches them
    if hasattr(writer, "plan_recipe"):  # the format's own grid (e.g. gguf type=Q4_K), checked before any work
        recipe = writer.plan_recipe(recipe, model, **(format_options or {}))
    if recipe.embed_spec is not None:  # refused before a state folder or any calibration work exists
        from lowbit.models.arch import arch_for

        recipe.plan(model, arch_for(model))
    calib = None
    if split is not None:
        calib = calibration_batches(tokenizer, split.calibration, n_samples, seq_len)
    own_state = state_dir is None and out is not None and calib is not None
    if own_state:
        state_dir = claim_state_dir(default_state_dir(out), {"source": str(model_source), "recipe": repr(recipe),
                                                             "calib": calib_text or "pydoc", "samples": n_samples,
                                                             "seq_len": seq_len})
    records = quantize_model(model, recipe, method, calib, progress=progress, state_dir=state_dir)
    if out is not None:
        stats = {"quantize_stats": run_stats(started)} if record_stats else {}
        qm = QuantizedModel.from_model(model, tokenizer, records, method=recipe.method,
                                       options=dataclasses.asdict(method.options), source=str(model_source),
                                       calibration=(calib_text or "pydoc") if calib is not None else None, **stats,
                                       **(meta or {}))
        writer.write(qm, out, overwrite=overwrite, **(format_options or {}))
    if own_state:
        shutil.rmtree(state_dir, ignore_errors=True)
    return model, tokenizer


def run_stats(started: float) -> dict:
    """Seconds since `started` (time.perf_counter) and this process's peak resident memory so far."""
    import resource
    import time

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"seconds": round(time.perf_counter() - started, 2), "peak_rss_bytes": int(peak_kib) * 1024}


def quantize(model: str = "default", *, method: str = "gptq", bits: int = 4, group_size: int | None = 64,
             symmetric: bool = True, dtype: str = "int", quantize_head: bool = False, head_bits: int | None = None,
             ignore: tuple[str, ...] = (),
             options: dict | None = None, recipe: Recipe | str | Path | None = None, out: str | Path | None = None,
             calib: str | None = None, samples: int = 64, seq_len: int = 512, overwrite: bool = False,
             state_dir: str | Path | None = None, progress: bool = True, format: str = "lowbit",
             format_options: dict | None = None, record_stats: bool = False):
    """Quantize `model` (a folder, .gguf, hub name or "default") as `lowbit quantize` does and save it
    to `out` when given; returns (model, tokenizer) with QuantLinear kernels in place.

    `recipe` (a Recipe or a YAML path) replaces method/bits/group_size/symmetric/dtype/...;
    `options` are the method's options (e.g. {"damp": 0.02} for GPTQ), checked before any work;
    `format` one of `lowbit.export.FORMATS` (with `format_options`, e.g. {"type": "Q4_0"} for gguf).
    """
    from lowbit.recipe import load_recipe

    if recipe is None:
        recipe = make_recipe(method=method, bits=bits, group_size=group_size, symmetric=symmetric, dtype=dtype,
                             quantize_head=quantize_head, head_bits=head_bits, ignore=ignore, options=options)
    elif not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return quantize_to(model, out, recipe, calib_text=calib, n_samples=samples, seq_len=seq_len,
                       overwrite=overwrite, progress=progress, state_dir=state_dir, fmt=format,
                       format_options=format_options, record_stats=record_stats)


def quantize_module(model, batches=None, *, method: str = "gptq", bits: int = 4, group_size: int | None = None,
                    symmetric: bool = True, dtype: str = "int", ignore: tuple[str, ...] = (),
                    options: dict | None = None, recipe: Recipe | str | Path | None = None, swap: bool = True,
                    progress: bool = True, target_bpw: float | None = None):
    """Weight-quantize any nn.Module (a CNN, an encoder, ...) in place; returns {layer: record}.

    Its nn.Linear and nn.Conv2d layers (groups=1) are quantized in the order a forward of the first
    batch runs them, each on inputs from the already-quantized layers before it; other layers
    holding weights are listed in a warning and stay in full precision. `batches`: calibration
    inputs, each a tensor (`model(x)`), a tuple (`model(*x)`) or a mapping (`model(**x)`, e.g. a
    tokenizer's output); calibrated methods (gptq) need them. `group_size` None is per output
    channel; a layer whose inputs the group size does not divide (a first conv's 9 or 27 patch
    values) is quantized per channel with a warning. With `swap` the layers become QuantLinear /
    QuantConv2d (packed codes, lowbit's kernels).

        records = lowbit.quantize_module(cnn, list(calib.split(64)), method="gptq", bits=4)

    `target_bpw`: mixed precision instead of one spec: each layer's option among bits {2, 3, 4, 8} x
    {g32, g64, g128, per channel} chosen so that the total storage (scales and zeros included) stays
    within `target_bpw` bits per weight with the least predicted output error (`mixed.module`).
    """
    from lowbit.module_pipeline import quantize_module as run
    from lowbit.recipe import load_recipe

    if target_bpw is not None:
        from lowbit.mixed.apply import check_target
        from lowbit.mixed.module import measure_module, plan_module_recipe

        if recipe is not None:
            raise LowbitError("quantize_module: give either recipe= or target_bpw=, not both")
        check_target(target_bpw)
        meas = measure_module(model, batches or [], method=method, method_options=options, ignore=tuple(ignore),
                              progress=progress)
        recipe, _ = plan_module_recipe(meas, target_bpw, method=method, options=options, ignore=tuple(ignore))
    if recipe is None:
        recipe = make_recipe(method=method, bits=bits, group_size=group_size, symmetric=symmetric, dtype=dtype,
                             ignore=ignore, options=options)
    elif not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return run(model, recipe, get_method(recipe.method, recipe.options), batches, swap=swap, progress=progress)


def load(path: str | Path):
    """(model, tokenizer) from a lowbit checkpoint (QuantLinear kernels), or any model `lowbit`
    loads (folder, .gguf, "default"); an encoder saved by `lowbit quantize` (a module checkpoint)
    comes back through `lowbit.models.encoder.load_encoder`."""
    from lowbit.export.module_checkpoint import MANIFEST
    from lowbit.models import load_model

    if (Path(path).expanduser() / MANIFEST).is_file():
        from lowbit.models.encoder import load_encoder

        return load_encoder(Path(path).expanduser())
    return load_model(str(path))
