"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout, as transformers and vLLM load them).

Per quantized Linear `name` [out, in] with `bits` in 2, 3, 4, 8 and G groups:
- `name.qweight` int32 [in*bits/32, out]: unsigned codes packed along the input dimension, a
  little-endian bit stream per output column (3-bit codes cross word boundaries: 32 codes fill
  three words);
- `name.qzeros` int32 [G, out*bits/32]: zero points packed the same way along the output dimension.
  Checkpoint format "gptq" (v1) stores z - 1 (AutoGPTQ's historical off-by-one; a zero point of 0
  cannot be stored), "gptq_v2" stores z;
- `name.scales` float16 [G, out]; `name.g_idx` int32 [in], the group of each input column.
w = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o]). Symmetric signed codes q_s map to unsigned
q_s + 2**(bits-1) with zero point 2**(bits-1) (stored 2**(bits-1) - 1 in v1), which is exact.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lowbit.core.packing import pack_bits, unpack_bits
from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.export import hf
from lowbit.export.model import QuantizedModel
from lowbit.spec import QuantSpec

FORMAT = "gptq"
BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def unsigned_params(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unsigned codes [out, in] int64, integer zero points [out, G] int64, scales [out, G]) with
    w = (codes - zero) * scale per group: the shared view of the GPTQ-family layouts."""
    spec = qw.spec
    rows, cols = qw.shape
    groups = spec.groups(cols)
    scale = qw.scale.expand(rows, groups)
    if spec.symmetric:
        offset = 2 ** (spec.bits - 1)
        codes = qw.codes.to(torch.int64) + offset
        zero = torch.full((rows, groups), offset, dtype=torch.int64)
    else:
        codes = qw.codes.to(torch.int64)
        zero = qw.zero.float().round().to(torch.int64).expand(rows, groups)
    return codes, zero.contiguous(), scale.contiguous()


def group_index(qw: QuantizedWeight) -> torch.Tensor:
    cols = qw.shape[1]
    if qw.g_idx is not None:
        return qw.g_idx.to(torch.int32)
    if qw.spec.granularity == "group":
        return (torch.arange(cols) // qw.spec.group_size).to(torch.int32)
    return torch.zeros(cols, dtype=torch.int32)


def check(name: str, qw: QuantizedWeight, fmt: str = FORMAT, bits: tuple[int, ...] = BITS,
          zero_offset: int = 0) -> None:
    """Refuse, naming the layer and what would fit, a record the layout cannot hold exactly."""
    spec = qw.spec
    rows, cols = qw.shape
    hf.require(spec.dtype == "int", name, fmt, f"it is {spec.dtype}; the format stores integer codes only "
               "(quantize with dtype int)")
    hf.require(spec.bits in bits, name, fmt, f"it has {spec.bits}-bit codes; the format holds "
               f"{'/'.join(map(str, bits))} bits")
    hf.require(spec.symmetric or spec.integer_zero, name, fmt,
               "its zero points are floats; the format stores integer zero points (quantize with integer_zero=True)")
    hf.require(cols * spec.bits % 32 == 0, name, fmt, f"its {cols} input features do not fill whole int32 words "
               f"at {spec.bits} bits (need a multiple of {32 // math.gcd(32, spec.bits)})")
    hf.require(rows * spec.bits % 32 == 0, name, fmt, f"its {rows} output features do not fill whole int32 "
               f"words of zero points at {spec.bits} bits")
    hf.exact_fp16(qw.scale, name, fmt)
    if zero_offset and not spec.symmetric:
        hf.require(bool((qw.zero.float() >= zero_offset).all()), name, fmt,
                   "it has a zero point of 0, which checkpoint_format 'gptq' (v1, stores z - 1) cannot hold; "
                   "write checkpoint_format=gptq_v2")


def layer_tensors(name: str, qw: QuantizedWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    bits = qw.spec.bits
    codes, zero, scale = unsigned_params(qw)
    if checkpoint_format == "gptq":
        zero = zero - 1
    return {
        f"{name}.qweight": pack_bits(codes, bits, torch.int32).t().contiguous(),
        f"{name}.qzeros": pack_bits(zero.t().contiguous(), bits, torch.int32),
        f"{name}.scales": scale.t().to(torch.float16).contiguous(),
        f"{name}.g_idx": group_index(qw),
    }


def block_layout(qm: QuantizedModel, fmt: str) -> tuple[str, list[str]]:
    """(block prefix, Linear names relative to a block) — the same in every block, as transformers'
    loaders convert by relative name; quantized Linears outside the blocks (lm_head) are refused."""
    from lowbit.models.arch import arch_for

    prefix = arch_for(qm.config).blocks + "."
    per_block: dict[str, set[str]] = {}
    for name in qm.layers:
        if not name.startswith(prefix):
            raise LowbitError(f"{name}: the {fmt} format's loaders convert only decoder-block Linears; "
                              "export without a quantized head (drop --quantize-head)")
        idx, _, rel = name[len(prefix):].partition(".")
        per_block.setdefault(idx, set()).add(rel)
    n_blocks = int(getattr(qm.config, "num_hidden_layers", len(per_block)))
    rels = set().union(*per_block.values()) if per_block else set()
    for i in range(n_blocks):
        missing = rels - per_block.get(str(i), set())
        if missing:
            raise LowbitError(f"{prefix}{i}.{sorted(missing)[0]}: not quantized, but the same Linear is in other "
                              f"blocks; the {fmt} format quantizes the same Linears in every block")
    return prefix, sorted(rels)


def uniform(qm: QuantizedModel, fmt: str) -> QuantSpec:
    """The one (bits, group size) every layer must share; names the first layer that differs."""
    first_name, first = next(iter(qm.layers.items()))
    key = (first.spec.bits, first.spec.group_size)
    for name, qw in qm.layers.items():
        if (qw.spec.bits, qw.spec.group_size) != key:
            raise LowbitError(f"{name}: {qw.spec.describe()} differs from {first_name}'s {first.spec.describe()}; "
                              f"the {fmt} format holds one bit width and group size per model "
                              "(compressed-tensors holds one per layer)")
    return first.spec


def write(qm: QuantizedModel, out: str | Path, *, overwrite: bool = False, checkpoint_format: str = "gptq") -> Path:
    """Write `qm` as a GPTQ checkpoint folder (model.safetensors, config.json, tokenizer), atomically."""
    qm = qm.float_embeddings()  # this format's embeddings are floating point
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise LowbitError(f"checkpoint_format={checkpoint_format!r}; choose one of {', '.join(CHECKPOINT_FORMATS)}")
    if not qm.layers:
        raise LowbitError("the model has no quantized layers to write as GPTQ")
    for name, qw in qm.layers.items():
        check(name, qw, zero_offset=1 if checkpoint_format == "gptq" else 0)
    spec = uniform(qm, FORMAT)
    _, rels = block_layout(qm, FORMAT)
    tensors: dict[str, torch.Tensor] = {}
    for name, qw in qm.layers.items():
        tensors.update(layer_tensors(name, qw, checkpoint_format))
    config = {
        "quant_method": FORMAT,
        "bits": spec.bits,
        "group_size": spec.group_size if spec.granularity == "group" else -1,
        "desc_act": any(qw.g_idx is not None for qw in qm.layers.values()),
        "sym": all(qw.spec.symmetric for qw in qm.layers.values()),
        "checkpoint_format": checkpoint_format,
        "true_sequential": True,
        "modules_in_block_to_quantize": [rels],
        "pack_dtype": "int32",
        "meta": {"quantizer": ["lowbit"]},
    }
    return hf.write_folder(qm, out, overwrite, config, tensors)


def read_layer(tensors: dict, name: str, q: dict, path) -> QuantizedWeight:
    """The record of one GPTQ Linear; bit width and group size are read from the tensors' shapes
    (so per-module overrides of any tool are honoured), the config fills in what shapes leave open."""
    qweight = hf.take(tensors, f"{name}.qweight", path)
    qzeros = hf.take(tensors, f"{name}.qzeros", path)
    scales = hf.take(tensors, f"{name}.scales", path)
    g_idx = tensors.pop(f"{name}.g_idx", None)
    out = scales.shape[1]
    if g_idx is not None:
        cols = g_idx.numel()
        bits = qweight.shape[0] * 32 // cols
    else:
        bits = int(q.get("bits", 4))
        cols = qweight.shape[0] * 32 // bits
    if bits not in BITS or qweight.shape != (cols * bits // 32, out) or qweight.dtype != torch.int32:
        raise LowbitError(f"{path}: {name}.qweight has shape {tuple(qweight.shape)} {qweight.dtype}, not a GPTQ "
                          f"layout of {out} outputs")
    fmt = str(q.get("checkpoint_format", q.get("format", "gptq"))).lower()
    codes = unpack_bits(qweight.t().contiguous(), bits, cols).to(torch.int16)
    groups = scales.shape[0]
    zero = unpack_bits(qzeros.contiguous(), bits, out).to(torch.int16).t()
    if fmt == "gptq":
        zero = zero + 1
    if g_idx is None:
        g_idx = torch.arange(cols) * groups // cols
    g_idx = g_idx.long()
    group_size = cols // groups
    if groups == 1:
        spec_g = dict(granularity="channel", group_size=None)
    else:
        spec_g = dict(granularity="group", group_size=group_size)
    trivial = groups == 1 or torch.equal(g_idx, torch.arange(cols) // group_size)
    if not trivial and cols % groups:
        raise LowbitError(f"{path}: {name} has {groups} groups over {cols} inputs with act-order; lowbit needs "
                          "equal groups")
    half = 2 ** (bits - 1)
    scale = scales.t().contiguous().to(torch.float16)
    if bool((zero == half).all()):
        spec = QuantSpec(bits=bits, symmetric=True, **spec_g)
        return QuantizedWeight((codes - half).to(torch.int8), scale, None, spec, None if trivial else g_idx)
    if bool(((zero < 0) | (zero >= 2**bits)).any()):
        raise LowbitError(f"{path}: {name} has zero points outside 0..{2**bits - 1} (checkpoint_format {fmt!r})")
    spec = QuantSpec(bits=bits, symmetric=False, **spec_g)
    return QuantizedWeight(codes.to(torch.uint8), scale, zero.to(torch.float16).contiguous(), spec,
                           None if trivial else g_idx)


def read(path: str | Path) -> QuantizedModel:
    """Records of every GPTQ Linear in the folder (any tool's), the other tensors as stored."""
    config, q, tensors, tokenizer, names = hf.open_checkpoint(path, FORMAT, "qweight", "a GPTQ")
    layers = {name: read_layer(tensors, name, q, path) for name in names}
    return QuantizedModel(config, layers, tensors, tokenizer, {"format": FORMAT, "source": str(path)})
