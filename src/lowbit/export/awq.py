"""AWQ checkpoints, GEMM version (AutoAWQ's layout; transformers loads it through GPTQModel, vLLM serves it).

Per quantized Linear `name` [out, in], 4 bits, G groups along the input dimension:
- `name.qweight` int32 [in, out/8]: for each input feature, 8 consecutive output features per word,
  nibble k holding output 8j + (0, 2, 4, 6, 1, 3, 5, 7)[k];
- `name.qzeros` int32 [G, out/8]: integer zero points packed the same way (stored as is);
- `name.scales` float16 [G, out].
w = (q - z) * s. Symmetric signed codes q_s map exactly to q_s + 8 with zero point 8.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.export import gptq, hf
from lowbit.export.model import QuantizedModel
from lowbit.spec import QuantSpec

FORMAT = "awq"
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output column (within 8) held by nibble k
_INVERSE = tuple(ORDER.index(c) for c in range(8))


def pack_awq(u: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values [n, m] (m % 8 == 0) -> int32 [n, m/8] in AWQ's interleaved nibble order."""
    n, m = u.shape
    v = u.to(torch.int64).reshape(n, m // 8, 8)[..., list(ORDER)]
    words = (v << (4 * torch.arange(8, dtype=torch.int64))).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_awq: int32 [n, m/8] -> int16 values [n, m]."""
    n, k = words.shape
    nib = (words.to(torch.int64).unsqueeze(-1) >> (4 * torch.arange(8, dtype=torch.int64))) & 15
    return nib[..., list(_INVERSE)].reshape(n, k * 8).to(torch.int16)


def check(name: str, qw: QuantizedWeight) -> None:
    gptq.check(name, qw, FORMAT, bits=(4,))
    hf.require(qw.spec.granularity == "group", name, FORMAT,
               f"it is quantized per {qw.spec.granularity}; AWQ GEMM stores groups (quantize with a group size, "
               "e.g. 64 or 128)")
    hf.require(qw.g_idx is None, name, FORMAT, "it has act-order groups (g_idx), which AWQ cannot store; "
               "write gptq or compressed-tensors")
    hf.require(qw.shape[0] % 8 == 0, name, FORMAT, f"its {qw.shape[0]} output features are not a multiple of 8")


def layer_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    codes, zero, scale = gptq.unsigned_params(qw)
    return {f"{name}.qweight": pack_awq(codes.t()),
            f"{name}.qzeros": pack_awq(zero.t()),
            f"{name}.scales": scale.t().to(torch.float16).contiguous()}


def write(qm: QuantizedModel, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write `qm` as an AWQ GEMM checkpoint folder, atomically. 4-bit group-wise layers only."""
    qm = qm.float_embeddings()  # this format's embeddings are floating point
    if not qm.layers:
        raise LowbitError("the model has no quantized layers to write as AWQ")
    for name, qw in qm.layers.items():
        check(name, qw)
    spec = gptq.uniform(qm, FORMAT)
    gptq.block_layout(qm, FORMAT)
    tensors: dict[str, torch.Tensor] = {}
    for name, qw in qm.layers.items():
        tensors.update(layer_tensors(name, qw))
    config = {"quant_method": FORMAT, "bits": 4, "group_size": spec.group_size, "zero_point": True,
              "version": "gemm", "modules_to_not_convert": None if "lm_head" in qm.layers else ["lm_head"]}
    return hf.write_folder(qm, out, overwrite, config, tensors)


def read_layer(tensors: dict, name: str, q: dict, path) -> QuantizedWeight:
    qweight = hf.take(tensors, f"{name}.qweight", path)
    qzeros = hf.take(tensors, f"{name}.qzeros", path)
    scales = hf.take(tensors, f"{name}.scales", path)
    cols, out = qweight.shape[0], qweight.shape[1] * 8
    groups = scales.shape[0]
    if qweight.dtype != torch.int32 or scales.shape[1] != out or qzeros.shape != (groups, out // 8) or cols % groups:
        raise LowbitError(f"{path}: {name} has qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                          f"scales {tuple(scales.shape)}: not an AWQ GEMM layout")
    codes = unpack_awq(qweight).t().contiguous()  # [out, in]
    zero = unpack_awq(qzeros).t().contiguous()  # [out, G]
    scale = scales.t().contiguous().to(torch.float16)
    spec_g = dict(granularity="group", group_size=cols // groups)
    if bool((zero == 8).all()):
        return QuantizedWeight((codes - 8).to(torch.int8), scale, None, QuantSpec(bits=4, symmetric=True, **spec_g))
    return QuantizedWeight(codes.to(torch.uint8), scale, zero.to(torch.float16), QuantSpec(bits=4, symmetric=False,
                                                                                         **spec_g))


def read(path: str | Path) -> QuantizedModel:
    """Records of every AWQ GEMM Linear in the folder (any tool's), the other tensors as stored."""
    config, q, tensors, tokenizer, names = hf.open_checkpoint(path, FORMAT, "qweight", "an AWQ")
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm" or int(q.get("bits", 4)) != 4 or not q.get("zero_point", True):
        raise LowbitError(f"{path}: AWQ version {version!r}, {q.get('bits')} bits, zero_point "
                          f"{q.get('zero_point')}; lowbit reads 4-bit GEMM checkpoints with zero points")
    layers = {name: read_layer(tensors, name, q, path) for name in names}
    return QuantizedModel(config, layers, tensors, tokenizer, {"format": FORMAT, "source": str(path)})
