"""Linear4bit: a frozen Linear held in QLoRA storage (4-bit NF4/FP4 + double-quantized absmax).

Codes live in the compiled kernels' 4-bit row layout (nn/cpu_layout.py: B4), so the frozen base
runs on lowbit's NF4 kernel path: training (many rows) dequantizes the weight to bf16 per call and
multiplies with a bf16 GEMM, and the backward pass dequantizes again instead of keeping the dense
weight (only the 4.127-bit form stays in memory); inference with at most `GEMV_MAX_ROWS` rows
runs the kernels' GEMV. The per-block absmax is recovered from its 8-bit codes on every call
(blocks/64 values, negligible). Without the kernels, the same arithmetic runs in plain torch.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core.cpu_features import compute_dtype
from lowbit.errors import LowbitError
from lowbit.nn import cpu_kernels, cpu_layout
from lowbit.nn.held_buffers import HoldsQuantBuffers
from lowbit.nn.quant_linear import GEMV_MAX_ROWS
from lowbit.qlora.storage import BLOCK, Packed4bit, dequantize_blockwise8, quantize_4bit, table



class _DequantMatmul(torch.autograd.Function):
    """y = x @ W.T with W dequantized in forward and again in backward (never saved), in the
    compute dtype (bf16 where this CPU multiplies it natively, float32 elsewhere)."""

    @staticmethod
    def forward(ctx, x, layer):
        cd = compute_dtype()
        ctx.layer, ctx.dtype, ctx.cd = layer, x.dtype, cd
        return torch.mm(x.to(cd), layer.dense(cd).t())

    @staticmethod
    def backward(ctx, gy):
        gx = torch.mm(gy.to(ctx.cd), ctx.layer.dense(ctx.cd))
        return gx.to(ctx.dtype), None


class Linear4bit(HoldsQuantBuffers):
    """y = x @ W.T + b, W frozen in QLoRA storage. Output in the compute dtype (`core.cpu_features`:
    bf16 on CPUs with native bf16 matmuls, float32 elsewhere)."""

    def __init__(self, packed: Packed4bit, bias: torch.Tensor | None = None, name: str = "Linear4bit"):
        super().__init__()
        rows, cols = packed.shape
        if cols % BLOCK:
            raise LowbitError(f"{name}: {cols} input features are not whole blocks of {BLOCK}; leave this "
                              "layer out of the 4-bit base (it stays dense)")
        self.out_features, self.in_features, self.name = rows, cols, name
        self.quant_type, self.offset = packed.quant_type, packed.offset
        self.register_buffer("qweight", cpu_layout.pack(packed.codes, 4))
        self.register_buffer("absmax", packed.absmax.clone())
        self.register_buffer("nested_absmax", None if packed.nested_absmax is None else packed.nested_absmax.clone())
        self.register_buffer("nested_code", None if packed.nested_code is None else packed.nested_code.clone())
        self.register_buffer("table", table(packed.quant_type))
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype()).clone())
        self.use_kernels = cpu_kernels.load() is not None and cols % 64 == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = True,
                    name: str = "Linear4bit") -> "Linear4bit":
        packed = quantize_4bit(linear.weight.detach(), quant_type, double_quant)
        return cls(packed, linear.bias, name)

    def packed(self) -> Packed4bit:
        """The storage record (codes unpacked), e.g. for export or a bit-exact comparison."""
        codes = cpu_layout.unpack(self.qweight, 4, self.in_features)
        return Packed4bit(codes, self.absmax, (self.out_features, self.in_features), self.quant_type,
                          self.nested_absmax, self.nested_code, self.offset)

    def scale(self) -> torch.Tensor:
        """float32 [out, in / 64]: each block's absmax."""
        if self.nested_absmax is None:
            a = self.absmax.float()
        else:
            a = dequantize_blockwise8(self.absmax, self.nested_absmax, self.nested_code) + torch.tensor(
                self.offset, dtype=torch.float32)
        return a.reshape(self.out_features, -1)

    def _layout(self):
        return (4, cpu_layout.B4, BLOCK, cpu_kernels.MODE_TABLE, 0)

    def dense(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The dequantized weight [out, in] (computed now, never cached)."""
        if self.use_kernels:
            bits, layout, group, mode, off = self._layout()
            w = cpu_kernels.ext().dequant(self.qweight, self.scale(), None, self.table, bits, layout,
                                          self.in_features, group, mode, off)
            return w if dtype == torch.bfloat16 else w.to(dtype)
        codes = cpu_layout.unpack(self.qweight, 4, self.in_features).long()
        v = self.table[codes].reshape(self.out_features, -1, BLOCK) * self.scale().unsqueeze(-1)
        return v.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.use_kernels and x2.shape[0] <= GEMV_MAX_ROWS and not (torch.is_grad_enabled() and x.requires_grad):
            bf16 = torch.bfloat16  # the kernels run only on CPUs where bf16 is the compute dtype
            y = cpu_kernels.ext().qmatmul(x2.to(bf16), self.qweight, self.scale(), None, self.table, None,
                                          None, *self._layout()).to(bf16)
        else:
            y = _DequantMatmul.apply(x2, self)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        """Bytes of the weight's storage (codes, absmax codes, nested absmax; not the bias)."""
        n = self.qweight.numel() + self.absmax.numel() * self.absmax.element_size()
        if self.nested_absmax is not None:
            n += self.nested_absmax.numel() * 4 + 4
        return n

    def bits_per_param(self) -> float:
        return self.nbytes() * 8 / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, quant_type={self.quant_type}, "
                f"double_quant={self.nested_absmax is not None}, kernels={self.use_kernels}")
