"""QLoRA's frozen-base storage: 4-bit blockwise NF4 / FP4 with double quantization of the absmax.

The numerics of bitsandbytes' `quantize_4bit` on CPU, bit for bit (tests/qlora/test_storage.py):
- the weight is flattened row-major and cut into blocks of 64; absmax per block in float32;
  codes = nearest table entry of clamp(w * (1 / absmax), -1, 1), ties to the lower entry
  (a bucketize over the midpoints of the sorted table);
- double quantization: offset = mean(absmax); absmax - offset is quantized blockwise (256 per
  block) to 8-bit codes into the signed dynamic map, with bitsandbytes' CPU quantizer: a 65536-entry
  lookup table over [-1, 1] built from the map's midpoints, indexed by
  uint16((v + 1) * 0.5 * 65535 + 0.5) with v = clamp(x * (1 / absmax2), -1, 1);
- absmax is recovered as map[code] * absmax2[block // 256] + offset (float32).

Storage per parameter: 4 bits + 8 bits / 64 + 32 bits / (64 * 256) (+ one float32 offset per tensor)
= 4.127 bits (`bits_per_param`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.formats import BNB_FP4_VALUES, NF4_VALUES
from lowbit.errors import LowbitError
from lowbit.export.bnb import dynamic_map  # bitsandbytes' signed 8-bit dynamic map, the nested table

BLOCK = 64
NESTED_BLOCK = 256
LUT_SIZE = 65536
QUANT_TYPES = ("nf4", "fp4")


def table(quant_type: str) -> torch.Tensor:
    """The 16 float32 values of bitsandbytes' 4-bit type, indexed by code."""
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        return torch.tensor(BNB_FP4_VALUES, dtype=torch.float32)
    raise LowbitError(f"quant_type {quant_type!r} is not a 4-bit QLoRA type; use one of {', '.join(QUANT_TYPES)}")


def quantize_blocks4(w: torch.Tensor, quant_type: str = "nf4", block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [numel], absmax float32 [numel / block]) of w flattened row-major."""
    flat = w.reshape(-1).float()
    if flat.numel() % block:
        raise LowbitError(f"a weight of {flat.numel()} values is not whole blocks of {block}")
    values = table(quant_type)
    order = torch.argsort(values)
    bounds = (values[order[:-1]] + values[order[1:]]) / 2
    blocks = flat.reshape(-1, block)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    q = torch.bucketize(scaled, bounds, out_int32=True)
    if quant_type != "nf4":
        q = order[q]
    return q.to(torch.uint8), absmax


def _quantize_lut(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU 8-bit quantizer table: for each of 65536 points of [-1, 1], the code of the
    first midpoint not below it."""
    mids = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(LUT_SIZE, dtype=torch.float32)
    points = -1.0 + (2.0 * i) / float(LUT_SIZE - 1)
    return torch.bucketize(points, mids).to(torch.uint8)


def quantize_blockwise8(x: torch.Tensor, code: torch.Tensor, block: int = NESTED_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [n], absmax float32 [ceil(n / block)]) of a float32 vector into an 8-bit table."""
    n = x.numel()
    pad = (-n) % block
    xb = torch.nn.functional.pad(x.float().reshape(-1), (0, pad)).reshape(-1, block)
    absmax = xb.abs().amax(-1)
    inv = 1.0 / torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    v = torch.clamp(xb * inv.unsqueeze(-1), -1.0, 1.0)
    idx = ((v + 1.0) * 0.5 * float(LUT_SIZE - 1) + 0.5).to(torch.int64)  # truncation, as the C cast
    codes = _quantize_lut(code)[idx]
    codes = torch.where((absmax == 0).unsqueeze(-1), torch.zeros_like(codes), codes)
    return codes.reshape(-1)[:n], absmax


def dequantize_blockwise8(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                          block: int = NESTED_BLOCK) -> torch.Tensor:
    n = codes.numel()
    return code[codes.long()] * absmax.float().repeat_interleave(block)[:n]


@dataclass
class Packed4bit:
    """One weight in QLoRA storage (format-neutral: codes unpacked here, packed by the module).

    codes uint8 [rows, cols] (codes into `table(quant_type)`); without double quantization `absmax`
    is float32 [blocks]; with it, `absmax` is uint8 [blocks] codes into `nested_code`, with
    `nested_absmax` float32 [ceil(blocks / 256)] and the float `offset`."""

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    quant_type: str = "nf4"
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: float | None = None
    block: int = BLOCK

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def block_absmax(self) -> torch.Tensor:
        """float32 [blocks]: the absmax each block is dequantized with."""
        if not self.double_quant:
            return self.absmax.float()
        return dequantize_blockwise8(self.absmax, self.nested_absmax, self.nested_code) + torch.tensor(
            self.offset, dtype=torch.float32)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        v = table(self.quant_type)[self.codes.reshape(-1, self.block).long()]
        return (v * self.block_absmax().view(-1, 1)).to(dtype).reshape(self.shape)

    def nbytes(self) -> int:
        """Bytes of the stored form: 4-bit codes, absmax (codes), nested absmax and offset."""
        n = self.codes.numel() // 2 + self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            n += self.nested_absmax.numel() * 4 + 4
        return n

    def bits_per_param(self) -> float:
        return self.nbytes() * 8 / self.codes.numel()


def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True, block: int = BLOCK) -> Packed4bit:
    """w [rows, cols] -> Packed4bit with bitsandbytes' quantize_4bit numerics (see module docstring)."""
    if w.dim() != 2:
        raise LowbitError(f"quantize_4bit takes a 2-D weight, got shape {tuple(w.shape)}")
    codes, absmax = quantize_blocks4(w, quant_type, block)
    shape = (int(w.shape[0]), int(w.shape[1]))
    if not double_quant:
        return Packed4bit(codes.reshape(shape), absmax, shape, quant_type, block=block)
    offset = absmax.mean()
    code = dynamic_map()
    qabs, nested = quantize_blockwise8(absmax - offset, code)
    return Packed4bit(codes.reshape(shape), qabs, shape, quant_type, nested, code, float(offset), block)
