"""bitsandbytes 4-bit NF4 checkpoints (transformers' `load_in_4bit` serialization).

bitsandbytes flattens a Linear's weight [out, in] row-major and quantizes blocks of 64 values, one
float32 absmax per block, codes into the NF4 table. Per layer `name`:
- `name.weight` uint8 [out*in/2, 1]: two codes per byte, the first in the high nibble;
- `name.weight.absmax` float32 [blocks] (double quantization: uint8 codes into `nested_quant_map`,
  the 8-bit dynamic map, with `nested_absmax` float32 per 256 blocks and `nested_offset` in the JSON:
  absmax = nested_quant_map[code] * nested_absmax[block // 256] + nested_offset, in float32);
- `name.weight.quant_map` float32 [16]; `name.weight.quant_state.bitsandbytes__nf4` the JSON
  (quant_type, blocksize, dtype, shape, nested_*) as uint8 bytes.

lowbit's NF4 record is group-wise per row, so the mapping is exact when the group size is 64 and each
row holds whole groups: block r * (in / 64) + g is row r's group g and its absmax is that group's
scale. Anything else is refused. Double quantization rounds the absmax values to an 8-bit grid: the
writer stores it only for records whose scales are already on that grid (`double_quantize` puts a
model's records there explicitly; `read` keeps a double-quantized checkpoint's grid).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from lowbit.core.formats import NF4_VALUES, codebook, nearest_code
from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.export import hf
from lowbit.export.model import QuantizedModel
from lowbit.spec import QuantSpec

log = logging.getLogger(__name__)

FORMAT = "bnb-nf4"
BLOCK = 64
NESTED_BLOCK = 256
STATE_KEY = "quant_state.bitsandbytes__nf4"
META = "_bnb_nested"  # QuantizedModel.meta key (private: "_" keys are not written to manifests): {layer: (absmax codes, nested_absmax, nested_map, offset)}


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)): 256 sorted float32 values."""
    data = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def nested_absmax(codes: torch.Tensor, nested: torch.Tensor, table: torch.Tensor, offset: float) -> torch.Tensor:
    """Dequantized absmax of double quantization, in bitsandbytes' float32 order of operations."""
    n = codes.numel()
    blocks = table[codes.long()].reshape(-1)
    scale = nested.float().repeat_interleave(NESTED_BLOCK)[:n]
    return blocks * scale + torch.tensor(offset, dtype=torch.float32)


def check(name: str, qw: QuantizedWeight) -> None:
    spec = qw.spec
    rows, cols = qw.shape
    hf.require(spec.dtype == "nf4", name, FORMAT, f"it is {spec.describe()}; the format stores NF4 "
               "(bitsandbytes' fp4 table is not E2M1; quantize with dtype nf4)")
    hf.require(qw.g_idx is None, name, FORMAT, "it has act-order groups (g_idx)")
    hf.require((spec.granularity == "group" and spec.group_size == BLOCK)
               or (spec.granularity == "channel" and cols == BLOCK), name, FORMAT,
               f"it is {spec.describe()}; bitsandbytes quantizes blocks of {BLOCK} along each row: quantize "
               f"NF4 with group_size {BLOCK}")
    hf.require(cols % BLOCK == 0, name, FORMAT, f"its {cols} input features are not whole blocks of {BLOCK}")


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    flat = codes.reshape(-1, 2).to(torch.uint8)
    return ((flat[:, 0] << 4) | flat[:, 1]).reshape(-1, 1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    b = packed.reshape(-1)
    return torch.stack((b >> 4, b & 15), -1).reshape(-1)[:n]


def layer_tensors(name: str, qw: QuantizedWeight, nested=None) -> dict[str, torch.Tensor]:
    rows, cols = qw.shape
    absmax = qw.scale.float().expand(rows, cols // BLOCK).reshape(-1).contiguous()
    state = {"quant_type": "nf4", "blocksize": BLOCK, "dtype": "float32", "shape": [rows, cols]}
    out = {f"{name}.weight": pack_nibbles(qw.codes),
           f"{name}.weight.quant_map": torch.tensor(NF4_VALUES, dtype=torch.float32)}
    if nested is None:
        out[f"{name}.weight.absmax"] = absmax
    else:
        codes, nabs, table, offset = nested
        hf.require(torch.equal(nested_absmax(codes, nabs, table, offset), absmax), name, FORMAT,
                   "its scales are not on bitsandbytes' double-quantization grid")
        out.update({f"{name}.weight.absmax": codes.to(torch.uint8).clone(),
                    f"{name}.weight.nested_absmax": nabs.float().clone(),
                    f"{name}.weight.nested_quant_map": table.float().clone()})
        state.update({"nested_blocksize": NESTED_BLOCK, "nested_dtype": "float32", "nested_offset": offset})
    out[f"{name}.weight.{STATE_KEY}"] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return out


def double_quantize(qm: QuantizedModel) -> QuantizedModel:
    """A copy of `qm` whose NF4 records' scales are on bitsandbytes' double-quantization grid (absmax
    minus its mean, 8-bit dynamic codes per 256 blocks), codes re-picked for the records' own weights.
    This re-quantizes on purpose (QLoRA's storage); `write(..., double_quant=True)` then stores it exactly."""
    table = dynamic_map()
    layers, nested = {}, {}
    for name, qw in qm.layers.items():
        check(name, qw)
        rows, cols = qw.shape
        absmax = qw.scale.float().expand(rows, cols // BLOCK).reshape(-1)
        offset = float(absmax.mean())
        x = absmax - offset
        pad = (-x.numel()) % NESTED_BLOCK
        xb = torch.nn.functional.pad(x, (0, pad)).reshape(-1, NESTED_BLOCK)
        nabs = xb.abs().amax(-1)
        scaled = (xb / nabs.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)).reshape(-1)[: x.numel()]
        codes = nearest_code(scaled, table)
        scale = nested_absmax(codes, nabs, table, offset).reshape(rows, -1)
        w = qw.dequantize()
        spec = QuantSpec(bits=4, dtype="nf4", granularity="group", group_size=BLOCK, scale_dtype="float32")
        s = scale.repeat_interleave(BLOCK, dim=1)
        new_codes = nearest_code(w / torch.where(s == 0, torch.ones_like(s), s), codebook("nf4"))
        layers[name] = QuantizedWeight(new_codes, scale, None, spec, None, qw.error)
        nested[name] = (codes.to(torch.uint8), nabs, table, offset)
    return QuantizedModel(qm.config, layers, qm.tensors, qm.tokenizer, {**qm.meta, META: nested})


def skip_modules(qm: QuantizedModel) -> list[str]:
    """Linears transformers must leave dense: the head unless quantized, block Linears not quantized."""
    from lowbit.models.arch import arch_for

    arch = arch_for(qm.config)
    skip = [] if "lm_head" in qm.layers else ["lm_head"]
    for i in range(int(qm.config.num_hidden_layers)):
        for rel in arch.linears:
            name = f"{arch.blocks}.{i}.{rel}"
            if name not in qm.layers and f"{name}.weight" in qm.tensors:
                skip.append(name)
    return skip


def write(qm: QuantizedModel, out: str | Path, *, overwrite: bool = False, double_quant: bool | str = False) -> Path:
    """Write `qm` as a bitsandbytes NF4 checkpoint folder, atomically; `double_quant=True` needs the
    records' scales on the double-quantization grid (see `double_quantize`); `double_quant="requantize"`
    puts them there first (`lowbit export ... --option double_quant=requantize`)."""
    qm = qm.float_embeddings()  # this format's embeddings are floating point
    if str(double_quant).lower() == "requantize":
        log.info("re-quantizing the NF4 scales onto bitsandbytes' double-quantization grid")
        qm, double_quant = double_quantize(qm), True
    double_quant = str(double_quant).lower() in ("1", "true", "yes")
    if not qm.layers:
        raise LowbitError("the model has no quantized layers to write as bitsandbytes NF4")
    nested = qm.meta.get(META, {})
    for name, qw in qm.layers.items():
        check(name, qw)
        if double_quant and name not in nested:
            raise LowbitError(f"{name}: double_quant needs scales on bitsandbytes' double-quantization grid; "
                              "pass the model through lowbit.export.bnb.double_quantize first (or the option "
                              "double_quant=requantize), or write without double_quant")
    tensors: dict[str, torch.Tensor] = {}
    for name, qw in qm.layers.items():
        tensors.update(layer_tensors(name, qw, nested[name] if double_quant else None))
    config = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
              "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": double_quant,
              "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
              "llm_int8_skip_modules": skip_modules(qm)}
    return hf.write_folder(qm, out, overwrite, config, tensors)


def read_layer(tensors: dict, name: str, path) -> tuple[QuantizedWeight, tuple | None]:
    raw = hf.take(tensors, f"{name}.weight.{STATE_KEY}", path)
    try:
        state = json.loads(bytes(raw.tolist()).decode())
    except ValueError as e:
        raise LowbitError(f"{path}: {name}'s {STATE_KEY} is not JSON ({e})") from None
    rows, cols = (int(v) for v in state["shape"])
    block = int(state["blocksize"])
    table = hf.take(tensors, f"{name}.weight.quant_map", path).float()
    packed = hf.take(tensors, f"{name}.weight", path)
    absmax = hf.take(tensors, f"{name}.weight.absmax", path)
    if state.get("quant_type") != "nf4" or not torch.equal(table, torch.tensor(NF4_VALUES)):
        raise LowbitError(f"{path}: {name} is {state.get('quant_type')!r}; lowbit reads bitsandbytes NF4")
    if cols % block:
        raise LowbitError(f"{path}: {name} has rows of {cols} values, not whole blocks of {block}; lowbit's "
                          "group-wise NF4 record cannot hold blocks that span rows")
    nested = None
    if f"{name}.weight.nested_absmax" in tensors:
        nabs = tensors.pop(f"{name}.weight.nested_absmax")
        ntable = hf.take(tensors, f"{name}.weight.nested_quant_map", path)
        offset = float(state.get("nested_offset", 0.0))
        nested = (absmax, nabs, ntable, offset)
        absmax = nested_absmax(absmax, nabs, ntable, offset)
    codes = unpack_nibbles(packed, rows * cols).reshape(rows, cols)
    spec = QuantSpec(bits=4, dtype="nf4", granularity="group", group_size=block, scale_dtype="float32")
    return QuantizedWeight(codes, absmax.float().reshape(rows, cols // block), None, spec), nested


def read(path: str | Path) -> QuantizedModel:
    """Records of every NF4 Linear in a bitsandbytes 4-bit folder (any tool's), the rest as stored."""
    config, q, tensors, tokenizer = hf.read_folder(path)
    if q.get("quant_method") != "bitsandbytes" or not q.get("load_in_4bit"):
        raise LowbitError(f"{path} is not a bitsandbytes 4-bit checkpoint (lowbit reads NF4, not 8-bit)")
    names = [n.removesuffix(".weight") for n in hf.module_names(tensors, STATE_KEY)]
    if not names:
        raise LowbitError(f"{path}: no '*.weight.{STATE_KEY}' tensors in a bitsandbytes NF4 checkpoint")
    layers, nested = {}, {}
    for name in names:
        layers[name], state = read_layer(tensors, name, path)
        if state is not None:
            nested[name] = state
    meta = {"format": FORMAT, "source": str(path), **({META: nested} if nested else {})}
    return QuantizedModel(config, layers, tensors, tokenizer, meta)
