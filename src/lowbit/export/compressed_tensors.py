"""compressed-tensors checkpoints, format "pack-quantized" (what llm-compressor writes and vLLM serves).

Per quantized Linear `name` [out, in] with `bits` in 2..8:
- `name.weight_packed` int32 [out, ceil(in*bits/32)]: codes + 2**(bits-1) (compressed-tensors'
  codes are signed) as a dense little-endian bit stream along the input dimension;
- `name.weight_scale` [out, G] in the record's scale dtype; `name.weight_shape` int64 [2];
- asymmetric: `name.weight_zero_point` int32 [ceil(out*bits/32), G], zero points (signed, + 2**(bits-1))
  packed the same way along the output dimension;
- act-order: `name.weight_g_idx` int32 [in].
w = (q - zp) * scale per group. lowbit's unsigned asymmetric codes u and zero z store as
q = u - 2**(bits-1), zp = z - 2**(bits-1): the packed bits are u and z themselves.

The config's `config_groups` hold one scheme per distinct layer spec, targeting its layers by exact
module name, so a mixed-precision model keeps each layer's bits and group size.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lowbit.core.packing import pack_bits, unpack_bits
from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.export import hf
from lowbit.export.model import QuantizedModel
from lowbit.spec import QuantSpec

FORMAT = "compressed-tensors"
PACKED = "pack-quantized"


def weight_args(qw: QuantizedWeight) -> dict:
    """The compressed-tensors QuantizationArgs (as a dict) of a record."""
    spec = qw.spec
    strategy = "group" if spec.granularity == "group" else "channel"  # per-tensor: scale repeated per row
    args = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "strategy": strategy,
            "group_size": spec.group_size if strategy == "group" else None, "dynamic": False,
            "observer": "minmax"}
    if qw.g_idx is not None:
        args["actorder"] = "group"
    return args


def check(name: str, qw: QuantizedWeight) -> None:
    spec = qw.spec
    hf.require(spec.dtype == "int", name, FORMAT, f"it is {spec.dtype}; pack-quantized stores integer codes "
               "(quantize with dtype int)")
    hf.require(spec.symmetric or spec.integer_zero, name, FORMAT,
               "its zero points are floats; pack-quantized stores integer zero points (quantize with integer_zero=True)")


def layer_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    spec = qw.spec
    rows, cols = qw.shape
    groups = spec.groups(cols)
    off = 2 ** (spec.bits - 1)
    u = qw.codes.to(torch.int64) + (off if spec.symmetric else 0)
    out = {f"{name}.weight_packed": pack_bits(u, spec.bits, torch.int32),
           f"{name}.weight_scale": qw.scale.expand(rows, groups).contiguous(),
           f"{name}.weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}
    if not spec.symmetric:
        z = qw.zero.float().round().to(torch.int64).expand(rows, groups)
        out[f"{name}.weight_zero_point"] = pack_bits(z.t().contiguous(), spec.bits, torch.int32).t().contiguous()
    if qw.g_idx is not None:
        out[f"{name}.weight_g_idx"] = qw.g_idx.to(torch.int32).contiguous()
    return out


def quantization_config(qm: QuantizedModel) -> dict:
    groups: dict[str, dict] = {}
    by_args: dict[str, str] = {}
    for name, qw in qm.layers.items():
        args = weight_args(qw)
        key = repr(sorted(args.items()))
        if key not in by_args:
            by_args[key] = f"group_{len(by_args)}"
            groups[by_args[key]] = {"targets": [], "weights": args, "input_activations": None,
                                    "output_activations": None, "format": PACKED}
        groups[by_args[key]]["targets"].append(name)
    ignore = [] if "lm_head" in qm.layers else ["lm_head"]
    return {"quant_method": FORMAT, "format": PACKED, "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None}


def write(qm: QuantizedModel, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write `qm` as a compressed-tensors pack-quantized folder, atomically."""
    qm = qm.float_embeddings()  # this format's embeddings are floating point
    if not qm.layers:
        raise LowbitError("the model has no quantized layers to write as compressed-tensors")
    for name, qw in qm.layers.items():
        check(name, qw)
    tensors: dict[str, torch.Tensor] = {}
    for name, qw in qm.layers.items():
        tensors.update(layer_tensors(name, qw))
    return hf.write_folder(qm, out, overwrite, quantization_config(qm), tensors)


def _matches(target: str, name: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == "Linear"  # a class-name target: every Linear lowbit finds packed


def scheme_for(name: str, q: dict, path) -> dict:
    """The weights args of the config group that targets `name` (exact names and regexes first)."""
    groups = q.get("config_groups") or {}
    found = None
    for g in groups.values():
        targets = g.get("targets") or []
        if any(t != "Linear" and _matches(t, name) for t in targets):
            found = g
            break
        if found is None and "Linear" in targets:
            found = g
    if found is None or not found.get("weights"):
        raise LowbitError(f"{path}: no config group of the quantization_config targets {name}")
    if found.get("input_activations") or found.get("output_activations"):
        raise LowbitError(f"{path}: {name} quantizes activations too; lowbit reads weight-only schemes")
    fmt = found.get("format") or q.get("format")
    if fmt != PACKED:
        raise LowbitError(f"{path}: {name} is stored as {fmt!r}; lowbit reads the {PACKED!r} format")
    return found["weights"]


def read_layer(tensors: dict, name: str, args: dict, path) -> QuantizedWeight:
    bits, strategy = int(args["num_bits"]), args.get("strategy")
    if args.get("type", "int") != "int" or strategy not in ("group", "channel", "tensor"):
        raise LowbitError(f"{path}: {name} has type {args.get('type')!r} strategy {strategy!r}; lowbit reads int "
                          "group/channel/tensor schemes")
    packed = hf.take(tensors, f"{name}.weight_packed", path)
    scale = hf.take(tensors, f"{name}.weight_scale", path)
    rows, cols = (int(v) for v in hf.take(tensors, f"{name}.weight_shape", path).tolist())
    zp = tensors.pop(f"{name}.weight_zero_point", None)
    g_idx = tensors.pop(f"{name}.weight_g_idx", None)
    u = unpack_bits(packed, bits, cols).to(torch.int16)
    off = 2 ** (bits - 1)
    scale = scale.reshape(rows if scale.numel() > 1 else 1, -1).contiguous()
    spec_g = (dict(granularity="group", group_size=int(args["group_size"])) if strategy == "group"
              else dict(granularity="channel" if scale.shape[0] > 1 else "tensor"))
    sdt = str(scale.dtype).removeprefix("torch.")
    symmetric = bool(args.get("symmetric", True)) or zp is None
    if g_idx is not None:
        g_idx = g_idx.long()
        if torch.equal(g_idx, torch.arange(cols) // int(args["group_size"])):
            g_idx = None
    if symmetric:
        spec = QuantSpec(bits=bits, symmetric=True, scale_dtype=sdt, **spec_g)
        return QuantizedWeight((u - off).to(torch.int8), scale, None, spec, g_idx)
    if zp.dtype == torch.int32 and strategy != "tensor":
        z = unpack_bits(zp.t().contiguous(), bits, rows).t()
    else:  # unpacked signed zero points
        z = zp.to(torch.int64).reshape(scale.shape) + off
    spec = QuantSpec(bits=bits, symmetric=False, scale_dtype=sdt, **spec_g)
    return QuantizedWeight(u.to(torch.uint8), scale, z.to(scale.dtype).contiguous(), spec, g_idx)


def read(path: str | Path) -> QuantizedModel:
    """Records of every pack-quantized Linear in the folder (any tool's), the other tensors as stored."""
    config, q, tensors, tokenizer, names = hf.open_checkpoint(path, FORMAT, "weight_packed",
                                                              f"a compressed-tensors ({PACKED})")
    layers = {name: read_layer(tensors, name, scheme_for(name, q, path), path) for name in names}
    return QuantizedModel(config, layers, tensors, tokenizer, {"format": FORMAT, "source": str(path)})
