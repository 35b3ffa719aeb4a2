"""Fake quantization (quantize then dequantize) with a straight-through-estimator gradient."""

from __future__ import annotations

import torch

from lowbit.core.groups import expand_params, to_groups
from lowbit.core.qparams import choose_qparams
from lowbit.core.quantize import dequantize, quantize_codes
from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec


def fake_quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                  zero: torch.Tensor | None = None) -> torch.Tensor:
    """dq(q(x)) in the forward pass; gradient 1 inside the clip range and 0 outside (STE).

    Without scale/zero they are chosen by min-max from x (detached).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if scale is None:
        scale, zero = choose_qparams(x2.detach(), spec)
    with torch.no_grad():
        codes = quantize_codes(x2, scale, zero, spec)
        xq = dequantize(codes, scale, zero, spec, dtype=x.dtype)
        if spec.dtype == "int":
            lo = dequantize(torch.full_like(codes, spec.qmin), scale, zero, spec, dtype=x.dtype)
            hi = dequantize(torch.full_like(codes, spec.qmax), scale, zero, spec, dtype=x.dtype)
            s = (hi - lo) / (spec.qmax - spec.qmin)
            inside = (x2 >= lo - s / 2) & (x2 <= hi + s / 2)
        else:
            inside = torch.ones_like(x2, dtype=torch.bool)
    out = xq + (x2 - x2.detach())  # forward: exactly xq; backward: gradient 1
    out = torch.where(inside, out, xq)
    return out.reshape(shape)


def ste_value(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`value` exactly in the forward pass, the gradient of `x` in the backward pass."""
    return value.detach() + (x - x.detach())


def stored_qparams(scale: torch.Tensor, zero: torch.Tensor | None,
                   spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Learned (float32, autograd) scale / zero as the record stores them: the scale rounded to
    the spec's `scale_dtype`, an integer zero point rounded and clamped to [qmin, qmax] (a float
    zero point rounded to `scale_dtype`); forward values exact, gradients straight through."""
    from lowbit.core.qparams import round_params

    with torch.no_grad():
        s_r, _ = round_params(scale.detach(), None, spec)
        z_r = None
        if zero is not None:
            if spec.integer_zero:
                z_r = torch.round(zero.detach()).clamp(spec.qmin, spec.qmax)
            else:
                z_r = round_params(s_r, zero.detach(), spec)[1]
    s = ste_value(s_r, scale)
    return s, None if zero is None else ste_value(z_r, zero)


def learned_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
                  g_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LSQ / LSQ+ quantization of x [rows, cols] with learned parameters [rows|1, n_groups]
    (already `stored_qparams`): (q - z as float with straight-through gradients, the integer
    codes, the scale expanded to x's shape); dequantized x = (q - z) · s.

    The codes are `quantize_codes` of the same numbers, so a converted layer holds exactly these
    codes. Gradients: x gets 1 inside the clip range and 0 outside (STE); through (q - z) · s the
    scale gets LSQ's (q - z) - x/s inside and the clamped code outside; a zero point 0 inside and
    -s outside (LSQ+)."""
    if spec.dtype != "int" or spec.scaled_zero or spec.superblock is not None:
        raise LowbitError(f"learned fake quantization takes plain integer specs; got {spec.describe()}")
    with torch.no_grad():
        codes = quantize_codes(x.detach(), scale.detach(), None if zero is None else zero.detach(), spec, g_idx)
    shape = tuple(x.shape)
    s = expand_params(scale, shape, spec, g_idx)
    u = x / s
    z = None
    if zero is not None:
        z = expand_params(zero, shape, spec, g_idx)
        u = u + z
    with torch.no_grad():
        inside = (u >= spec.qmin - 0.5) & (u <= spec.qmax + 0.5)
    q = codes.float() + torch.where(inside, u - u.detach(), torch.zeros_like(u))
    if z is not None:
        q = q - z
    return q, codes, s


def fake_quantize_learned(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
                          g_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized x, integer codes) of `learned_codes`: forward value `dequantize(codes, scale,
    zero)` bit for bit."""
    q, codes, s = learned_codes(x, scale, zero, spec, g_idx)
    return q * s, codes


def activation_codes(x: torch.Tensor, spec, scale: torch.Tensor | None = None,
                     zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, features] onto an activation spec's grid the way the int8 kernels (`core.int8`)
    round it: (q - z as float with straight-through gradients, scale [rows, 1] or 0-d). Dynamic
    specs take max |x| per row ("token") or per tensor (no gradient to the scale); static ones
    the given per-tensor scale (learned: LSQ gradients) and integer zero point, with the
    kernel's multiply by 1/scale."""
    from lowbit.core.int8 import EPS

    qmax = 2 ** (spec.bits - 1) - 1
    if spec.dynamic:
        with torch.no_grad():
            xf = x.detach().float()
            if spec.granularity == "token":
                amax = torch.linalg.vector_norm(xf, ord=float("inf"), dim=1, keepdim=True)
            else:
                amax = xf.abs().amax().reshape(1, 1)
            s = (amax / qmax).clamp_min(EPS)
            q = torch.div(xf, s).round_().clamp_(-qmax, qmax)
        return ste_value(q, x / s), s
    with torch.no_grad():
        inv = 1.0 / scale.detach().float()
        q = torch.round(x.detach().float() * inv)
        if zero is not None:
            q = q + zero.detach()
        q = q.clamp(spec.qmin, spec.qmax)
    u = x / scale
    if zero is not None:
        u = u + zero
    with torch.no_grad():
        inside = (u >= spec.qmin - 0.5) & (u <= spec.qmax + 0.5)
    q = q + torch.where(inside, u - u.detach(), torch.zeros_like(u))
    if zero is not None:
        q = q - zero
    return q, scale


def fake_quantize_activation(x: torch.Tensor, spec, scale: torch.Tensor | None = None,
                             zero: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantized `activation_codes`."""
    q, s = activation_codes(x, spec, scale, zero)
    return q * s


class _GroupedLearnedFakeQuant(torch.autograd.Function):
    """dq = (clamp(round(w/s + z)) - z) · s over grouped views w3 [rows, G, gs], s3 / z3
    [rows|1, G, 1], with LSQ / LSQ+ gradients written out (a handful of passes over the
    weights instead of autograd's tens). held_codes: the scale / zero get the derivative of the
    forward with the codes held (q - z and -s), not LSQ's (see `fake_quantize_grouped`)."""

    @staticmethod
    def forward(ctx, w3, s3, z3, qmin, qmax, held_codes=False):
        u = w3 / s3
        if z3 is not None:
            u = u + z3
        q = torch.round(u).clamp_(qmin, qmax)
        dq = (q - z3) * s3 if z3 is not None else q * s3
        ctx.save_for_backward(u, q, s3, z3)
        ctx.bounds = (qmin - 0.5, qmax + 0.5)
        ctx.held_codes = held_codes
        ctx.mark_non_differentiable(q)
        return dq, q

    @staticmethod
    def backward(ctx, g, _gq):
        u, q, s3, z3 = ctx.saved_tensors
        lo, hi = ctx.bounds
        outside = (u < lo) | (u > hi)
        gw = g.masked_fill(outside, 0.0) if ctx.needs_input_grad[0] else None
        gs = gz = None
        if ctx.needs_input_grad[1]:
            if ctx.held_codes:
                t = q if z3 is None else q - z3
            else:
                t = q - u  # inside: (q - z) - w/s = q - u
                if z3 is not None:
                    t = torch.where(outside, q - z3, t)
                else:
                    t = torch.where(outside, q, t)
            gs = _reduce_to(g * t, s3.shape)
        if z3 is not None and ctx.needs_input_grad[2]:
            gz = _reduce_to((g if ctx.held_codes else g.masked_fill(~outside, 0.0)) * (-s3), z3.shape)
        return gw, gs, gz, None, None, None


def _reduce_to(t: torch.Tensor, shape) -> torch.Tensor:
    t = t.sum(dim=-1, keepdim=True)
    for d, n in enumerate(shape):
        if n == 1 and t.shape[d] != 1:
            t = t.sum(dim=d, keepdim=True)
    return t


def fake_quantize_grouped(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                          spec: QuantSpec, held_codes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`fake_quantize_learned` for contiguous groups (no g_idx), the fast path QAT trains with:
    the same codes and forward values (elementwise the same arithmetic as `quantize_codes` /
    `dequantize`), the same LSQ / LSQ+ / STE gradients. Returns (dequantized x, codes as float).

    held_codes: the scale and zero point get the exact derivative of the forward with the codes
    held fixed ((q - z) and -s for every element), EfficientQAT's E2E-QP gradient. LSQ's
    (q - u) is exactly 0 when x sits on the grid, as it does at a GPTQ / RTN start (x = the
    record's dequantized weights), so LSQ gives the scales no signal there; Adam then turns the
    float noise of later steps into full-size scale steps (measured: block MSE rising)."""
    if spec.dtype != "int" or spec.scaled_zero or spec.superblock is not None:
        raise LowbitError(f"learned fake quantization takes plain integer specs; got {spec.describe()}")
    shape = x.shape
    x3 = to_groups(x, spec)
    s3 = scale.unsqueeze(-1)
    z3 = None if zero is None else zero.unsqueeze(-1)
    dq, q = _GroupedLearnedFakeQuant.apply(x3, s3, z3, spec.qmin, spec.qmax, held_codes)
    return dq.reshape(shape), q.reshape(shape)
