"""The export boundary: a `QuantizedModel` (records + the remaining tensors) in, one file format out.

One module per format, each with `write(qm, out, *, overwrite=False, **options) -> Path` (checking
before anything is written that every record fits the format) and, where lowbit reads the format
back, `read(path) -> QuantizedModel`. Writers consume only the quantized-layer records
(`lowbit.core.quantize.QuantizedWeight`), never a kernel's in-memory layout.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.export.model import QuantizedModel

# format name -> module under lowbit.export (imported when used)
FORMATS = {"lowbit": "lowbit", "gptq": "gptq", "awq": "awq", "compressed-tensors": "compressed_tensors",
           "bnb-nf4": "bnb", "gguf": "gguf"}
# a folder's config.json quantization_config.quant_method -> format name
QUANT_METHODS = {"lowbit": "lowbit", "gptq": "gptq", "awq": "awq", "compressed-tensors": "compressed-tensors",
                 "bitsandbytes": "bnb-nf4"}


def format_module(name: str):
    if name not in FORMATS:
        raise LowbitError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}")
    try:
        return importlib.import_module(f"lowbit.export.{FORMATS[name]}")
    except ModuleNotFoundError as e:
        if e.name == f"lowbit.export.{FORMATS[name]}":
            raise LowbitError(f"format {name!r} is not available in this lowbit version") from None
        raise


def detect_format(path: str | Path) -> str | None:
    """The quantized format of a checkpoint folder (by its manifest or config's quantization_config),
    "gguf" for a .gguf file, or None for a plain model."""
    path = Path(path)
    if path.is_file():
        return "gguf" if path.suffix == ".gguf" else None
    if (path / "lowbit.json").is_file():
        return "lowbit"
    config = path / "config.json"
    if not config.is_file():
        return None
    try:
        q = json.loads(config.read_text()).get("quantization_config") or {}
    except ValueError as e:
        raise LowbitError(f"{config} is not valid JSON ({e})") from None
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method is None:
        return None
    if method not in QUANT_METHODS:
        raise LowbitError(f"{path} holds a {method!r} checkpoint; lowbit reads "
                          f"{', '.join(sorted(QUANT_METHODS))} checkpoints")
    return QUANT_METHODS[method]


def write(qm: QuantizedModel, out: str | Path, fmt: str, *, overwrite: bool = False, **options) -> Path:
    return format_module(fmt).write(qm, out, overwrite=overwrite, **options)


def read(path: str | Path, fmt: str | None = None) -> QuantizedModel:
    fmt = fmt or detect_format(path)
    if fmt is None:
        raise LowbitError(f"{path} is not a quantized checkpoint lowbit can read")
    module = format_module(fmt)
    if not hasattr(module, "read"):
        raise LowbitError(f"lowbit cannot read {fmt!r} checkpoints back")
    return module.read(path)


__all__ = ["FORMATS", "QuantizedModel", "detect_format", "format_module", "read", "write"]
