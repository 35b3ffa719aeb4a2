"""calibrate(model, batches): run the prepared model on sample inputs so its observers see them."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.ptq.observe import nan_guard
from lowbit.calibration.walk import run_batch, run_hooked
from lowbit.ptq.prepare import prepared


def watch_inputs(model, names: list[str], batches: Iterable, on_input) -> None:
    """Run every batch through `model` (no grad) with `on_input(name, x)` called on the first input
    of each named module as it runs."""
    def hook_for(name):
        return lambda module, args: on_input(name, args[0].detach())

    run_hooked(model, batches, [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names])


def calibrate(model, batches: Iterable, progress: bool = False) -> int:
    """Feed every batch (a tensor, a tuple of positional inputs, or a dict of keyword inputs)
    through the model; returns the number of batches. Data the model's modules cannot take
    (wrong shape or dtype) or NaN/Inf activations fail with one error naming the module."""
    p = prepared(model)
    guards = [mod.register_forward_hook(nan_guard(name)) for name, mod in model.named_modules()
              if name and name in p.plan]
    n = 0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibrate", disable=not progress, leave=False):
                try:
                    run_batch(model, batch)
                except LowbitError:
                    raise
                except (RuntimeError, TypeError, ValueError, IndexError) as e:
                    raise LowbitError(f"calibration batch {n} does not fit {type(model).__name__}: "
                                      f"{' '.join(str(e).split())[:300]}") from None
                n += 1
    finally:
        for g in guards:
            g.remove()
    if n == 0:
        raise LowbitError("calibrate() got no batches")
    p.batches += n
    return n
