"""QuantLinear: a drop-in nn.Linear replacement holding packed codes and running real kernels.

Paths (chosen once from the spec and shape, see `choose_path`):
  "int4"   int 4-bit, groups 32/64/128/256 (or per-channel/tensor), N % 64 == 0, no g_idx:
           torch's `_weight_int4pack_mm_for_cpu` for few rows.
  "int8"   int 8-bit symmetric per-channel/tensor: `_weight_int8pack_mm` for few rows.
  "packed" everything else: codes packed into int32 words, dequantized on every forward.
For more than `kernel_max_rows` input rows (prefill) every path dequantizes to bf16 and uses a
dense bf16 matmul (faster on AMX CPUs); nothing dense is kept between calls.

state_dict() is portable: `qweight` always holds the unsigned codes packed with
lowbit.core.packing.pack_bits into int32 (symmetric int codes offset by 2**(bits-1)), next to
`scale`, `zero` (asymmetric int), `g_idx` (act-order) and `bias`. Kernel layouts are rebuilt
on load.
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
        self.register_buffer("scale", torch.ones(pshape))
        asym = spec.dtype == "int" and not spec.symmetric
        self.register_buffer("zero", torch.zeros(pshape) if asym else None)
        self.register_buffer("g_idx", torch.zeros(k, dtype=torch.int32) if g_idx else None)
        self.register_buffer("bias", torch.zeros(n) if bias else None)
        self._mode = "int" if spec.dtype == "int" else ("table" if spec.is_codebook else spec.dtype)
        self.register_buffer("table", codebook(spec.dtype) if spec.is_codebook else None, persistent=False)
        self.register_buffer("sz", None, persistent=False)  # int4: bf16 [K/g, N, 2]
        self.register_buffer("s_bf16", None, persistent=False)  # int8: bf16 [N]
        self._refresh()

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def empty_like_spec(cls, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                        g_idx: bool = False, **kw) -> "QuantLinear":
        """An empty module to `load_state_dict` into (the loader's path)."""
        return cls(in_features, out_features, spec, bias=bias, g_idx=g_idx, **kw)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, name: str = "QuantLinear",
                       **kw) -> "QuantLinear":
        n, k = qw.shape
        m = cls(k, n, qw.spec, bias=bias is not None, g_idx=qw.g_idx is not None, name=name, **kw)
        want = _param_shape(qw.spec, n, k)
        if tuple(qw.scale.shape) != want:
            raise LowbitError(f"{name}: scale has shape {tuple(qw.scale.shape)}, expected {want} for {qw.spec.describe()}")
        m.scale = qw.scale.detach().clone()
        if m.zero is not None:
            if qw.zero is None:
                raise LowbitError(f"{name}: asymmetric spec {qw.spec.describe()} needs a zero point")
            m.zero = qw.zero.detach().float().clone()
        if qw.g_idx is not None:
            m.g_idx = qw.g_idx.detach().to(torch.int32).clone()
        if bias is not None:
            m.bias = bias.detach().clone()
        m._set_codes(m._unsigned(qw.codes))
        return m

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], config: dict, **kw) -> "QuantLinear":
        """Rebuild from `state_dict()` tensors (prefix stripped) and `config()`."""
        m = cls.empty_like_spec(config["in_features"], config["out_features"], QuantSpec.from_dict(config["spec"]),
                                bias=config.get("bias", False), g_idx=config.get("g_idx", False), **kw)
        m.load_state_dict(state)
        return m

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "spec": self.spec.to_dict(),
                "bias": self.bias is not None, "g_idx": self.g_idx is not None}

    def _unsigned(self, codes: torch.Tensor) -> torch.Tensor:
        if tuple(codes.shape) != (self.out_features, self.in_features):
            raise LowbitError(f"codes have shape {tuple(codes.shape)}, expected {(self.out_features, self.in_features)}")
        return codes.to(torch.int32) + self.offset

    def _set_codes(self, u: torch.Tensor) -> None:
        """Store unsigned codes [N, K] in this path's in-memory layout."""
        if self.path == "int4":
            self.qweight = int4_layout.pack(u)
        elif self.path == "int8":
            self.qweight = (u - self.offset).to(torch.int8)
        else:
            self.qweight = pack_bits(u, self.spec.bits, torch.int32)
        self._refresh()

    def _unsigned_codes(self) -> torch.Tensor:
        if self.path == "int4":
            return int4_layout.unpack(self.qweight, self.out_features, self.in_features).to(torch.int32)
        if self.path == "int8":
            return self.qweight.to(torch.int32) + self.offset
        return dequant.unpack_int32(self.qweight, self.spec.bits, self.in_features)

    def _refresh(self) -> None:
        """Recompute the kernels' derived (non-persistent) side tensors."""
        if self.path == "int4":
            zf = None if self.zero is None else (8 - self.zero.float()) * self.scale.float()
            self.sz = int4_layout.scales_and_zeros(self.scale, zf, self.kgroup, self.out_features, self.in_features)
        elif self.path == "int8":
            self.s_bf16 = self.scale.float().expand(self.out_features, 1).reshape(-1).to(BF16).contiguous()

    def to_quantized(self) -> QuantizedWeight:
        u = self._unsigned_codes()
        if self.spec.dtype == "int" and self.spec.symmetric:
            codes = (u - self.offset).to(torch.int8)
        else:
            codes = u.to(torch.uint8)
        return QuantizedWeight(codes, self.scale.clone(), None if self.zero is None else self.zero.clone(), self.spec,
                               None if self.g_idx is None else self.g_idx.clone())

    # ---- state dict: portable qweight ---------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.path != "packed":
            destination[prefix + "qweight"] = pack_bits(self._unsigned_codes(), self.spec.bits, torch.int32)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "qweight"
        if self.path != "packed" and key in state_dict:
            q = state_dict[key]
            want = (self.out_features, packed_len(self.in_features, self.spec.bits))
            if tuple(q.shape) != want or q.dtype != torch.int32:
                error_msgs.append(f"{key}: expected int32 {want}, got {q.dtype} {tuple(q.shape)}")
                return
            state_dict = dict(state_dict)
            u = dequant.unpack_int32(q, self.spec.bits, self.in_features)
            state_dict[key] = int4_layout.pack(u) if self.path == "int4" else (u - self.offset).to(torch.int8)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._refresh()

    # ---- compute ------------------------------------------------------------------------
    def dense_weight(self, dtype: torch.dtype = BF16) -> torch.Tensor:
        """The dequantized weight [out, in] (computed now, never cached)."""
        c = self.compile_dequant
        if self.path == "int4":
            return dequant.dequant_int4pack_fast(self.qweight, self.sz, self.out_features, self.in_features, dtype,
                                                 compile=c)
        if self.path == "int8":
            return dequant.dequant_int8_fast(self.qweight, self.scale.expand(self.out_features, 1), dtype, compile=c)
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
        """Bytes held in memory for the weight: packed codes + scales/zeros + kernel side tensors."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers()
                   if b is not None and (include_bias or name != "bias"))

    def bits_per_weight(self) -> float:
        return self.nbytes() * 8 / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.describe()}, "
                f"path={self.path}, bias={self.bias is not None}")
