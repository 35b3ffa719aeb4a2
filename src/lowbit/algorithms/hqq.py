"""HQQ-style calibration-free optimisation of scale/zero (half-quadratic splitting, lp-norm, p < 1).

Badri & Shaji 2023. The rounding error W - Wr is split with an auxiliary We that takes the
heavy-tailed part through the generalised soft-threshold (prox of |.|^p), and the parameters are
refitted in closed form to W - We:
- asymmetric: the zero point (float, as in HQQ), and optionally the scale (least squares of
  (W - We) on the codes);
- symmetric: the scale (zero stays 0).
We work in code units (W / initial scale) so the shrink threshold does not depend on the weight's
magnitude; the iteration keeps the best parameters by the lp error and stops when it rises.
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.algorithms.threads import one_thread
from lowbit.core.finite import all_finite
from lowbit.core.groups import as_2d, to_groups
from lowbit.core.qparams import EPS, round_params
from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec

__all__ = ["optimize", "optimize_params", "qparams_fn", "lp_error", "codes_for"]


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * (x.abs() + 1e-8).pow(p - 1))


def _init(g: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and *unrounded* zero (zeros of 0 when symmetric), shapes [rows, n_groups, 1]."""
    xmin = g.amin(dim=-1, keepdim=True)
    xmax = g.amax(dim=-1, keepdim=True)
    if spec.symmetric:
        s = (torch.maximum(xmin.abs(), xmax.abs()) / spec.qmax).clamp_min(EPS)
        return s, torch.zeros_like(s)
    xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    s = ((xmax - xmin) / (spec.qmax - spec.qmin)).clamp_min(EPS)
    return s, -xmin / s


def optimize_params(W: torch.Tensor, spec: QuantSpec, *, p: float = 0.7, iters: int = 20, beta: float = 10.0,
                    kappa: float = 1.01, optimize_scale: bool | None = None,
                    name: str = "weight") -> tuple[torch.Tensor, torch.Tensor | None]:
    """HQQ scale [rows|1, n_groups] and zero (float, None when symmetric) for W [rows, cols]."""
    with one_thread():
        return _optimize_params(W, spec, p=p, iters=iters, beta=beta, kappa=kappa,
                                optimize_scale=optimize_scale, name=name)


def _optimize_params(W, spec, *, p, iters, beta, kappa, optimize_scale, name):
    if spec.dtype != "int":
        raise LowbitError(f"{name}: HQQ optimises integer grids; dtype={spec.dtype} is not supported")
    if spec.granularity == "token":
        raise LowbitError(f"{name}: granularity='token' is for activations; use 'channel' or 'group'")
    W2 = as_2d(W).float()
    if not all_finite(W2):
        raise LowbitError(f"{name}: the weight holds NaN or Inf; cannot quantize it")
    spec.check_shape(*W2.shape, name)
    if optimize_scale is None:
        optimize_scale = spec.symmetric
    g = to_groups(W2, spec)  # [r, n, gs]
    s0, z = _init(g, spec)
    x = g / s0  # code units: the grid step is 1
    a = torch.ones_like(s0)  # scale relative to s0
    qmin, qmax = float(spec.qmin), float(spec.qmax)

    def recon(a, z):
        q = torch.round(x / a + z).clamp_(qmin, qmax)
        return q, (q - z) * a

    best_a, best_z = a.clone(), z.clone()
    q, xr = recon(a, z)
    best_err = (x - xr).abs().pow(p).sum(dim=-1, keepdim=True)
    # symmetric grids only move the scale, and the lp-optimal scale can shrink past outliers
    # that matter: there, accept an iterate for a group only if its l2 error is no worse either
    l2_cap = ((x - xr) ** 2).sum(dim=-1, keepdim=True) if spec.symmetric else None
    for _ in range(iters):
        xe = _shrink(x - xr, beta, p)
        t = x - xe  # what the quantized grid should reproduce
        if optimize_scale and not spec.symmetric:
            # least squares t ≈ a·q + b, then z = -b / a
            qm, tm = q.mean(-1, keepdim=True), t.mean(-1, keepdim=True)
            var = ((q - qm) ** 2).mean(-1, keepdim=True)
            cov = ((q - qm) * (t - tm)).mean(-1, keepdim=True)
            a_new = torch.where(var > 0, cov / var.clamp_min(1e-12), a)
            a_new = torch.where(a_new > 1e-3, a_new, a)
            z = qm - tm / a_new
            a = a_new
        elif optimize_scale:
            den = (q * q).sum(-1, keepdim=True)
            a_new = (q * t).sum(-1, keepdim=True) / den.clamp_min(1e-12)
            a = torch.where((den > 0) & (a_new > 1e-3), a_new, a)
        else:
            z = (q - t / a).mean(-1, keepdim=True)
        beta *= kappa
        q, xr = recon(a, z)
        err = (x - xr).abs().pow(p).sum(dim=-1, keepdim=True)
        better = err < best_err
        if l2_cap is not None:
            better &= ((x - xr) ** 2).sum(dim=-1, keepdim=True) <= l2_cap
        if not bool(better.any()):
            break
        best_a = torch.where(better, a, best_a)
        best_z = torch.where(better, z, best_z)
        best_err = torch.minimum(err, best_err)
    scale = (best_a * s0).squeeze(-1)
    zero = None if spec.symmetric else best_z.squeeze(-1)
    return round_params(scale, zero, spec)  # as stored; the codes are chosen against these


def codes_for(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """round(W / s + z) clamped: codes for float (non-integer) zeros too."""
    g = to_groups(as_2d(W).float(), spec)
    q = g / scale.unsqueeze(-1)
    if zero is not None:
        q = q + zero.unsqueeze(-1)
    q = torch.round(q).clamp_(spec.qmin, spec.qmax).reshape(as_2d(W).shape)
    return q.to(torch.int8 if spec.symmetric else torch.uint8)


def optimize(W: torch.Tensor, spec: QuantSpec, *, p: float = 0.7, iters: int = 20, beta: float = 10.0,
             kappa: float = 1.01, optimize_scale: bool | None = None, name: str = "weight") -> QuantizedWeight:
    """Calibration-free HQQ quantization of W [out, in] (float zero point when asymmetric)."""
    scale, zero = optimize_params(W, spec, p=p, iters=iters, beta=beta, kappa=kappa,
                                  optimize_scale=optimize_scale, name=name)
    return QuantizedWeight(codes_for(W, scale, zero, spec), scale, zero, spec)


def qparams_fn(**options):
    """A GPTQ `qparams_fn`: HQQ-optimised parameters for one group slice (or a whole row)."""

    def fn(w: torch.Tensor, spec: QuantSpec):
        if spec.granularity == "tensor":
            return optimize_params(w, spec, **options)
        return optimize_params(w, dataclasses.replace(spec, granularity="channel", group_size=None), **options)

    return fn


def lp_error(W: torch.Tensor, Wq: torch.Tensor, p: float = 0.7) -> float:
    """Σ |W - Wq|^p, the objective HQQ minimises."""
    return float((W.float() - Wq.float()).abs().pow(p).sum())
