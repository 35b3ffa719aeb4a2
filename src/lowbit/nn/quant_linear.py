"""QuantLinear: a drop-in nn.Linear replacement holding packed codes and running real kernels.

One copy of the weight for every spec: unsigned codes packed along each row
(the compiled kernels' row layouts, nn/cpu_layout.py; lowbit.core.packing's bit stream for the
pure-torch path), scale / zero per group in the
spec's scale dtype (float16 by default), a value table for codebooks (NF4, FP4). Act-order layers
(`g_idx`) whose groups are each `group_size` columns are stored column-permuted so groups are
contiguous; the input is gathered by `perm` (one index_select of the activations per call).

Compute (`kernel`):
  "cpu"    lowbit's compiled kernels (csrc/qmatmul.cpp): for up to `GEMV_MAX_ROWS` input rows a
           GEMV that unpacks codes in registers and never materialises the weight; for more rows
           (prefill) the weight is dequantized to bf16 (one layer's scratch) and multiplied by a
           dense bf16 GEMM. `forward_int8_activations` (the runtime's prefill) instead quantizes the
           input to int8 in blocks of 32 and multiplies with VNNI (csrc/qgemm_i8.cpp).
  "torch"  the same arithmetic in plain torch (layouts the kernels do not cover: fp8, 7-bit, K or
           groups not multiples of 32, irregular g_idx; or no compiled kernels on this machine).
Both compute in bf16 activations x the exact weight values with fp32 accumulation and agree within
bf16 rounding (tests/nn/test_quant_linear.py).

Built from a quantized-layer record (`from_quantized`); the record is the only portable form.
"""

from __future__ import annotations

import torch

from lowbit.core.formats import codebook
from lowbit.core.packing import pack_bits, packed_len
from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.core.cpu_features import compute_dtype
from lowbit.nn import cpu_kernels, cpu_layout, dequant
from lowbit.nn.held_buffers import HoldsQuantBuffers
from lowbit.spec import QuantSpec

BF16 = torch.bfloat16
# Above this many input rows dequantize + bf16 GEMM beats the GEMV (bench/kernel_crossover.py).
GEMV_MAX_ROWS = 8


def _param_shape(spec: QuantSpec, out_features: int, in_features: int) -> tuple[int, int]:
    if spec.granularity == "tensor":
        return (1, 1)
    if spec.granularity == "group":
        return (out_features, in_features // spec.group_size)
    return (out_features, 1)


def regular_perm(g_idx: torch.Tensor, group_size: int | None) -> torch.Tensor | None:
    """The column order that makes act-order groups contiguous, when every group holds exactly
    `group_size` columns (GPTQ's act-order); None for any other g_idx."""
    if group_size is None:
        return None
    perm = torch.argsort(g_idx.to(torch.int64), stable=True)
    want = torch.arange(g_idx.numel()) // group_size
    return perm if torch.equal(g_idx.to(torch.int64)[perm], want) else None


class QuantLinear(HoldsQuantBuffers):
    """y = x @ W.T + b with W held as packed quantized codes (see module docstring)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 g_idx: bool = False, perm: bool = False, kernel: str | None = None, name: str = "QuantLinear"):
        super().__init__()
        spec.check_shape(out_features, in_features, name)
        self.in_features, self.out_features, self.spec, self.name = in_features, out_features, spec, name
        self.group_size = spec.group_size if spec.granularity == "group" else None
        self.offset = 2 ** (spec.bits - 1) if spec.dtype == "int" and spec.symmetric else 0
        auto = "cpu" if (cpu_kernels.load() is not None and not g_idx
                         and cpu_kernels.covers(spec, in_features, self.group_size)) else "torch"
        if kernel not in (None, "cpu", "torch"):
            raise LowbitError(f"{name}: unknown kernel {kernel!r}; use cpu or torch")
        if kernel == "cpu" and auto != "cpu":
            raise LowbitError(f"{name}: the compiled CPU kernels do not run {spec.describe()} at in_features="
                              f"{in_features} on this machine")
        self.kernel = kernel or auto
        self._layout = None  # the kernels' (bits, layout, group, mode, offset), made on first use
        n, k = out_features, in_features
        pshape = _param_shape(spec, n, k)
        asym = spec.dtype == "int" and not spec.symmetric
        if self.kernel == "cpu":  # the kernels' row layout (nn/cpu_layout.py), bits/8 bytes per weight
            self.register_buffer("qweight", torch.zeros(n, k * spec.bits // 8, dtype=torch.uint8))
        else:
            self.register_buffer("qweight", torch.zeros(n, packed_len(k, spec.bits), dtype=torch.int32))
        self.register_buffer("scale", torch.ones(pshape, dtype=spec.torch_scale_dtype))
        self.register_buffer("zero", torch.zeros(pshape, dtype=spec.torch_scale_dtype) if asym else None)
        self.register_buffer("perm", torch.arange(k, dtype=torch.int32) if perm else None)
        self.register_buffer("g_idx", torch.zeros(k, dtype=torch.int32) if g_idx else None)
        self.register_buffer("bias", torch.zeros(n) if bias else None)
        self._mode = ("int_scaled_zero" if spec.scaled_zero else "int") if spec.dtype == "int" else (
            "table" if spec.is_codebook else spec.dtype)
        self.register_buffer("table", codebook(spec.dtype) if spec.is_codebook else None, persistent=False)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, name: str = "QuantLinear",
                       kernel: str | None = None) -> "QuantLinear":
        n, k = qw.shape
        group = qw.spec.group_size if qw.spec.granularity == "group" else None
        perm = regular_perm(qw.g_idx, group) if qw.g_idx is not None else None
        irregular = qw.g_idx is not None and perm is None
        m = cls(k, n, qw.spec, bias=bias is not None, g_idx=irregular, perm=perm is not None, kernel=kernel, name=name)
        want = _param_shape(qw.spec, n, k)
        if tuple(qw.scale.shape) != want:
            raise LowbitError(f"{name}: scale has shape {tuple(qw.scale.shape)}, expected {want} for {qw.spec.describe()}")
        asym = qw.spec.dtype == "int" and not qw.spec.symmetric
        if asym and qw.zero is None:
            raise LowbitError(f"{name}: asymmetric spec {qw.spec.describe()} needs a zero point")
        if tuple(qw.codes.shape) != (n, k):
            raise LowbitError(f"{name}: codes have shape {tuple(qw.codes.shape)}, expected {(n, k)}")
        u = (qw.codes.to(torch.int16) + m.offset).to(torch.uint8)  # unsigned codes, one byte each
        if perm is not None:
            u = u[:, perm]
            m.perm = perm.to(torch.int32)
        if irregular:
            m.g_idx = qw.g_idx.detach().to(torch.int32).clone()
        m.qweight = cpu_layout.pack(u, qw.spec.bits) if m.kernel == "cpu" else pack_bits(u, qw.spec.bits, torch.int32)
        m.scale = qw.scale.detach().clone()
        if asym:
            m.zero = qw.zero.detach().clone()
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    # ---- compute ------------------------------------------------------------------------
    def _kernel_args(self):
        return (self.qweight, self.scale, self.zero, self.table)

    def _layout_args(self):
        if self._layout is None:
            self._layout = (self.spec.bits, cpu_layout.layout_for(self.spec.bits), self.group_size or self.in_features,
                            cpu_kernels.mode(self.spec), self.offset)
        return self._layout

    def _stored_dense(self, dtype: torch.dtype = BF16) -> torch.Tensor:
        """The dequantized weight [out, in] in storage column order (permuted for act-order)."""
        if self.kernel == "cpu":
            bits, layout, group, mode, offset = self._layout_args()
            w = cpu_kernels.ext().dequant(*self._kernel_args(), bits, layout, self.in_features, group, mode, offset)
            return w if dtype == BF16 else w.to(dtype)
        return dequant.dequant_packed(self.qweight, self.scale, self.zero, self.table, self.spec.bits,
                                      self.in_features, self.group_size, self.g_idx, self._mode, self.offset, dtype)

    def dense_weight(self, dtype: torch.dtype = BF16) -> torch.Tensor:
        """The dequantized weight [out, in] in the layer's column order (computed now, never cached)."""
        w = self._stored_dense(dtype)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "cpu" and x2.shape[0] <= GEMV_MAX_ROWS:
            y = cpu_kernels.ext().qmatmul(x2, *self._kernel_args(), self.perm, self.bias, *self._layout_args())
        else:
            xs = x2 if self.perm is None else x2.index_select(1, self.perm)
            cd = compute_dtype()  # bf16 where the CPU multiplies it natively, float32 elsewhere
            y = torch.mm(xs.to(cd), self._stored_dense(cd).t()).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    @property
    def takes_int8_activations(self) -> bool:
        """Whether `forward_int8_activations` runs here: integer codes on the compiled kernels, a VNNI CPU."""
        return (self.kernel == "cpu" and cpu_kernels.mode(self.spec) != cpu_kernels.MODE_TABLE
                and cpu_kernels.vnni())

    def forward_int8_activations(self, x: torch.Tensor) -> torch.Tensor:
        """y = x @ W.T + b with x quantized to int8 in blocks of 32 (one scale each, llama.cpp's scheme for
        its quantized matmuls) and multiplied with the codes by VNNI (csrc/qgemm_i8.cpp): ~1.3x a dense
        bf16 GEMM here, for prefill. `forward` keeps bf16 activations (what evaluation measures).
        Needs `takes_int8_activations`."""
        x2 = x.reshape(-1, self.in_features)
        y = cpu_kernels.ext().qgemm_i8(x2, self.qweight, self.scale, self.zero, self.perm, self.bias,
                                       *self._layout_args())
        return y.reshape(*x.shape[:-1], self.out_features)

    # ---- size ---------------------------------------------------------------------------
    def nbytes(self, include_bias: bool = False) -> int:
        """Bytes held in memory for the weight: packed codes + scales/zeros (+ perm / g_idx)."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers()
                   if b is not None and (include_bias or name != "bias"))

    def bits_per_weight(self) -> float:
        return self.nbytes() * 8 / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.describe()}, "
                f"kernel={self.kernel}, bias={self.bias is not None}")
