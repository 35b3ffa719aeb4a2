"""Run a block of many small tensor ops on one intra-op thread, restoring the caller's count.

GPTQ's column loop and HQQ's iterations are thousands of ops on tensors of at most a few
million elements. With two OpenMP threads on a busy two-core machine every op pays a barrier
that can wait for a descheduled thread: measured 4-5x slower than one thread here (GPTQ on a
1536x576 layer 0.9 s vs 2.5-13 s; HQQ 2.7 s vs 13 s).
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
