"""int8 arithmetic of activation-quantized layers, pure functions over tensors.

Weights: symmetric int8 (or narrower codes held in int8) per output channel, stored transposed
[K, N] for the integer matmul. Activations: symmetric int8 in [-127, 127] per token (dynamic) or
with calibrated scales; asymmetric uint8 codes q in [0, 255] are run as the int8 q - 128 with the
zero point's share folded into a per-output constant (`zero_correction`), so every matmul is one
int8 x int8 -> int32 `torch._int_mm` (oneDNN VNNI here) followed by one fused rescale.
"""

from __future__ import annotations

import functools

import torch

I8_MAX = 127
EPS = 1e-12


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (codes int8 [M, K], scale float32 [M, 1]); symmetric, one scale per row."""
    qmax = 2 ** (bits - 1) - 1
    x = x.float()
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=1, keepdim=True)  # one pass, no |x| copy
    scale = (amax / qmax).clamp_min_(EPS)
    q = torch.div(x, scale).round_()  # |x| / (max|x| / qmax) <= qmax: no clamp needed
    return q.to(torch.int8), scale


def quantize_per_tensor_dynamic(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = 2 ** (bits - 1) - 1
    x = x.float()
    scale = (x.abs().amax() / qmax).clamp_min(EPS).reshape(1, 1)
    return torch.round(x / scale).clamp_(-qmax, qmax).to(torch.int8), scale


def quantize_static(x: torch.Tensor, inv_scale: torch.Tensor, zero: torch.Tensor | None, qmin: int,
                    qmax: int) -> torch.Tensor:
    """Codes of x [M, K] with fixed parameters (scalar or [K]) as int8: symmetric codes as they are,
    asymmetric uint8 codes shifted by -128 (see `zero_correction`)."""
    q = torch.round(x.float() * inv_scale)
    if zero is None:
        return q.clamp_(qmin, qmax).to(torch.int8)
    return (q.add_(zero).clamp_(qmin, qmax).sub_(128)).to(torch.int8)


def zero_correction(w_codes: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor | None:
    """int32 [N]: sum_k (128 - z_k) w_nk, what the shifted codes q - 128 leave out of
    sum_k (q_k - z_k) w_nk. w_codes [N, K] int8; zero scalar or [K]."""
    if zero is None:
        return None
    z = (128 - zero.float()).reshape(1, -1).expand(1, w_codes.shape[1])
    return (w_codes.float() * z).sum(dim=1).round().to(torch.int32)


def quantize_weight(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes int8 [N, K], scale float32 [N]); symmetric per output channel (max |w| / 127)."""
    qmax = 2 ** (bits - 1) - 1
    scale = (w.float().abs().amax(dim=1) / qmax).clamp_min(EPS)
    return torch.round(w.float() / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8), scale


@functools.cache
def int_mm_is_slow() -> bool:
    """True on CPUs without AVX-512 (torch's capability AVX2 / DEFAULT): there torch's CPU `_int_mm`
    has no VNNI kernel and measured ~45x slower than an fp32 matmul (512 x 576 x 1536 on an
    AVX2-only AMD EPYC), so `int_matmul` takes the exact float64 path instead."""
    return not torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")


def int_matmul(q: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [K, N] -> int32 [M, N]. K = 1 takes an exact float path: torch 2.13's
    CPU `_int_mm` returns wrong sums for K = 1 (tests/nn/test_int8_kernels.py). Where `_int_mm` is
    slow (`int_mm_is_slow`) the product runs in float64, which holds every int8 x int8 sum exactly
    (|sum| <= 127**2 * K < 2**53): the same int32 result."""
    if q.shape[1] == 1:
        return (q.float() @ w_t.float()).to(torch.int32)  # |products| <= 127**2: exact in float32
    if int_mm_is_slow():
        return (q.double() @ w_t.double()).to(torch.int32)
    return torch._int_mm(q.contiguous(), w_t)


def rescale(acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor, bias: torch.Tensor | None,
            correction: torch.Tensor | None = None) -> torch.Tensor:
    """(acc + correction) * row_scale * col_scale + bias, float32, in place on one buffer (the
    int32 -> float32 conversion happens inside the first multiply)."""
    if correction is not None:
        acc = acc + correction
    y = torch.mul(acc, row_scale) if row_scale.dim() > 0 else acc.float()
    y.mul_(col_scale)
    if bias is not None:
        y.add_(bias)
    return y


def dynamic_linear(x: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   per_token: bool = True, bits: int = 8) -> torch.Tensor:
    """W8A8 dynamic: x [M, K] float -> y [M, N] float32."""
    q, s = quantize_per_token(x, bits) if per_token else quantize_per_tensor_dynamic(x, bits)
    return rescale(int_matmul(q, w_t), s, w_scale, bias)


def static_linear(x: torch.Tensor, w_t: torch.Tensor, out_scale: torch.Tensor, bias: torch.Tensor | None,
                  inv_in_scale: torch.Tensor, in_zero: torch.Tensor | None, correction: torch.Tensor | None,
                  qmin: int, qmax: int) -> torch.Tensor:
    """Static int8: codes from fixed input parameters; out_scale = in_scale x w_scale per output
    (per-channel input scales are folded into the weight before it is quantized)."""
    q = quantize_static(x, inv_in_scale, in_zero, qmin, qmax)
    acc = int_matmul(q, w_t)
    return rescale(acc, torch.ones(()), out_scale, bias, correction)


def requantize(y: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, qmin: int, qmax: int) -> torch.Tensor:
    """y rounded onto an output spec's int8 grid and back (the quant / dequant point after a layer)."""
    q = torch.round(y / scale)
    if zero is not None:
        q = q + zero
    q = q.clamp_(qmin, qmax)
    if zero is not None:
        q = q - zero
    return q * scale
