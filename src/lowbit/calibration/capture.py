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


def _clean(kw: dict) -> dict:
    out = {k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
    out["use_cache"] = False
    return out


def capture_first_block_inputs(model, arch: Arch, ids: torch.Tensor, chunk: int = 8) -> tuple[BlockInputs, list[dict]]:
    """Run the model up to block 0 on [n, seq] token ids, `chunk` samples at a time.

    Returns block 0's inputs and the keyword arguments of every block (recorded on the first
    chunk): they differ per block where layers mix attention types (Gemma3's sliding and global
    layers get different masks and rotary embeddings).
    """
    blocks = blocks_of(model, arch)
    hidden: list[torch.Tensor] = []
    per_block: list[dict] = [{} for _ in blocks]
    first = [True]

    def make_hook(i):
        def hook(_mod, args, kw):
            if i == 0:
                hidden.append((args[0] if args else kw["hidden_states"]).detach())
            if first[0]:
                per_block[i] = _clean(kw)
                if i < len(blocks) - 1:
                    return None
            raise _Stop

        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], chunk):
                try:
                    model(input_ids=ids[start : start + chunk], use_cache=False)
                except _Stop:
                    pass
                first[0] = False
    finally:
        for h in handles:
            h.remove()
    return BlockInputs(hidden, per_block[0]), per_block


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


class StopForward(Exception):
    """Raised by a hook to end a block's forward on a chunk once the hook has what it needs."""


def run_block(block, inputs: BlockInputs) -> list[torch.Tensor]:
    """Outputs of one block for every captured chunk (chunks stopped by StopForward give none)."""
    outs = []
    with torch.no_grad():
        for h in inputs.hidden:
            try:
                out = block(h, **_kwargs_for(inputs.kwargs, h.shape[0]))
            except StopForward:
                continue
            outs.append((out[0] if isinstance(out, tuple) else out).detach())
    return outs
