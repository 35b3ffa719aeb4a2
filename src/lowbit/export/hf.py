"""What the Hugging Face checkpoint formats share: a folder of config.json (with its
`quantization_config`), tokenizer files and safetensors weights, written atomically; read back with
the quantization_config taken off the config (the records carry the quantization).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from lowbit.errors import LowbitError
from lowbit.export.model import QuantizedModel
from lowbit.io.atomic import atomic_dir, check_output_dir
from lowbit.io.tensor_file import write_safetensors

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"


def require(ok: bool, name: str, fmt: str, why: str) -> None:
    """One error naming the layer, what the format holds and what would fit."""
    if not ok:
        raise LowbitError(f"{name}: the {fmt} format cannot hold this layer: {why}")


def exact_fp16(t: torch.Tensor, name: str, fmt: str, what: str = "scales") -> torch.Tensor:
    """t as float16, refusing values float16 cannot hold exactly (nothing is re-rounded on export)."""
    out = t.detach().to(torch.float16)
    require(torch.equal(out.float(), t.detach().float()), name, fmt,
            f"its {what} ({t.dtype}) are not exactly representable in float16; quantize with scale_dtype='float16'")
    return out


def write_folder(qm: QuantizedModel, out: str | Path, overwrite: bool, quantization_config: dict,
                 tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> Path:
    """config.json (+ quantization_config), tokenizer, model.safetensors (`tensors` plus every
    non-quantized tensor of `qm`; floating ones cast to `dtype` when given), atomically."""
    out = check_output_dir(out, overwrite)
    all_tensors = dict(tensors)
    for key, value in qm.tensors.items():
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        all_tensors[key] = value.contiguous()
    config = qm.config
    saved = {k: getattr(config, k, None) for k in ("quantization_config", "dtype")}
    with atomic_dir(out) as tmp:
        config.quantization_config = quantization_config
        if dtype is not None:
            config.dtype = dtype
        try:
            config.save_pretrained(tmp)
        finally:
            for k, v in saved.items():
                if v is None and hasattr(config, k):
                    delattr(config, k)
                elif v is not None:
                    setattr(config, k, v)
        if qm.tokenizer is not None:
            qm.tokenizer.save_pretrained(tmp)
        write_safetensors(tmp / WEIGHTS, all_tensors, metadata={"format": "pt"})
    log.info("saved %d quantized layers to %s", len(qm.layers), out)
    return out


def read_folder(path: str | Path) -> tuple[object, dict, dict[str, torch.Tensor], object]:
    """(config without quantization_config, the quantization_config dict, all tensors, tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer

    from lowbit.models.arch import arch_for
    from lowbit.models.validate import check_safetensors

    path = Path(path)
    if not (path / "config.json").is_file():
        raise LowbitError(f"{path} has no config.json")
    index = path / f"{WEIGHTS}.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise LowbitError(f"{index} is not a valid safetensors index ({e})") from None
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise LowbitError(f"{path} holds no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        check_safetensors(path / name)
        tensors.update(load_file(str(path / name)))
    config = AutoConfig.from_pretrained(path)
    q = getattr(config, "quantization_config", None)
    q = q.to_dict() if hasattr(q, "to_dict") else dict(q or {})
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    arch_for(config)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return config, q, tensors, tokenizer


def open_checkpoint(path: str | Path, quant_method: str, suffix: str, what: str):
    """read_folder for a reader of one format: (config, quantization_config, tensors, tokenizer,
    names of the modules that own `<name>.<suffix>`), refusing another quant_method or a folder
    without such tensors, naming `what` the format is."""
    config, q, tensors, tokenizer = read_folder(path)
    if q.get("quant_method") != quant_method:
        raise LowbitError(f"{path} is not {what} checkpoint (quant_method {q.get('quant_method')!r})")
    names = module_names(tensors, suffix)
    if not names:
        raise LowbitError(f"{path}: no '*.{suffix}' tensors in {what} checkpoint")
    return config, q, tensors, tokenizer, names


def module_names(tensors: dict, suffix: str) -> list[str]:
    """Names of the modules that own a tensor `<name>.<suffix>`."""
    tail = "." + suffix
    return sorted(k[: -len(tail)] for k in tensors if k.endswith(tail))


def take(tensors: dict, key: str, path) -> torch.Tensor:
    try:
        return tensors.pop(key)
    except KeyError:
        raise LowbitError(f"{path}: the checkpoint lacks tensor {key!r}") from None
