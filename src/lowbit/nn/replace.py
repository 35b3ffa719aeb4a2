"""Swap a submodule of a model by its dotted name."""

from __future__ import annotations

from torch import nn

from lowbit.errors import LowbitError


def replace_linear(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at dotted `name` (e.g. "model.layers.0.mlp.up_proj") with `new`; returns the old one."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        raise LowbitError(f"model has no submodule {name!r}") from None
    old = getattr(parent, child, None)
    if old is None:
        raise LowbitError(f"model has no submodule {name!r}")
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
    return old
