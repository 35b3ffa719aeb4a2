"""Fold BatchNorm2d into the Conv2d before it (inference: the BN becomes an affine map of the conv)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.nn.replace import replace_linear


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d computing bn(conv(x)) with bn's running statistics (eval mode)."""
    if bn.num_features != conv.out_channels or not bn.track_running_stats:
        raise LowbitError(f"cannot fold a BatchNorm2d of {bn.num_features} features without running statistics "
                          f"into a conv of {conv.out_channels} channels")
    w = conv.weight.detach().float()
    b = conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_channels)
    inv_std = torch.rsqrt(bn.running_var.float() + bn.eps)
    gamma = bn.weight.detach().float() if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias.detach().float() if bn.affine else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    fused.weight.data = (w * factor.reshape(-1, 1, 1, 1)).to(conv.weight.dtype)
    fused.bias.data = ((b - bn.running_mean.float()) * factor + beta).to(conv.weight.dtype)
    return fused


def sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) names of every Conv2d directly followed by a BatchNorm2d in an nn.Sequential."""
    pairs = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential):
            continue
        kids = list(mod.named_children())
        for (a, ma), (b, mb) in zip(kids, kids[1:]):
            if isinstance(ma, nn.Conv2d) and isinstance(mb, nn.BatchNorm2d):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a, prefix + b))
    return pairs


def fold_batchnorm(model: nn.Module, pairs: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Fold every (conv, bn) pair in place (the BN becomes nn.Identity); returns the pairs folded."""
    if model.training:
        raise LowbitError(f"{type(model).__name__} is in training mode; call model.eval() before folding BatchNorm")
    pairs = list(pairs if pairs is not None else sequential_pairs(model))
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise LowbitError(f"cannot fold {bn_name} ({type(bn).__name__}) into {conv_name} ({type(conv).__name__})")
        replace_linear(model, conv_name, fold_conv_bn(conv, bn))
        replace_linear(model, bn_name, nn.Identity())
    return pairs
