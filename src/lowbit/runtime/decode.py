"""Generation settings for fast batch-1 decoding on CPU.

Batch-1 decode of a small model is dominated by Python overhead (hundreds of small ops per token).
`compiled_decode` switches a Hugging Face model to a static KV cache and lets `generate` compile
the per-token forward with torch.compile (transformers only does that on GPUs unless told to).
Explicit and reversible: `eager_decode` restores the dynamic cache.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def compiled_decode(model, mode: str | None = None, fullgraph: bool = False):
    """Make `model.generate` use a static cache (sized by generate's max_length) and a compiled decode step.

    The first generate call compiles (tens of seconds); later calls of the same length reuse it.
    """
    from transformers import CompileConfig

    gc = model.generation_config
    gc.cache_implementation = "static"
    cc = CompileConfig(fullgraph=fullgraph, dynamic=False, mode=mode or "default")
    cc._compile_all_devices = True  # transformers compiles only on GPUs unless this is set
    gc.compile_config = cc
    gc.disable_compile = False
    log.info("compiled decode on: static cache, torch.compile mode=%s", mode)
    return model


def eager_decode(model):
    gc = model.generation_config
    gc.cache_implementation = None
    gc.compile_config = None
    gc.disable_compile = True
    return model
