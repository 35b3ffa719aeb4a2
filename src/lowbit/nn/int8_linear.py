"""Int8Linear: a Linear run as int8 x int8 -> int32 (`torch._int_mm`) with the rescale fused.

Weights: symmetric codes (int8, or 4-bit GPTQ codes held in int8 for W4A8) with one float32 scale
per output channel. Inputs: dynamic (per-token or per-tensor scales computed at run time) or static
(calibrated per-tensor scale, or per-channel scales folded into the weight before it was
quantized, so the kernel divides the input by them and multiplies by the weight's codes only).
An optional output spec rounds the result onto a calibrated int8 grid (the quant / dequant point
between this layer and the next). Built from the quantized-layer record of its (folded) weight
(`from_record`) or from a float Linear (`from_float`); `record()` gives the record back.

Measured here (2 cores, AVX-512 VNNI via oneDNN, bench in docs/DESIGN.md): `_int_mm` is ~10x an
fp32 matmul and ~3x bf16 at 512 x 576 x 1536; quantizing the input costs a few per cent of it.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core import int8
from lowbit.core.quantize import QuantizedWeight, quantize
from lowbit.errors import LowbitError
from lowbit.nn import cpu_kernels
from lowbit.nn.held_buffers import HoldsQuantBuffers
from lowbit.nn.shared_input import quantized_once
from lowbit.spec import ActSpec, LayerScheme


def _act_params(spec: ActSpec, scale: torch.Tensor | None, zero: torch.Tensor | None, name: str, what: str,
                features: int):
    """Static parameters as the kernel holds them: [features] per channel, 0-d per tensor."""
    if spec is None or spec.dynamic:
        return None, None
    if scale is None:
        raise LowbitError(f"{name}: the static {what} spec needs calibrated scales; run calibrate() first")
    n = features if spec.granularity == "channel" else 1
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    if scale.numel() != n:
        raise LowbitError(f"{name}: {what} scale has {scale.numel()} values, expected {n} ({spec.describe()})")
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise LowbitError(f"{name}: {what} scales must be finite and positive")
    z = None if spec.symmetric else torch.as_tensor(zero, dtype=torch.float32).reshape(scale.shape).clone()
    if spec.granularity != "channel":
        return scale.reshape(()).clone(), None if z is None else z.reshape(())
    return scale.clone(), z


ACT_TENSORS = ("input_scale", "input_zero", "output_scale", "output_zero")  # saved as `<name>.<tensor>`


class Int8Linear(HoldsQuantBuffers):
    def __init__(self, in_features: int, out_features: int, scheme: LayerScheme, bias: bool = True,
                 name: str = "Int8Linear"):
        super().__init__()
        w = scheme.weight
        if scheme.input is None:
            raise LowbitError(f"{name}: Int8Linear needs an input activation spec; weight-only layers are QuantLinear")
        if w.dtype != "int" or not w.symmetric or w.granularity != "channel" or w.bits > 8:
            raise LowbitError(f"{name}: the int8 kernel takes symmetric per-channel integer weights of <= 8 bits; "
                              f"got {w.describe()}")
        self.in_features, self.out_features, self.scheme, self.name = in_features, out_features, scheme, name
        n, k = out_features, in_features
        self.register_buffer("weight_codes", torch.zeros(n, k, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n) if bias else None)
        a = scheme.input
        static_in = not a.dynamic
        shape = (k,) if a.granularity == "channel" else ()
        self.register_buffer("input_scale", torch.ones(shape) if static_in else None)
        self.register_buffer("input_zero", torch.zeros(shape) if static_in and not a.symmetric else None)
        o = scheme.output
        self.register_buffer("output_scale", torch.ones(()) if o is not None else None)
        self.register_buffer("output_zero", torch.zeros(()) if o is not None and not o.symmetric else None)
        self._derived = None

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_record(cls, qw: QuantizedWeight, bias: torch.Tensor | None, scheme: LayerScheme,
                    input_scale=None, input_zero=None, output_scale=None, output_zero=None,
                    name: str = "Int8Linear") -> "Int8Linear":
        """From the record of the weight as the kernel multiplies it (per-channel static input
        scales already folded in)."""
        n, k = qw.shape
        m = cls(k, n, LayerScheme(qw.spec, scheme.input, scheme.output), bias=bias is not None, name=name)
        if qw.g_idx is not None or qw.zero is not None or qw.scale.numel() != n:
            raise LowbitError(f"{name}: the int8 kernel needs a symmetric per-channel record without g_idx")
        m.weight_codes = qw.codes.to(torch.int8).contiguous()
        m.weight_scale = qw.scale.float().reshape(n).clone()
        if bias is not None:
            m.bias = bias.detach().float().clone()
        s, z = _act_params(scheme.input, input_scale, input_zero, name, "input", k)
        if s is not None:
            m.input_scale, m.input_zero = s, z
        if scheme.output is not None:
            s, z = _act_params(scheme.output, output_scale, output_zero, name, "output", 1)
            m.output_scale, m.output_zero = s, z
        return m

    @classmethod
    def from_float(cls, linear: nn.Linear, scheme: LayerScheme, input_qparams=None, output_qparams=None,
                   name: str = "Int8Linear") -> "Int8Linear":
        """Quantize a float Linear: weight per channel (after folding per-channel input scales)."""
        w = linear.weight.detach().float()
        in_scale, in_zero = input_qparams if input_qparams is not None else (None, None)
        if scheme.input is not None and not scheme.input.dynamic and scheme.input.granularity == "channel":
            if in_scale is None:
                raise LowbitError(f"{name}: the static input spec needs calibrated scales; run calibrate() first")
            w = w * torch.as_tensor(in_scale).float().reshape(1, -1)
        qw = quantize(w, scheme.weight)
        out = output_qparams if output_qparams is not None else (None, None)
        return cls.from_record(qw, linear.bias, scheme, in_scale, in_zero, out[0], out[1], name=name)

    @classmethod
    def from_saved(cls, qw: QuantizedWeight, bias, scheme: dict, params: dict, name: str) -> "Int8Linear":
        """From a checkpoint: the record, the scheme as saved (`LayerScheme.to_dict`) and the
        activation tensors `ACT_TENSORS` (None where the scheme has none)."""
        return cls.from_record(qw, bias, LayerScheme.from_dict(scheme), *(params.get(t) for t in ACT_TENSORS),
                               name=name)

    def record(self) -> QuantizedWeight:
        return QuantizedWeight(self.weight_codes.clone(), self.weight_scale.reshape(-1, 1).clone(), None,
                               self.scheme.weight)

    def _after_apply(self) -> None:
        self._derived = None

    # ---- compute ------------------------------------------------------------------------
    def _prepared(self):
        """Derived constants (transposed codes, 1/scale, the zero correction, the fused output
        scale), made on first use from the buffers."""
        if self._derived is None:
            w_t = self.weight_codes.t()  # [K, N] view of [N, K]: the faster operand order for _int_mm here
            a = self.scheme.input
            if a.dynamic:
                self._derived = (w_t, None, None, None, self.weight_scale)
            else:
                per_channel = a.granularity == "channel"
                inv = 1.0 / self.input_scale
                corr = int8.zero_correction(self.weight_codes, self.input_zero)
                out_scale = self.weight_scale if per_channel else self.weight_scale * self.input_scale
                self._derived = (w_t, inv, self.input_zero, corr, out_scale)
        return self._derived

    def linear2d(self, x2: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """x2 [M, K]; `source`: the tensor x2 was reshaped from (dynamic per-token layers reuse its
        codes when the previous layer quantized the same tensor, `nn.shared_input`)."""
        w_t, inv, zero, corr, out_scale = self._prepared()
        a = self.scheme.input
        ext = cpu_kernels.load()  # the quantize / rescale passes in one loop each, bit-identical to core.int8
        if a.dynamic and a.granularity == "token" and a.bits == 8 and ext is not None:
            if source is None:
                q, s = ext.quantize_rows_i8(x2)
            else:
                q, s = quantized_once(source, ("token", 8, tuple(x2.shape)), lambda: ext.quantize_rows_i8(x2))
            y = ext.rescale_i32(int8.int_matmul(q, w_t), s, out_scale, self.bias, None)
        elif a.dynamic:
            y = int8.dynamic_linear(x2, w_t, out_scale, self.bias, per_token=a.granularity == "token", bits=a.bits)
        elif ext is not None:
            q = int8.quantize_static(x2, inv, zero, a.qmin, a.qmax)
            y = ext.rescale_i32(int8.int_matmul(q, w_t), None, out_scale, self.bias, corr)
        else:
            y = int8.static_linear(x2, w_t, out_scale, self.bias, inv, zero, corr, a.qmin, a.qmax)
        o = self.scheme.output
        if o is not None:
            y = int8.requantize(y, self.output_scale, self.output_zero, o.qmin, o.qmax)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise LowbitError(f"{self.name}: input has {x.shape[-1]} features, the layer takes {self.in_features}")
        y = self.linear2d(x.reshape(-1, self.in_features), source=x)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if b is not None and n != "bias")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.describe()}, "
                f"bias={self.bias is not None}")
