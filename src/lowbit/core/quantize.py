"""Quantize / dequantize with a QuantSpec, and the format-neutral QuantizedWeight."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.finite import all_finite, count_nonfinite
from lowbit.core.formats import FP8_DTYPES, codebook, nearest_code
from lowbit.core.groups import as_2d, expand_params
from lowbit.core.qparams import choose_qparams
from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec


def _codes_dtype(spec: QuantSpec) -> torch.dtype:
    if spec.dtype != "int":
        return torch.uint8
    return torch.int8 if spec.symmetric else torch.uint8


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
                   g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Codes of x [rows, cols] for given scale/zero [rows|1, n_groups].

    int: signed codes in [qmin, qmax] when symmetric, unsigned when asymmetric.
    nf4/fp4: index into the codebook; fp8: the float8 bit pattern as uint8.
    """
    x2 = as_2d(x).float()
    s = expand_params(scale.float(), x2.shape, spec, g_idx)
    if spec.dtype == "int":
        if spec.scaled_zero:  # w = q·s − zero
            q = (x2 + expand_params(zero.float(), x2.shape, spec, g_idx)) / s
            return torch.round(q).clamp(spec.qmin, spec.qmax).to(_codes_dtype(spec))
        q = x2 / s
        if zero is not None:  # round(x/s + z): the same as round(x/s) + z for an integer zero point
            q = q + expand_params(zero.float(), x2.shape, spec, g_idx)
        return torch.round(q).clamp(spec.qmin, spec.qmax).to(_codes_dtype(spec))
    if spec.is_codebook:
        return nearest_code(x2 / s, codebook(spec.dtype))
    fp8 = FP8_DTYPES[spec.dtype]
    top = torch.finfo(fp8).max
    return (x2 / s).clamp(-top, top).to(fp8).view(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
               g_idx: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    shape = tuple(codes.shape)
    s = expand_params(scale.float(), shape, spec, g_idx)
    if spec.dtype == "int":
        q = codes.float()
        if spec.scaled_zero:  # q·s − zero, llama.cpp's order of operations (bit-exact against it)
            return (q * s - expand_params(zero.float(), shape, spec, g_idx)).to(dtype)
        if zero is not None:
            q = q - expand_params(zero.float(), shape, spec, g_idx)
        return (q * s).to(dtype)
    if spec.is_codebook:
        return (codebook(spec.dtype)[codes.long()] * s).to(dtype)
    return (codes.view(FP8_DTYPES[spec.dtype]).float() * s).to(dtype)


@dataclass
class QuantizedWeight:
    """The quantized-layer record: what every method produces and every kernel and writer consumes.

    codes: unpacked [rows, cols] (int8 signed for symmetric int, uint8 otherwise); scale and zero
    [rows|1, n_groups|1] held in the spec's `scale_dtype` (float16 by default) — the record refuses
    values that dtype cannot hold exactly, so what is saved is what the method optimised; g_idx:
    act-order group of each column (None = contiguous groups); error: the method's measured relative
    output error on the calibration inputs (None without calibration). Packing happens only in
    nn/ kernels and export/ writers.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec
    g_idx: torch.Tensor | None = None
    error: float | None = None

    def __post_init__(self) -> None:
        self.scale = _stored(self.scale, self.spec, "scale")
        if self.zero is not None:
            self.zero = _stored(self.zero, self.spec, "zero point")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.spec, self.g_idx, dtype)

    def bits_per_weight(self) -> float:
        """Code bits plus the stored scale, zero and g_idx, per weight (lowbit's file layout)."""
        n = self.codes.numel()
        side = sum(t.numel() * t.element_size() * 8 for t in (self.scale, self.zero, self.g_idx) if t is not None)
        return self.spec.bits + side / n


def _stored(t: torch.Tensor, spec: QuantSpec, what: str) -> torch.Tensor:
    dt = spec.torch_scale_dtype
    if t.dtype == dt:
        return t
    out = t.detach().to(dt)
    if not torch.equal(out.float(), t.detach().float()):
        raise LowbitError(f"{what} values are not exactly representable in {spec.scale_dtype}; "
                          "round them with lowbit.core.qparams.round_params before quantizing")
    return out


def quantize(x: torch.Tensor, spec: QuantSpec, shrink: float | torch.Tensor = 1.0) -> QuantizedWeight:
    """Round-to-nearest quantization of a 2-D tensor with min-max parameters."""
    x2 = as_2d(x)
    if not all_finite(x2):
        bad = count_nonfinite(x2)
        raise LowbitError(f"tensor holds {bad} NaN/Inf values; cannot quantize it")
    scale, zero = choose_qparams(x2, spec, shrink)
    return QuantizedWeight(quantize_codes(x2, scale, zero, spec), scale, zero, spec)


def split_rows(qw: QuantizedWeight, sizes: list[int]) -> list[QuantizedWeight]:
    """Split a QuantizedWeight of row-stacked matrices back into its parts (row counts `sizes`)."""
    if sum(sizes) != qw.codes.shape[0]:
        raise LowbitError(f"split_rows: sizes {sizes} do not add up to {qw.codes.shape[0]} rows")
    parts, start = [], 0

    def rows(t, sl):
        return None if t is None else (t[sl].clone() if t.shape[0] > 1 else t.clone())

    for n in sizes:
        sl = slice(start, start + n)
        parts.append(QuantizedWeight(qw.codes[sl].clone(), rows(qw.scale, sl), rows(qw.zero, sl), qw.spec,
                                     None if qw.g_idx is None else qw.g_idx.clone(), qw.error))
        start += n
    return parts
