"""Hooks that feed module inputs / outputs to their observers during calibration, with the checks
that name the module when calibration data does not fit it."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError


def features_last(module: nn.Module, x: torch.Tensor, name: str, check_weight_dtype: bool = True) -> torch.Tensor:
    """The module's input as [samples, features], refusing what it cannot take (naming it)."""
    if not torch.is_tensor(x):
        raise LowbitError(f"{name}: calibration input is a {type(x).__name__}, not a tensor")
    if not x.is_floating_point():
        raise LowbitError(f"{name}: calibration input has dtype {x.dtype}; the module takes floating inputs")
    w = getattr(module, "weight", None)
    if check_weight_dtype and w is not None and x.dtype != w.dtype:
        raise LowbitError(f"{name}: calibration input has dtype {x.dtype} but the module's weights are {w.dtype}; "
                          f"convert the batches (e.g. batch.to({w.dtype}))")
    if isinstance(module, nn.Conv2d):
        if x.dim() != 4 or x.shape[1] != module.in_channels:
            raise LowbitError(f"{name}: calibration input has shape {tuple(x.shape)}; the conv takes "
                              f"[batch, {module.in_channels}, H, W]")
        return x.permute(0, 2, 3, 1).reshape(-1, module.in_channels)
    k = module.in_features
    if x.dim() == 0 or x.shape[-1] != k:
        raise LowbitError(f"{name}: calibration input has shape {tuple(x.shape)}; the Linear takes {k} features "
                          "in the last dimension")
    return x.reshape(-1, k)


def input_hook(state, name):
    def hook(module, args):
        x = features_last(module, args[0], name)
        if state is not None:
            state.update(x)
    return hook


def output_hook(state, name):
    def hook(module, args, out):
        if not torch.is_tensor(out):
            raise LowbitError(f"{name}: its output is not a tensor; output specs need a tensor output")
        state.update(out.detach().reshape(-1, 1))
    return hook


def nan_guard(name):
    """A forward hook refusing a module whose output turns NaN/Inf during calibration."""
    def hook(module, args, out):
        if torch.is_tensor(out) and out.is_floating_point() and not bool(torch.isfinite(out).all()):
            raise LowbitError(f"{name}: its output holds NaN/Inf values during calibration; check the "
                              "calibration data and this module's weights")
    return hook
