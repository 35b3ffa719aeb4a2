"""Capturing the inputs of the first decoder block, and running one block on captured inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.models.arch import Arch, blocks_of


class _Stop(Exception):
    pass


@dataclass
class BlockInputs:
    """Hidden states per calibration chunk, plus the keyword arguments the block needs (shared)."""

    hidden: list[torch.Tensor]
    kwargs: dict


def capture_first_block_inputs(model, arch: Arch, ids: torch.Tensor, chunk: int = 8) -> BlockInputs:
    """Run the model up to block 0 on [n, seq] token ids, `chunk` samples at a time."""
    block0 = blocks_of(model, arch)[0]
    hidden: list[torch.Tensor] = []
    kwargs: dict = {}

    def hook(_mod, args, kw):
        hidden.append((args[0] if args else kw["hidden_states"]).detach())
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], chunk):
                try:
                    model(input_ids=ids[start : start + chunk], use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    kwargs["use_cache"] = False
    return BlockInputs(hidden, kwargs)


def _kwargs_for(kwargs: dict, batch: int) -> dict:
    """Slice batch-dependent tensors (captured with a full chunk) for a smaller last chunk."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > batch:
            v = v[:batch]
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            v = tuple(t[:batch] if t.dim() > 0 and t.shape[0] > batch else t for t in v)
        out[k] = v
    return out


def run_block(block, inputs: BlockInputs) -> list[torch.Tensor]:
    """Outputs of one block for every captured chunk."""
    outs = []
    with torch.no_grad():
        for h in inputs.hidden:
            out = block(h, **_kwargs_for(inputs.kwargs, h.shape[0]))
            outs.append((out[0] if isinstance(out, tuple) else out).detach())
    return outs
