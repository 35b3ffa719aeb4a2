"""AWQ: activation-aware per-input-channel scales, folded into the previous op, then clip search.

Lin et al. 2023. For Linears that read the same input X (q/k/v after the input norm, gate/up
after the post-attention norm, o after v, down after up):
    s = mean|x|^α / mean|ŵ|^(1-α)      (ŵ: weights normalised by their group's absmax)
with α on a 20-point grid in [0, 1) minimising the error of a caller-given output (the Linears'
own outputs, or the attention / MLP module they feed) after quantizing W·diag(s) and dividing
s back out. The chosen s is folded into the previous op (norm weight or Linear rows) as 1/s and
into the Linears' columns as s, which leaves the full-precision function unchanged. Then
`search_clip` shrinks each group's range by up to 50% to minimise that group's output error.

Everything here is a pure function over tensors; the block-level wiring is in `registry`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lowbit.core.groups import to_groups
from lowbit.core.qparams import choose_qparams, range_to_qparams
from lowbit.core.quantize import quantize_codes, dequantize
from lowbit.errors import LowbitError
from lowbit.spec import QuantSpec

__all__ = ["compute_scales", "search_scales", "fold_scales", "search_clip", "group_gram", "fake_quant_rtn",
           "apply_clip"]


def _w_absmean(weights: Sequence[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """Mean over output rows of |w| / (group absmax), per input channel."""
    parts = []
    for W in weights:
        W = W.float()
        if spec.granularity == "group":
            g = W.abs().reshape(W.shape[0], -1, spec.group_size)
            g = g / (g.amax(dim=-1, keepdim=True) + 1e-6)
            parts.append(g.reshape(W.shape))
        else:
            parts.append(W.abs() / (W.abs().amax(dim=-1, keepdim=True) + 1e-6))
    return torch.cat(parts, dim=0).mean(dim=0)


def compute_scales(x_absmean: torch.Tensor, weights: Sequence[torch.Tensor] | torch.Tensor, alpha: float,
                   spec: QuantSpec | None = None) -> torch.Tensor:
    """s [in] = mean|x|^α / mean|ŵ|^(1-α), normalised so that sqrt(max·min) = 1.

    `weights` is a list of W [out_i, in] sharing the input, or a precomputed w_absmean [in].
    """
    if isinstance(weights, torch.Tensor) and weights.dim() == 1:
        w_mean = weights.float()
    else:
        ws = [weights] if isinstance(weights, torch.Tensor) else list(weights)
        w_mean = _w_absmean(ws, spec or QuantSpec(granularity="channel"))
    x = x_absmean.float().clamp_min(1e-8)
    s = (x.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp_min(1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return s


def fake_quant_rtn(W: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Min-max round-to-nearest, dequantized (the search's stand-in for the final quantizer)."""
    scale, zero = choose_qparams(W, spec)
    return dequantize(quantize_codes(W, scale, zero, spec), scale, zero, spec)


def search_scales(x_absmean: torch.Tensor, weights: Sequence[torch.Tensor], spec: QuantSpec,
                  loss_fn: Callable[[list[torch.Tensor]], float], *, n_grid: int = 20,
                  quantizer: Callable[[torch.Tensor, QuantSpec], torch.Tensor] = fake_quant_rtn,
                  cols_per_channel: int = 1) -> tuple[torch.Tensor, float, list[float]]:
    """Grid search of α ∈ {0, 1/n, ..., (n-1)/n}.

    For each α: s = compute_scales(...), each W is replaced by quantizer(W·s)/s, and
    `loss_fn(list of those weights)` returns the output error to minimise (it runs whatever the
    caller wants: the Linears alone, or the attention/MLP module they belong to).
    Returns (best s, best α, losses per grid point). α = 0 with s ≡ 1 is not special-cased: the
    grid's first point is plain mean|ŵ|^-1 scaling, as in AutoAWQ.

    cols_per_channel k > 1: the scale the previous op can absorb is one per channel, and each
    channel feeds k consecutive columns (a conv's Cin·kh·kw patch values, a Linear after a
    Flatten of [C, H, W]); the means are taken per channel and s is repeated k times.
    """
    w_mean = _w_absmean(weights, spec)
    k = int(cols_per_channel)
    if k > 1:
        if w_mean.numel() % k or x_absmean.numel() != w_mean.numel():
            raise LowbitError(f"AWQ scale search: {w_mean.numel()} columns are not channels of {k} columns "
                              f"(activation means: {x_absmean.numel()})")
        w_mean, x_absmean = w_mean.reshape(-1, k).mean(1), x_absmean.float().reshape(-1, k).mean(1)
    losses: list[float] = []
    best = (float("inf"), None, 0.0)
    for i in range(n_grid):
        alpha = i / n_grid
        s = compute_scales(x_absmean, w_mean, alpha).repeat_interleave(k)
        qws = [quantizer(W.float() * s, spec) / s for W in weights]
        loss = float(loss_fn(qws))
        losses.append(loss)
        if loss < best[0]:
            best = (loss, s, alpha)
    if best[1] is None:
        raise LowbitError("AWQ scale search: every grid point gave a non-finite loss; check the calibration inputs")
    return best[1], best[2], losses


@torch.no_grad()
def fold_scales(prev_op: torch.nn.Module, linears: Sequence[torch.nn.Module], s: torch.Tensor,
                norm_offset: float = 0.0) -> None:
    """Divide prev_op's output channels by s and multiply the Linears' input columns by s (in place).

    prev_op: an RMSNorm/LayerNorm/BatchNorm (anything with a 1-D `weight`, optional `bias`; with
    `norm_offset` = 1 the norm multiplies by (1 + weight), as in Gemma), a Linear or a Conv2d whose
    output channels are the scales'. The consumers: Linears reading those channels (each channel
    k consecutive inputs when in_features = k x channels: a Flatten of [C, H, W]) or Conv2d with
    that many input channels.
    """
    s = s.float()
    for lin in linears:
        cols = lin.weight.shape[1]
        if cols % s.numel() or (lin.weight.dim() > 2 and cols != s.numel()):
            raise LowbitError(f"AWQ fold: {type(lin).__name__} has {cols} inputs, scales have {s.numel()}")
    if isinstance(prev_op, (torch.nn.Linear, torch.nn.Conv2d)):
        w = prev_op.weight
        if w.shape[0] != s.numel():
            raise LowbitError(
                f"AWQ fold: previous {type(prev_op).__name__} has {w.shape[0]} outputs, the scales {s.numel()}; "
                "fold only where shapes allow"
            )
        w.copy_((w.float() / s.reshape(-1, *[1] * (w.dim() - 1))).to(w.dtype))
        if prev_op.bias is not None:
            prev_op.bias.copy_((prev_op.bias.float() / s).to(prev_op.bias.dtype))
    else:
        w = getattr(prev_op, "weight", None)
        if w is None or w.dim() != 1 or w.numel() != s.numel():
            raise LowbitError(f"AWQ fold: {type(prev_op).__name__} has no 1-D weight of size {s.numel()} to fold into")
        w.copy_(((w.float() + norm_offset) / s - norm_offset).to(w.dtype))
        b = getattr(prev_op, "bias", None)
        if b is not None:
            b.copy_((b.float() / s).to(b.dtype))
    for lin in linears:
        w = lin.weight
        cols = s.reshape(1, -1, *[1] * (w.dim() - 2)) if w.dim() > 2 else s.repeat_interleave(w.shape[1] // s.numel())[None, :]
        w.copy_((w.float() * cols).to(w.dtype))


def group_gram(X: torch.Tensor | None, spec: QuantSpec, in_features: int, H: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group blocks of XᵀX/n: [n_groups, gs, gs] (one block of all columns when not grouped)."""
    gs = spec.group_size if spec.granularity == "group" else in_features
    ng = in_features // gs
    if H is not None:
        Hf = H.float()
        return torch.stack([Hf[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(ng)])
    if X is None:
        raise LowbitError("search_clip needs the layer's inputs X or their Hessian H")
    X2 = X.reshape(-1, in_features).float()
    Xg = X2.reshape(X2.shape[0], ng, gs).transpose(0, 1)  # [ng, n, gs]
    return torch.bmm(Xg.transpose(1, 2), Xg) / X2.shape[0]


def _group_err(D: torch.Tensor, G: torch.Tensor, gs: int) -> torch.Tensor:
    """err[o, g] = d_ogᵀ G_g d_og for D [out, in]."""
    Dg = D.reshape(D.shape[0], -1, gs).transpose(0, 1)  # [ng, out, gs]
    return (torch.bmm(Dg, G) * Dg).sum(-1).transpose(0, 1)  # [out, ng]


def search_clip(W: torch.Tensor, X: torch.Tensor | None, spec: QuantSpec, *, H: torch.Tensor | None = None,
                n_grid: int = 20, max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) range shrink in {1, 1-1/n, ..., 1-max_shrink} minimising that group's
    output error Σ_t (x_t,g · (w_g - q(w_g)))² (computed exactly through the group's Gram block).

    Returns (shrink [rows, n_groups], error per (row, group) at the chosen shrink); the shrink
    factor 1 is in the grid, so the error never exceeds plain min-max rounding's.
    Use with `choose_qparams(W, spec, shrink)` or `apply_clip`.
    """
    if spec.granularity == "tensor":
        raise LowbitError("search_clip works per channel or per group, not per tensor")
    return _search_clip(W.float(), X, spec, H, n_grid, max_shrink)


def _search_clip(W, X, spec, H, n_grid, max_shrink):
    rows, cols = W.shape
    spec.check_shape(rows, cols)
    gs = spec.group_size if spec.granularity == "group" else cols
    G = group_gram(X, spec, cols, H)
    ng = cols // gs
    best_err = torch.full((rows, ng), float("inf"))
    best_shrink = torch.ones(rows, ng)
    steps = int(round(max_shrink * n_grid))
    grouped = to_groups(W, spec) if spec.dtype == "int" else None  # [rows, ng, gs]
    if grouped is not None:
        gmin, gmax = grouped.amin(dim=-1), grouped.amax(dim=-1)
        Wt = grouped.transpose(0, 1).contiguous()  # [ng, rows, gs]: the layout bmm takes, made once
    for i in range(steps + 1):
        f = 1.0 - i / n_grid
        if grouped is not None:
            # the same arithmetic as choose_qparams(W, spec, shrink=f) -> quantize_codes -> dequantize,
            # on the grouped view with broadcast parameters (no expanded copies)
            scale, zero = range_to_qparams(gmin * f, gmax * f, spec)
            sc = scale.T.unsqueeze(-1)  # [ng, rows, 1]
            q = Wt / sc
            if zero is not None:
                zc = (zero / scale if spec.scaled_zero else zero).T.unsqueeze(-1)  # as a zero point
                q = q.add_(zc).round_().clamp_(spec.qmin, spec.qmax).sub_(zc)
            else:
                q = q.round_().clamp_(spec.qmin, spec.qmax)
            Dt = torch.sub(Wt, q.mul_(sc), out=q)  # [ng, rows, gs]
            err = (torch.bmm(Dt, G).mul_(Dt)).sum(-1).T
        else:
            scale, zero = choose_qparams(W, spec, shrink=f)
            Wq = dequantize(quantize_codes(W, scale, zero, spec), scale, zero, spec)
            err = _group_err(W - Wq, G, gs)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_shrink = torch.where(better, torch.full_like(best_shrink, f), best_shrink)
    return best_shrink, best_err


def apply_clip(W: torch.Tensor, spec: QuantSpec, shrink: torch.Tensor):
    """Scale/zero for W with the per-(row, group) range shrink from `search_clip`."""
    g = to_groups(W.float(), spec)
    return choose_qparams(W, spec, shrink=shrink.reshape(g.shape[0], g.shape[1]))
