"""QuantLinear: a drop-in nn.Linear replacement holding packed codes and running real kernels.

Paths (chosen once from the spec and shape, see `choose_path`):
  "int4"   int 4-bit, groups 32/64/128/256 (or per-channel/tensor), N % 64 == 0, no g_idx:
           torch's `_weight_int4pack_mm_for_cpu` for few rows.
  "int8"   int 8-bit symmetric per-channel/tensor: `_weight_int8pack_mm` for few rows.
  "packed" everything else: codes packed into int32 words, dequantized on every forward.
For more than `kernel_max_rows` input rows (prefill) every path dequantizes to bf16 and uses a
dense bf16 matmul (faster on AMX CPUs); nothing dense is kept between calls.

Built from a quantized-layer record (`from_quantized`); the record is the only portable form
(checkpoints and exports are written from records, never from these layouts). In memory each path
holds one copy of its quantization parameters, in the form its kernel reads:
  int4    kernel-layout codes + the kernel's bf16 scale-and-zero table (4.5 bits/weight at g64);
  int8    int8 codes + bf16 per-row scales;
  packed  int32-packed codes (lowbit.core.packing) + scale / zero as stored (float16 by default).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core.packing import pack_bits, packed_len
from lowbit.core.formats import codebook
from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.nn import dequant, int4_layout
from lowbit.spec import QuantSpec

BF16 = torch.bfloat16
# Measured crossover (bench/kernel_crossover.py, results/kernel_crossover.json): with compiled dequant,
# dequant + bf16 GEMM overtakes the int4 kernel at ~48-64 rows (1536x576: 978 vs 1052 us at 48,
# 1290 vs 1055 at 64) and the int8 kernel at ~16-24 rows (526 vs 443 us at 24).
KERNEL_MAX_ROWS = {"int4": 48, "int8": 20}


def choose_path(spec: QuantSpec, out_features: int, in_features: int, has_g_idx: bool) -> str:
    if has_g_idx or spec.dtype != "int":
        return "packed"
    group = spec.group_size if spec.granularity == "group" else None
    if (spec.bits == 4 and int4_layout.available() and out_features % int4_layout.BLOCK_N == 0
            and int4_layout.kernel_group(in_features, group) is not None):
        return "int4"
    if spec.bits == 8 and spec.symmetric and spec.granularity != "group" and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return "int8"
    return "packed"


def _param_shape(spec: QuantSpec, out_features: int, in_features: int) -> tuple[int, int]:
    if spec.granularity == "tensor":
        return (1, 1)
    if spec.granularity == "group":
        return (out_features, in_features // spec.group_size)
    return (out_features, 1)


class QuantLinear(nn.Module):
    """y = x @ W.T + b with W held as quantized codes (see module docstring)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 g_idx: bool = False, path: str | None = None, compile_dequant: bool = True,
                 name: str = "QuantLinear"):
        super().__init__()
        spec.check_shape(out_features, in_features, name)
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.path = path or choose_path(spec, out_features, in_features, g_idx)
        if self.path not in ("int4", "int8", "packed"):
            raise LowbitError(f"{name}: unknown QuantLinear path {self.path!r}; use int4, int8 or packed")
        self.compile_dequant = compile_dequant
        self.kernel_max_rows = KERNEL_MAX_ROWS.get(self.path, 0)
        self.group_size = spec.group_size if spec.granularity == "group" else None
        self.offset = 2 ** (spec.bits - 1) if spec.dtype == "int" and spec.symmetric else 0
        n, k = out_features, in_features
        pshape = _param_shape(spec, n, k)
        if self.path == "int4":
            self.kgroup = int4_layout.kernel_group(k, self.group_size)
            self.register_buffer("qweight", torch.zeros(n, k // 2, dtype=torch.uint8))
        elif self.path == "int8":
            self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8))
        else:
            self.register_buffer("qweight", torch.zeros(n, packed_len(k, spec.bits), dtype=torch.int32))
        asym = spec.dtype == "int" and not spec.symmetric
        packed = self.path == "packed"
        sdt = spec.torch_scale_dtype
        self.register_buffer("scale", torch.ones(pshape, dtype=sdt) if packed else None)
        self.register_buffer("zero", torch.zeros(pshape, dtype=sdt) if packed and asym else None)
        self.register_buffer("g_idx", torch.zeros(k, dtype=torch.int32) if g_idx else None)
        self.register_buffer("bias", torch.zeros(n) if bias else None)
        self._mode = ("int_scaled_zero" if spec.scaled_zero else "int") if spec.dtype == "int" else (
            "table" if spec.is_codebook else spec.dtype)
        self.register_buffer("table", codebook(spec.dtype) if spec.is_codebook else None, persistent=False)
        # the int4 kernel's bf16 [K/g, N, 2] scale-and-zero table; the int8 kernel's bf16 [N] scales
        self.register_buffer("sz", torch.zeros(k // self.kgroup, n, 2, dtype=BF16) if self.path == "int4" else None)
        self.register_buffer("s_bf16", torch.ones(n, dtype=BF16) if self.path == "int8" else None)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, name: str = "QuantLinear",
                       **kw) -> "QuantLinear":
        n, k = qw.shape
        m = cls(k, n, qw.spec, bias=bias is not None, g_idx=qw.g_idx is not None, name=name, **kw)
        want = _param_shape(qw.spec, n, k)
        if tuple(qw.scale.shape) != want:
            raise LowbitError(f"{name}: scale has shape {tuple(qw.scale.shape)}, expected {want} for {qw.spec.describe()}")
        asym = qw.spec.dtype == "int" and not qw.spec.symmetric
        if asym and qw.zero is None:
            raise LowbitError(f"{name}: asymmetric spec {qw.spec.describe()} needs a zero point")
        if tuple(qw.codes.shape) != (n, k):
            raise LowbitError(f"{name}: codes have shape {tuple(qw.codes.shape)}, expected {(n, k)}")
        u = qw.codes.to(torch.int32) + m.offset  # unsigned codes
        if m.path == "int4":
            m.qweight = int4_layout.pack(u)
            if qw.zero is None:
                zf = None
            elif qw.spec.scaled_zero:  # w = q·s − zero = (q − 8)·s + (8·s − zero)
                zf = 8 * qw.scale.float() - qw.zero.float()
            else:
                zf = (8 - qw.zero.float()) * qw.scale.float()
            m.sz = int4_layout.scales_and_zeros(qw.scale, zf, m.kgroup, n, k)
        elif m.path == "int8":
            m.qweight = qw.codes.to(torch.int8).contiguous()
            m.s_bf16 = qw.scale.float().expand(n, 1).reshape(-1).to(BF16).contiguous()
        else:
            m.qweight = pack_bits(u, qw.spec.bits, torch.int32)
            m.scale = qw.scale.detach().clone()
            if asym:
                m.zero = qw.zero.detach().clone()
        if qw.g_idx is not None:
            m.g_idx = qw.g_idx.detach().to(torch.int32).clone()
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` / `.half()` must not re-round the quantization parameters: only the bias
        follows the cast; codes, scales, zeros and kernel tables keep their dtypes."""
        held = {n: b for n, b in self._buffers.items() if n != "bias" and b is not None}
        for n in held:
            self._buffers[n] = None
        try:
            return super()._apply(fn, recurse)
        finally:
            self._buffers.update(held)

    # ---- compute ------------------------------------------------------------------------
    def dense_weight(self, dtype: torch.dtype = BF16) -> torch.Tensor:
        """The dequantized weight [out, in] (computed now, never cached)."""
        c = self.compile_dequant
        if self.path == "int4":
            return dequant.dequant_int4pack_fast(self.qweight, self.sz, self.out_features, self.in_features, dtype,
                                                 compile=c)
        if self.path == "int8":
            return dequant.dequant_int8_fast(self.qweight, self.s_bf16, dtype, compile=c)
        return dequant.dequant_packed_fast(self.qweight, self.scale, self.zero, self.table, self.spec.bits,
                                           self.in_features, self.group_size, self.g_idx, self._mode, self.offset,
                                           dtype, compile=c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= self.kernel_max_rows:
            if self.path == "int4":
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(BF16), self.qweight, self.kgroup, self.sz)
            else:
                y = torch.ops.aten._weight_int8pack_mm(x2.to(BF16), self.qweight, self.s_bf16)
        else:
            y = torch.mm(x2.to(BF16), self.dense_weight(BF16).t())
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    # ---- size ---------------------------------------------------------------------------
    def nbytes(self, include_bias: bool = False) -> int:
        """Bytes held in memory for the weight: packed codes + the kernel's scales/zeros (+ g_idx)."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers()
                   if b is not None and (include_bias or name != "bias"))

    def bits_per_weight(self) -> float:
        return self.nbytes() * 8 / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.describe()}, "
                f"path={self.path}, bias={self.bias is not None}")
