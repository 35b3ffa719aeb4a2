"""SmoothQuant: migrate activation outliers into the weights, s_j = max|X_j|^α / max|W_j|^(1-α),
X / s folded into the preceding norm's weight (and bias), W · s into the Linears that read it.
The model computes the same function (up to float rounding); int8 activations lose less."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.ptq.calibrate import watch_inputs
from lowbit.ptq.smooth_search import sample_inputs, search_alpha

EPS = 1e-5


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per input channel s = a^α / w^(1-α) (1 where a channel never fired or its weights are 0)."""
    if not 0.0 <= alpha <= 1.0:
        raise LowbitError(f"SmoothQuant alpha={alpha} must be in [0, 1]")
    a = act_absmax.float()
    w = weight_absmax.float()
    s = a.clamp_min(EPS).pow(alpha) / w.clamp_min(EPS).pow(1 - alpha)
    return torch.where((a > 0) & (w > 0), s.clamp_min(EPS), torch.ones_like(s))


def check_alpha(alpha) -> bool:
    """True for "auto" (searched per pair); a number must lie in [0, 1]."""
    if isinstance(alpha, str):
        if alpha != "auto":
            raise LowbitError(f"SmoothQuant alpha={alpha!r}: give a number in [0, 1] or 'auto'")
        return True
    smooth_scales(torch.ones(1), torch.ones(1), alpha)
    return False


def parse_alpha(text: str | None) -> float | str | None:
    """The CLI's --smoothquant: None, "auto", or a number in [0, 1]."""
    if text is None:
        return None
    t = text.strip().lower()
    if t == "auto":
        return "auto"
    try:
        a = float(t)
    except ValueError:
        raise LowbitError(f"--smoothquant {text!r}: give a number in [0, 1] or 'auto'") from None
    check_alpha(a)
    return a


def fold_smoothing(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """In place: norm(x) / s and W · s (norm_offset 1: a norm that scales by 1 + weight, as Gemma's).
    `norm` may be a Linear whose output feeds the others through an elementwise product (up_proj
    before down_proj): its output rows are divided by s."""
    w = norm.weight.data
    ct = torch.promote_types(w.dtype, torch.float32)  # float64 models fold in float64
    s = s.to(ct)
    if isinstance(norm, nn.Linear):
        norm.weight.data = (w.to(ct) / s[:, None]).to(w.dtype)
    else:
        norm.weight.data = (((w.to(ct) + norm_offset) / s) - norm_offset).to(w.dtype)
    if getattr(norm, "bias", None) is not None:
        norm.bias.data = (norm.bias.data.to(ct) / s).to(norm.bias.dtype)
    for lin in linears:
        lin.weight.data = (lin.weight.data.to(ct) * s[None, :]).to(lin.weight.dtype)


def llm_pairs(model, up_down: bool = True) -> list[tuple[str, list[str]]]:
    """(norm, Linears reading it) of every decoder block, from the architecture table's smoothing
    pairs whose first member is a norm, and (with up_down) up_proj -> down_proj: down_proj reads
    act(gate) * up, so dividing up's output rows by s divides its input. V -> O is left out (with
    grouped-query attention one V row feeds several O columns)."""
    from lowbit.models.arch import arch_for, blocks_of

    arch = arch_for(model)
    pairs = []
    for i, _ in enumerate(blocks_of(model, arch)):
        for prev, lins in arch.smooth:
            if prev in arch.linears and not (up_down and prev.endswith("up_proj")):
                continue
            p = f"{arch.blocks}.{i}"
            pairs.append((f"{p}.{prev}", [f"{p}.{n}" for n in lins]))
    return pairs


def input_absmax(model: nn.Module, names: list[str], batches: Iterable) -> dict[str, torch.Tensor]:
    """Per-channel max |input| of each named module over the batches."""
    seen: dict[str, torch.Tensor] = {}

    def on_input(name, x):
        if not bool(torch.isfinite(x).all()):
            raise LowbitError(f"{name}: NaN/Inf activations during SmoothQuant calibration")
        m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        seen[name] = m if name not in seen else torch.maximum(seen[name], m)

    watch_inputs(model, names, batches, on_input)
    return seen


def smooth(model: nn.Module, batches: Iterable, alpha: float | str = 0.5,
           pairs: list[tuple[str, list[str]]] | None = None, norm_offset: float | None = None,
           up_down: bool = True, dynamic: bool = True, alphas: dict | None = None) -> dict[str, torch.Tensor]:
    """Smooth `model` in place; returns {norm name: s}. `pairs` default to a known LLM's norms.
    alpha="auto": searched per pair on the calibration batches (`smooth_search`) for int8
    activations quantized per token (`dynamic`) or per tensor (static); the chosen alphas are
    written into the dict `alphas` when given."""
    if pairs is None:
        pairs = llm_pairs(model, up_down)
        if norm_offset is None:
            from lowbit.models.arch import arch_for

            norm_offset = arch_for(model).norm_offset
    auto = check_alpha(alpha)
    batches = list(batches)
    stats = input_absmax(model, [lins[0] for _, lins in pairs], batches)
    samples = sample_inputs(model, [lins[0] for _, lins in pairs], batches) if auto else {}
    out = {}
    for norm_name, lins in pairs:
        if lins[0] not in stats:
            raise LowbitError(f"{lins[0]}: no calibration data reached it; cannot smooth {norm_name}")
        mods = [model.get_submodule(n) for n in lins]
        w_absmax = torch.cat([m.weight.detach().float() for m in mods]).abs().amax(dim=0)
        a = alpha
        if auto:
            a, _ = search_alpha(samples[lins[0]], [m.weight.detach().float() for m in mods], stats[lins[0]], dynamic)
            if alphas is not None:
                alphas[norm_name] = a
        s = smooth_scales(stats[lins[0]], w_absmax, a)
        fold_smoothing(model.get_submodule(norm_name), mods, s, norm_offset or 0.0)
        out[norm_name] = s
    return out
