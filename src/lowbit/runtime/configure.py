"""The one place lowbit changes process-wide settings, called by the CLI (or a user, explicitly).

Importing lowbit or calling its library functions never changes them; functions that need a
different setting for a while (one intra-op thread in GPTQ's column loop) restore it.
"""

from __future__ import annotations

import logging

import torch

from lowbit.runtime.memory import return_large_frees_to_os, share_one_arena

log = logging.getLogger(__name__)


def configure(*, threads: int | None = None, low_memory: bool = False) -> dict:
    """Process settings for long quantization runs; returns what was applied.

    - glibc: one malloc arena for all threads (the calibration's lockstep threads run one at a
      time; per-thread arenas would each keep their transient peak);
    - `low_memory`: every allocation above 1 MiB gets its own mapping, unmapped on free (lower
      peak RSS, slower; glibc offers no way back, so it stays for the process);
    - `threads`: torch's intra-op thread count.
    """
    applied = {"one_arena": share_one_arena()}
    if low_memory:
        applied["low_memory"] = return_large_frees_to_os()
    if threads is not None:
        torch.set_num_threads(int(threads))
        applied["threads"] = int(threads)
    log.debug("runtime configured: %s", applied)
    return applied
