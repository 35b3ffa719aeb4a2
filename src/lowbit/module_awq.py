"""AWQ scaling for any nn.Module: where a preceding op can absorb a per-channel scale, search it
(`algorithms.awq.search_scales`) and fold it, before any layer is quantized.

Which op absorbs the scale of a group's input is found, not tabled:
- the module that produced the input tensor (forward hooks on the leaf modules), walking back
  through ops that commute with a positive per-channel scale (ReLU, LeakyReLU, Dropout, Identity,
  max / average pooling, Flatten); it must be a Linear, Conv2d or a norm with a per-channel
  affine weight (LayerNorm, BatchNorm) — conv -> ReLU -> conv, Linear -> ReLU -> Linear, conv ->
  ReLU -> Flatten -> Linear (each channel then feeds k consecutive inputs);
- else a layer of the previous group whose outputs have as many channels (an attention's value
  projection feeding the output projection through softmax(QKᵀ)·V).
A candidate is kept only if folding a random positive scale leaves the model's output on a
calibration batch unchanged (a norm whose output also feeds a residual, as in a post-LN encoder,
fails this and stays unscaled), so every fold keeps the full-precision function.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.algorithms import awq
from lowbit.algorithms.hessian import HessianAccumulator
from lowbit.calibration.walk import feed_inputs, run_batch, run_hooked
from lowbit.nn.quant_conv import conv_patches
from lowbit.spec import QuantSpec

log = logging.getLogger(__name__)

COMMUTES = (nn.ReLU, nn.LeakyReLU, nn.Dropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
            nn.AdaptiveMaxPool2d, nn.Flatten)
ABSORBS = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)
INVARIANCE_TOL = 1e-4  # relative squared output change a fold of a random scale may cause (float rounding)


@dataclass
class Smoothing:
    prev: str  # the op absorbing 1/s
    group: list[str]  # the layers taking s on their input columns
    channels: int
    cols_per_channel: int
    alpha: float | None = None


def _out_channels(mod: nn.Module) -> int | None:
    if isinstance(mod, (nn.Linear, nn.Conv2d)):
        return mod.weight.shape[0]
    w = getattr(mod, "weight", None)
    return w.numel() if isinstance(w, torch.Tensor) and w.dim() == 1 else None


def _cols(mod: nn.Module) -> int:
    return mod.weight[0].numel()


def _per_channel(mod: nn.Module, channels: int) -> int | None:
    """How many consecutive input columns of `mod` each of `channels` feeds, or None."""
    if isinstance(mod, nn.Conv2d):
        return _cols(mod) // channels if mod.in_channels == channels and mod.groups == 1 else None
    cols = _cols(mod)
    return cols // channels if cols % channels == 0 else None


def _producers(model: nn.Module, batch) -> tuple[dict[int, list], list]:
    """(id(tensor) -> [(name, module, its input)] of the leaf modules that returned that tensor,
    the tensors: kept alive while the ids are used, so that no id is reused)."""
    out: dict[int, list] = {}
    keep = []

    def hook(name):
        def f(mod, args, result):
            if isinstance(result, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
                out.setdefault(id(result), []).append((name, mod, args[0]))
                keep.append(result)
        return f

    run_hooked(model, [batch], [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
                                if n and not list(m.children())])
    return out, keep


def _first_inputs(model: nn.Module, layers: dict[str, nn.Module], batch) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    run_hooked(model, [batch], [m.register_forward_pre_hook(lambda _m, a, n=n: got.setdefault(n, a[0]))
                                for n, m in layers.items()])
    return got


def _absorber(producers: dict, x: torch.Tensor) -> str | None:
    """The module whose output channels `x`'s channels are, through ops that commute with scaling."""
    for _ in range(64):
        entries = producers.get(id(x), [])
        nxt = None
        for name, mod, inp in reversed(entries):  # in-place ops return their input: step back
            if isinstance(mod, ABSORBS):
                return name
            if not isinstance(mod, COMMUTES):
                return None
            if inp is not x:
                nxt = inp
                break
        if nxt is None:
            return None
        x = nxt
    return None


def _output(model, batch) -> torch.Tensor:
    from lowbit.mixed.module import model_output

    with torch.no_grad():
        return model_output(run_batch(model, batch)).float().clone()


def _keeps_function(model: nn.Module, prev: nn.Module, group: list[nn.Module], channels: int, batch,
                    ref: torch.Tensor) -> bool:
    """Whether folding a random positive per-channel scale leaves the output unchanged."""
    mods = [prev, *group]
    saved = [(m.weight.data.clone(), None if getattr(m, "bias", None) is None else m.bias.data.clone()) for m in mods]
    g = torch.Generator().manual_seed(0)
    s = torch.exp(torch.empty(channels).uniform_(-0.7, 0.7, generator=g))
    try:
        awq.fold_scales(prev, group, s)
        out = _output(model, batch)
        return float(((out - ref) ** 2).sum() / (ref ** 2).sum().clamp_min(1e-30)) < INVARIANCE_TOL
    except Exception as e:  # noqa: BLE001 - a fold the shapes do not allow is no candidate
        log.debug("awq: fold into %s refused: %s", type(prev).__name__, e)
        return False
    finally:
        for m, (w, b) in zip(mods, saved):
            m.weight.data.copy_(w)
            if b is not None:
                m.bias.data.copy_(b)


def find_smoothing(model: nn.Module, groups: Sequence[Sequence[str]], batch) -> list[Smoothing]:
    """The (absorbing op, group) pairs whose fold keeps the function, in execution order."""
    layers = {n: model.get_submodule(n) for g in groups for n in g}
    producers, _alive = _producers(model, batch)
    firsts = _first_inputs(model, {g[0]: layers[g[0]] for g in groups}, batch)
    ref = _output(model, batch)
    found, used = [], set()
    for i, group in enumerate(groups):
        mods = [layers[n] for n in group]
        cands = []
        if group[0] in firsts:
            a = _absorber(producers, firsts[group[0]])
            if a is not None:
                cands.append(a)
        if i > 0:
            cands += [n for n in reversed(groups[i - 1]) if n not in cands]
        for prev_name in cands:
            if prev_name in used:
                continue
            prev = model.get_submodule(prev_name)
            c = _out_channels(prev)
            ks = {_per_channel(m, c) for m in mods} if c else {None}
            if None in ks or len(ks) != 1:
                continue
            if _keeps_function(model, prev, mods, c, batch, ref):
                found.append(Smoothing(prev_name, list(group), c, ks.pop()))
                used.add(prev_name)
                break
            log.debug("awq: folding a scale into %s changes %s's function; not used", prev_name, group)
    return found


def smooth_module(model: nn.Module, groups: Sequence[Sequence[str]], specs: dict[str, QuantSpec], batches: Sequence,
                  n_grid: int = 20) -> list[Smoothing]:
    """Search and fold AWQ scales for every pair `find_smoothing` finds (in place, the full-precision
    function unchanged); returns the pairs with their α. Loss of a grid point: the group's output
    error Σ tr(ΔW H ΔWᵀ) on the Hessian of its (patch) inputs."""
    pairs = find_smoothing(model, groups, batches[0])
    for p in pairs:
        mods = [model.get_submodule(n) for n in p.group]
        cols = _cols(mods[0])
        acc = HessianAccumulator(cols, name=p.group[0])
        absum = torch.zeros(cols)

        def add(x, conv=mods[0] if isinstance(mods[0], nn.Conv2d) else None):
            rows = conv_patches(conv, x.float()) if conv is not None else x.float().reshape(-1, cols)
            acc.add(rows)
            absum.add_(rows.abs().sum(0))

        feed_inputs(model, mods[0], batches, add, stop=True)
        H = acc.H
        weights = [m.weight.detach().reshape(m.weight.shape[0], -1).float() for m in mods]
        spec = specs[p.group[0]]

        def loss(qws):
            return sum(float(((W - Q) @ H * (W - Q)).sum()) for W, Q in zip(weights, qws))

        s, p.alpha, _ = awq.search_scales(absum / acc.n, weights, spec, loss, n_grid=n_grid,
                                          cols_per_channel=p.cols_per_channel)
        awq.fold_scales(model.get_submodule(p.prev), mods, s[::p.cols_per_channel])
        log.info("awq: %s -> %s scaled (alpha %.2f)", p.prev, "+".join(p.group), p.alpha)
    return pairs
