"""SmoothQuant alpha chosen per smoothing pair on calibration data (as SmoothQuant's auto-tune and
llm-compressor do): for each alpha of a grid, the int8 output of the Linears that read the smoothed
activation — activations quantized as the scheme will (per token at run time, or one per-tensor
range from the calibration max), weights int8 per channel — is compared with the float output;
the alpha of least mean squared error wins. Pure functions over tensors, plus the hook that
samples the Linears' inputs."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lowbit.core import int8
from lowbit.errors import LowbitError

ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))  # 0, 0.1, ..., 1


def fake_int8_input(x: torch.Tensor, dynamic: bool, tensor_absmax: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] rounded onto symmetric int8: per row (dynamic) or one scale max|x| / 127 (static;
    `tensor_absmax` is the calibration range, else x's own)."""
    if dynamic:
        q, s = int8.quantize_per_token(x)
        return q.float() * s
    amax = x.abs().amax() if tensor_absmax is None else tensor_absmax
    scale = (amax.float() / 127).clamp_min(int8.EPS)
    return torch.round(x / scale).clamp_(-127, 127) * scale


def fake_int8_weight(w: torch.Tensor) -> torch.Tensor:
    q, s = int8.quantize_weight(w)
    return q.float() * s[:, None]


def smoothed_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, dynamic: bool,
                   act_absmax: torch.Tensor | None = None, refs: list[torch.Tensor] | None = None) -> float:
    """Mean squared error of int8(x / s) @ int8(W · s)^T against x @ W^T, summed over the weights.
    `act_absmax` [K]: the calibration per-channel max |x| (sets the static per-tensor range);
    `refs`: the float outputs x @ W^T when already computed."""
    xs = x / s
    tensor_absmax = None if act_absmax is None else (act_absmax.float() / s).amax()
    xq = fake_int8_input(xs, dynamic, tensor_absmax)
    err = 0.0
    for i, w in enumerate(weights):
        ref = x @ w.t() if refs is None else refs[i]
        err += float((xq @ fake_int8_weight(w * s[None, :]).t() - ref).pow(2).mean())
    return err


def search_alpha(x: torch.Tensor, weights: list[torch.Tensor], act_absmax: torch.Tensor, dynamic: bool,
                 alphas: Iterable[float] = ALPHAS, scales=None) -> tuple[float, dict[float, float]]:
    """(best alpha, {alpha: error}) for one smoothing pair: x [M, K] sample inputs, weights the
    [N, K] Linears reading them, act_absmax [K] the calibration per-channel max |x|; `scales`:
    alpha -> s [K] (default SmoothQuant's per-channel rule, `smooth_scales`)."""
    from lowbit.ptq.smoothquant import smooth_scales

    alphas = list(alphas)
    if not alphas:
        raise LowbitError("SmoothQuant alpha search needs at least one alpha")
    w_absmax = torch.cat(weights).abs().amax(dim=0)
    refs = [x @ w.t() for w in weights]
    if scales is None:
        scales = lambda a: smooth_scales(act_absmax, w_absmax, a)  # noqa: E731
    errs = {a: smoothed_error(x, weights, scales(a), dynamic, None if dynamic else act_absmax, refs) for a in alphas}
    return min(errs, key=errs.get), errs


def sample_inputs(model: nn.Module, names: list[str], batches: list, rows: int = 512,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Up to `rows` input rows of each named module, drawn evenly from every batch (float32)."""
    from lowbit.ptq.calibrate import watch_inputs

    per_batch = max(1, rows // max(1, len(batches)))
    gen = torch.Generator().manual_seed(seed)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def on_input(name, x):
        x = x.reshape(-1, x.shape[-1])
        idx = torch.randperm(x.shape[0], generator=gen)[:per_batch]
        seen[name].append(x[idx].float())

    watch_inputs(model, names, batches, on_input)
    return {n: torch.cat(v) for n, v in seen.items() if v}


CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


def search_clip(x: torch.Tensor, weights: list[torch.Tensor], tensor_absmax: torch.Tensor,
                clips: Iterable[float] = CLIPS) -> tuple[float, dict[float, float]]:
    """(best c, {c: error}): the static per-tensor input range c * tensor_absmax whose int8 output
    int8(x) @ int8(W)^T is closest (mean squared error, summed over the weights) to x @ W^T.
    Clipping trades the few outlier tokens' error for a finer grid for all the others; the
    weights decide which matters more."""
    clips = list(clips)
    if not clips or any(not 0 < c <= 1 for c in clips):
        raise LowbitError(f"clip factors must lie in (0, 1]; got {clips}")
    refs = [x @ w.t() for w in weights]
    wq = [fake_int8_weight(w) for w in weights]
    errs = {}
    for c in clips:
        xq = fake_int8_input(x, False, tensor_absmax * c)
        errs[c] = sum(float((xq @ w.t() - r).pow(2).mean()) for w, r in zip(wq, refs))
    return min(errs, key=errs.get), errs
