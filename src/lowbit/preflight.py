"""Checks of a quantize run's arguments before any weight is read: counts, the model argument, the
output folder, the calibration text, and the recipe against the layer shapes in config.json. A bad
argument then costs a fraction of a second, not a model load."""

from __future__ import annotations

import logging
from pathlib import Path

from lowbit.calibration.text import TextSplit, check_text_source, load_text
from lowbit.errors import LowbitError
from lowbit.io.atomic import check_output_dir, remove_stale_temporaries
from lowbit.models.loader import default_model_dir, resolve_source
from lowbit.models.validate import check_recipe_fits, read_config

log = logging.getLogger(__name__)


def check_counts(**counts: int) -> None:
    """Each keyword (n_samples=64, seq_len=512, ...) must be a positive integer."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LowbitError(f"{name}={value!r} must be a positive integer")


def check_source_and_output(model_source: str, out, overwrite: bool) -> tuple[str, Path | None]:
    """The model to quantize is not already a lowbit checkpoint; `out` may be written (stale
    temporaries of an interrupted save of it are removed). Returns `resolve_source`'s (kind, path)."""
    kind, path = resolve_source(model_source)
    if kind == "checkpoint":
        raise LowbitError(f"{path} is a lowbit checkpoint, already quantized; quantize the original model instead")
    if out is not None:
        check_output_dir(out, overwrite, protect=(path,) if path is not None else ())
        remove_stale_temporaries(Path(out).expanduser())
    return kind, path


def check_quantize_args(model_source: str, out, recipe, method, *, calib_text: str | None, n_samples: int,
                        seq_len: int, overwrite: bool) -> TextSplit | None:
    """Everything about a quantize run that can be checked without loading the model; returns the
    calibration text's split when the method needs calibration (None otherwise). Stale temporaries
    of an interrupted save of `out` are removed."""
    check_counts(n_samples=n_samples, seq_len=seq_len)
    kind, path = check_source_and_output(model_source, out, overwrite)
    split = None
    if method.needs_calibration:
        split = load_text(calib_text or "pydoc")
    elif calib_text is not None:
        check_text_source(calib_text)
        log.warning("--calib %s is not used: method %r needs no calibration", calib_text, getattr(method, "name", method))
    if kind == "default":
        path = default_model_dir()  # converted once (the first run only)
    if kind in ("default", "folder"):
        check_recipe_fits(recipe, read_config(path))
    return split
