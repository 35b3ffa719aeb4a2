"""lowbit's own checkpoint: `lowbit.safetensors` + `lowbit.json` + the HF config and tokenizer.

A quantized Linear `name` is stored as `name.codes` (unsigned codes bit-packed into int32 along the
input dimension by `core.packing`; symmetric codes offset by 2**(bits-1)), `name.scale` and
`name.zero` (the spec's scale dtype, float16 by default), `name.g_idx` (act-order) and `name.bias`.
Every other tensor is stored under its Hugging Face name. The weights file is not named
`model.safetensors`, so other loaders (transformers' `from_pretrained`, vLLM) find no weights and
refuse the folder loudly instead of initialising the quantized layers' missing `*.weight` at random;
the config also carries `quantization_config = {"quant_method": "lowbit"}`. Same inputs give
byte-identical files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from lowbit.core.packing import pack_bits, unpack_bits
from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.export.model import QuantizedModel
from lowbit.io import manifest as io_manifest
from lowbit.io.atomic import atomic_dir, check_output_dir
from lowbit.io.tensor_file import SafetensorsReader, write_safetensors
from lowbit.spec import QuantSpec

log = logging.getLogger(__name__)

FORMAT = "lowbit"
FORMAT_VERSION = 2  # 1: float32 scales in model.safetensors, no quantization_config (still read)
WEIGHTS = "lowbit.safetensors"
WEIGHTS_V1 = "model.safetensors"
MANIFEST = "lowbit.json"


def code_offset(spec: QuantSpec) -> int:
    """What turns a record's codes into the unsigned codes that are packed."""
    return -spec.qmin if spec.dtype == "int" and spec.symmetric else 0


def layer_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    spec = qw.spec
    codes = qw.codes.to(torch.int16) + code_offset(spec) if spec.dtype == "int" else qw.codes.view(torch.uint8)
    out = {f"{name}.codes": pack_bits(codes, spec.bits, torch.int32), f"{name}.scale": qw.scale.contiguous()}
    if qw.zero is not None:
        out[f"{name}.zero"] = qw.zero.contiguous()
    if qw.g_idx is not None:
        out[f"{name}.g_idx"] = qw.g_idx.to(torch.int32).contiguous()
    return out


def read_layer(tensors: dict, name: str, spec: QuantSpec, shape: tuple[int, int],
               error: float | None = None) -> QuantizedWeight:
    try:
        raw = unpack_bits(tensors[f"{name}.codes"], spec.bits, shape[1])
        scale = tensors[f"{name}.scale"]
    except KeyError as e:
        raise LowbitError(f"{name}: the checkpoint lacks tensor {e}") from None
    if spec.dtype == "int":
        codes = (raw.to(torch.int16) - code_offset(spec)).to(torch.int8 if spec.symmetric else torch.uint8)
    else:
        codes = raw
    g_idx = tensors.get(f"{name}.g_idx")
    return QuantizedWeight(codes, scale, tensors.get(f"{name}.zero"), spec, None if g_idx is None else g_idx.long(),
                           error)


class LazyLayers(Mapping):
    """{name: record} read from the checkpoint on access, one layer at a time: building kernels from
    it never holds more than one layer's unpacked codes (RSS after loading stays near the model's
    own bytes). Records are not cached; read each one once where that matters."""

    def __init__(self, weights: Path, infos: dict):
        self.file = SafetensorsReader(weights)
        self.infos = infos

    def __getitem__(self, name: str) -> QuantizedWeight:
        info = self.infos[name]
        spec_d = dict(info["spec"])
        keys = [name + s for s in (".codes", ".scale", ".zero", ".g_idx")]
        have = self.file.keys()
        tensors = {k: self.file.get_tensor(k) for k in keys if k in have}
        if "scale_dtype" not in spec_d and f"{name}.scale" in tensors:  # format 1
            spec_d["scale_dtype"] = str(tensors[f"{name}.scale"].dtype).removeprefix("torch.")
        return read_layer(tensors, name, QuantSpec.from_dict(spec_d), tuple(info["shape"]), info.get("rel_error"))

    def __iter__(self):
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)


def _quantization_config() -> dict:
    return {"quant_method": FORMAT, "format_version": FORMAT_VERSION}


def write(qm: QuantizedModel, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write `qm` atomically to the folder `out`."""
    from lowbit import __version__

    out = check_output_dir(out, overwrite)
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    packed = getattr(qm.layers, "packed", None)  # the pipeline's records are held packed already
    for name, qw in qm.layers.items():
        tensors.update(packed(name) if packed else layer_tensors(name, qw))
        layers[name] = {"spec": qw.spec.to_dict(), "shape": list(qw.shape),
                        "bits_per_weight": round(qw.bits_per_weight(), 4),
                        **({} if qw.error is None else {"rel_error": round(float(qw.error), 6),
                                                         "error_floor": round(4.0 ** -qw.spec.bits, 6)})}
    for key, value in qm.tensors.items():
        tensors[key] = value.detach().contiguous()
    meta = {k: v for k, v in qm.meta.items()
            if k not in ("format", "format_version", "layers") and not k.startswith("_")}  # "_": in-memory only
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "lowbit_version": __version__, **meta,
                "layers": layers}
    config = qm.config
    with atomic_dir(out) as tmp:
        saved_q = getattr(config, "quantization_config", None)
        config.quantization_config = _quantization_config()
        try:
            config.save_pretrained(tmp)
        finally:
            if saved_q is None:
                del config.quantization_config
            else:
                config.quantization_config = saved_q
        if qm.tokenizer is not None:
            qm.tokenizer.save_pretrained(tmp)
        # one metadata key: safetensors writes several in random order, and same input must give same bytes
        write_safetensors(tmp / WEIGHTS, tensors, metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    log.info("saved %d quantized layers to %s", len(layers), out)
    return out


def read_manifest(path: str | Path) -> dict:
    manifest = io_manifest.read_manifest(path, MANIFEST, FORMAT, "lowbit checkpoint")
    file = Path(path) / MANIFEST
    if manifest.get("format_version", 1) > FORMAT_VERSION:
        raise LowbitError(f"{file} has format version {manifest['format_version']}; this lowbit reads up to "
                          f"{FORMAT_VERSION}: upgrade lowbit")
    return manifest


def read(path: str | Path) -> QuantizedModel:
    """The records and tensors of a lowbit checkpoint, exactly as saved."""
    from transformers import AutoConfig, AutoTokenizer

    from lowbit.models.arch import arch_for
    from lowbit.models.validate import check_safetensors

    path = Path(path)
    manifest = read_manifest(path)
    weights = path / (WEIGHTS if manifest.get("format_version", 1) >= 2 else WEIGHTS_V1)
    if not weights.is_file():
        raise LowbitError(f"{path} has no {weights.name}")
    check_safetensors(weights)
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # lowbit's own marker; the model itself is plain
    arch_for(config)
    layers = LazyLayers(weights, manifest["layers"])
    f = layers.file
    record_keys = {name + s for name in manifest["layers"] for s in (".codes", ".scale", ".zero", ".g_idx")}
    tensors = {k: f.get_tensor(k) for k in f.keys() if k not in record_keys}
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    meta = {k: v for k, v in manifest.items() if k != "layers"}
    return QuantizedModel(config, layers, tensors, tokenizer, meta)


def load(path: str | Path):
    """(model, tokenizer) with QuantLinear kernels, exactly as saved."""
    qm = read(path)
    return qm.to_module(), qm.tokenizer
