"""Walking any nn.Module with forward hooks: its quantizable layers in execution order, grouped by
shared input, and feeding one layer's inputs to a callback without storing them.

No architecture table: one forward of a calibration batch records which Linear / Conv2d runs when
(`execution_order`); layers that read the very same input tensor (q/k/v of an attention) form one
group, quantized together on one Hessian. `feed_inputs` then runs the calibration batches and hands
each input of a group's first layer to a callback; the forward stops right there (nothing after
the layer is computed) unless a layer of the model runs more than once per forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.nn.quant_conv import quantizable_conv

SUPPORTED = "nn.Linear and nn.Conv2d (groups=1, zero padding)"


class _Stop(Exception):
    pass


def run_batch(model: nn.Module, batch):
    """model(batch): a tensor as the one positional input, a tuple / list as positional inputs, a
    mapping (a tokenizer's BatchEncoding) as keyword inputs."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def run_hooked(model: nn.Module, batches, handles) -> None:
    """Run every batch through `model` without gradients, then remove the hook `handles` (on
    error too)."""
    try:
        with torch.no_grad():
            for b in batches:
                run_batch(model, b)
    finally:
        for h in handles:
            h.remove()


def is_quantizable(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or quantizable_conv(mod)


def unsupported_reason(name: str, mod: nn.Module, parent: nn.Module | None) -> str | None:
    """Why a module holding a weight matrix is left in full precision, or None when lowbit quantizes it."""
    if isinstance(parent, nn.MultiheadAttention):
        return "MultiheadAttention reads it functionally, not through its forward"
    if is_quantizable(mod):
        return None
    if isinstance(mod, nn.Conv2d):
        return f"Conv2d with groups={mod.groups}, padding={mod.padding!r}, padding_mode={mod.padding_mode}"
    own = [p for p in mod.parameters(recurse=False) if p.dim() >= 2]
    return f"{type(mod).__name__} (no weight quantizer for this layer type)" if own else None


def candidate_layers(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """({name: module} lowbit can quantize, {name: reason} of weight-holding modules it cannot)."""
    parents = {id(child): mod for mod in model.modules() for child in mod.children()}
    ok, skipped = {}, {}
    for name, mod in model.named_modules():
        if not name:
            continue
        why = unsupported_reason(name, mod, parents.get(id(mod)))
        if why is not None:
            skipped[name] = why
        elif is_quantizable(mod):
            ok[name] = mod
    return ok, skipped


@dataclass
class LayerOrder:
    groups: list[list[str]]  # execution order; a group's layers read the same input tensor
    calls: dict[str, int] = field(default_factory=dict)  # how often each layer ran in the forward
    unreached: list[str] = field(default_factory=list)  # never called through its forward

    @property
    def repeats(self) -> bool:
        return any(c > 1 for c in self.calls.values())


def execution_order(model: nn.Module, layers: Mapping[str, nn.Module], batch) -> LayerOrder:
    """The order in which `layers` run on one forward of `batch`, grouped by shared input."""
    groups: list[list[str]] = []
    calls: dict[str, int] = {n: 0 for n in layers}
    last: list = [None]  # weak reference to the input the previous layer call read

    def hook(name, _mod, args):
        calls[name] += 1
        if calls[name] > 1:
            return
        x = args[0] if args else None
        if groups and last[0] is not None and last[0]() is x:
            groups[-1].append(name)
        else:
            groups.append([name])
        last[0] = weakref.ref(x) if isinstance(x, torch.Tensor) else None

    run_hooked(model, [batch], [m.register_forward_pre_hook(lambda mod, args, n=n: hook(n, mod, args))
                                for n, m in layers.items()])
    return LayerOrder(groups, calls, [n for n, c in calls.items() if c == 0])


def token_rows(x: torch.Tensor, batch) -> torch.Tensor:
    """A layer input's rows of real tokens: with a mapping batch holding an `attention_mask`
    [B, T] and an input [B, T, d], the padding positions are dropped (their states are no
    calibration data); any other input as it is."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor) and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        if bool(mask.all()):
            return x
        return x[mask.bool()]
    return x


def feed_inputs(model: nn.Module, layer: nn.Module, batches: Iterable, on_input: Callable[[torch.Tensor], None],
                stop: bool = True) -> int:
    """Run each batch and call `on_input(x)` with every input of `layer` (padding tokens dropped:
    `token_rows`); with `stop` the forward ends at the layer (its input is all that is needed).
    Returns how many inputs were fed."""
    fed = [0]
    current: list = [None]

    def hook(_mod, args):
        on_input(token_rows(args[0], current[0]))
        fed[0] += 1
        if stop:
            raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for batch in batches:
                current[0] = batch
                try:
                    run_batch(model, batch)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return fed[0]
