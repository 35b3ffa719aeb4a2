"""lowbit's own checkpoint: one safetensors file + lowbit.json manifest + HF config and tokenizer.

Quantized Linears are stored format-neutrally: `<name>.codes` (codes bit-packed into int32 along
the input dimension, unsigned), `<name>.scale`, optional `<name>.zero`, `<name>.g_idx`, `<name>.bias`.
Everything else is stored as in the Hugging Face state dict.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lowbit.core.packing import pack_bits, unpack_bits
from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_dir, check_output_dir
from lowbit.models.validate import check_safetensors
from lowbit.spec import QuantSpec

log = logging.getLogger(__name__)

FORMAT = "lowbit"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
MANIFEST = "lowbit.json"


def _offset(spec: QuantSpec) -> int:
    return -spec.qmin if spec.dtype == "int" and spec.symmetric else 0


def quantized_tensors(name: str, qw: QuantizedWeight, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    spec = qw.spec
    codes = qw.codes.to(torch.int16) + _offset(spec) if spec.dtype == "int" else qw.codes.view(torch.uint8)
    out = {f"{name}.codes": pack_bits(codes, spec.bits, torch.int32), f"{name}.scale": qw.scale.contiguous()}
    if qw.zero is not None:
        out[f"{name}.zero"] = qw.zero.contiguous()
    if qw.g_idx is not None:
        out[f"{name}.g_idx"] = qw.g_idx.to(torch.int32).contiguous()
    if bias is not None:
        out[f"{name}.bias"] = bias.detach().contiguous()
    return out


def read_quantized(tensors: dict, name: str, spec: QuantSpec, shape: tuple[int, int]) -> tuple[QuantizedWeight, torch.Tensor | None]:
    raw = unpack_bits(tensors[f"{name}.codes"], spec.bits, shape[1])
    if spec.dtype == "int":
        codes = (raw.to(torch.int16) - _offset(spec)).to(torch.int8 if spec.symmetric else torch.uint8)
    else:
        codes = raw
    g_idx = tensors.get(f"{name}.g_idx")
    qw = QuantizedWeight(codes, tensors[f"{name}.scale"], tensors.get(f"{name}.zero"), spec,
                         None if g_idx is None else g_idx.long())
    return qw, tensors.get(f"{name}.bias")


def save_checkpoint(model, tokenizer, out: str | Path, *, method: str, source: str, overwrite: bool = False,
                    extra: dict | None = None, layer_extra: dict | None = None) -> Path:
    """Write the (already swapped) quantized model atomically to `out`.

    `layer_extra` adds per-layer manifest entries (e.g. rel_error and error_floor).
    """
    from lowbit import __version__
    from lowbit.nn import QuantLinear

    out = check_output_dir(out, overwrite)
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    qnames = set()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            qw = mod.to_quantized()
            tensors.update(quantized_tensors(name, qw, mod.bias))
            qnames.add(name)
            layers[name] = {"spec": qw.spec.to_dict(), "shape": list(qw.shape),
                            "bits_per_weight": round(mod.bits_per_weight(), 4), **(layer_extra or {}).get(name, {})}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in qnames or any(key.startswith(q + ".") for q in qnames):
            continue
        if tied and key == "lm_head.weight":
            continue
        tensors[key] = value.detach().contiguous()
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lowbit_version": __version__,
        "method": method, "source": source, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "layers": layers, **(extra or {}),
    }
    with atomic_dir(out) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "producer": "lowbit"})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    log.info("saved %d quantized layers to %s", len(layers), out)
    return out


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise LowbitError(f"{path} is not a lowbit checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except ValueError as e:
        raise LowbitError(f"{file} is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise LowbitError(f"{file} is not a lowbit manifest")
    return manifest


def load_checkpoint(path: str | Path):
    """(model, tokenizer) with QuantLinear modules, exactly as saved."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lowbit.models.arch import arch_for
    from lowbit.nn import QuantLinear
    from lowbit.nn.replace import replace_linear

    path = Path(path)
    manifest = read_manifest(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise LowbitError(f"{path} has no {WEIGHTS}")
    check_safetensors(weights)
    config = AutoConfig.from_pretrained(path)
    arch_for(config)
    tensors = load_file(str(weights))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, info in manifest["layers"].items():
        spec = QuantSpec.from_dict(info["spec"])
        qw, bias = read_quantized(tensors, name, spec, tuple(info["shape"]))
        replace_linear(model, name, QuantLinear.from_quantized(qw, bias))
        for k in [k for k in tensors if k.startswith(name + ".")]:
            del tensors[k]
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise LowbitError(f"{weights} holds tensors the model does not have: {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        _rebuild_buffers(model)
        still_meta = [n for n, p in model.named_parameters() if p.is_meta]
        if still_meta:
            raise LowbitError(f"{weights} lacks tensors for {still_meta[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    model.eval()
    return model, tokenizer


def _rebuild_buffers(model) -> None:
    """Non-persistent buffers (rotary inv_freq) are not saved: rebuild their modules on the CPU."""
    for name, mod in list(model.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)) and hasattr(mod, "config"):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, type(mod)(mod.config))
