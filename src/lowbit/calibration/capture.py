"""Capturing the inputs of the first decoder block, and running one block on captured inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.models.arch import Arch, blocks_of, get_module


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


def _cast(v, dtype: torch.dtype):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.to(dtype)
    if isinstance(v, tuple):
        return tuple(_cast(t, dtype) for t in v)
    return v


def cast_kwargs(kwargs: dict, dtype: torch.dtype) -> dict:
    """Floating tensors among a block's keyword arguments (rotary cos/sin, additive masks) in `dtype`."""
    return {k: _cast(v, dtype) for k, v in kwargs.items()}


def _raise_stop(*_args):
    raise _Stop


def block_kwargs(model, arch: Arch, ids: torch.Tensor) -> list[dict]:
    """The keyword arguments each block receives, recorded on one sample of `ids` [n, seq].

    Every block is replaced by an identity for this pass, so no block weight is read (blocks
    not loaded yet are fine) and the cost is the embedding alone. They differ per block where
    layers mix attention types (Gemma3's sliding and global layers get different masks and
    rotary embeddings). Batch-sized tensors come out with batch 1 and broadcast.
    """
    blocks = blocks_of(model, arch)
    per_block: list[dict] = [{} for _ in blocks]

    def recorder(i):
        def forward(hidden_states, *args, **kw):
            per_block[i] = _clean(kw)
            return hidden_states

        return forward

    for i, b in enumerate(blocks):
        b.forward = recorder(i)
    stop = get_module(model, arch.final_norm).register_forward_pre_hook(_raise_stop)
    try:
        with torch.no_grad():
            try:
                model(input_ids=ids[:1], use_cache=False)
            except _Stop:
                pass
    finally:
        stop.remove()
        for b in blocks:
            del b.forward
    return per_block


def capture_first_block_inputs(model, arch: Arch, ids: torch.Tensor, chunk: int = 8,
                               dtype: torch.dtype | None = None) -> tuple[BlockInputs, list[dict]]:
    """Run the model up to block 0 on [n, seq] token ids, `chunk` samples at a time.

    Returns block 0's inputs (stored in `dtype`, default the model's) and the keyword arguments
    of every block (see `block_kwargs`).
    """
    per_block = block_kwargs(model, arch, ids)
    block0 = blocks_of(model, arch)[0]
    hidden: list[torch.Tensor] = []

    def hook(_mod, args, kw):
        h = (args[0] if args else kw["hidden_states"]).detach()
        hidden.append(h if dtype is None else h.to(dtype))
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
    return BlockInputs(hidden, per_block[0]), per_block


def kwargs_for(kwargs: dict, batch: int) -> dict:
    """Slice batch-dependent tensors (captured with a full chunk) for a smaller last chunk."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > batch:
            v = v[:batch]
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            v = tuple(t[:batch] if t.dim() > 0 and t.shape[0] > batch else t for t in v)
        out[k] = v
    return out


def block_dtype(block) -> torch.dtype:
    for p in block.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def run_block(block, inputs: BlockInputs, runner=None) -> list[torch.Tensor]:
    """Outputs of one block for every captured chunk.

    Inputs are cast to the block's dtype; outputs keep the dtype the inputs were stored in.
    `runner(fn, chunks)` maps the forward over the chunks (default: one after another;
    `Lockstep.run` for the pipeline's single calibration pass).
    """
    dtype = block_dtype(block)
    kwargs = cast_kwargs(inputs.kwargs, dtype)

    def forward(h: torch.Tensor) -> torch.Tensor:
        out = block(h.to(dtype), **kwargs_for(kwargs, h.shape[0]))
        return (out[0] if isinstance(out, tuple) else out).detach().to(h.dtype)

    if runner is not None:
        return runner(forward, inputs.hidden)
    with torch.no_grad():
        return [forward(h) for h in inputs.hidden]
