"""Keep the process's resident memory close to what is actually alive during long quantization runs."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """glibc: hand the free pages of every malloc arena back to the OS (`malloc_trim(0)`).

    The calibration forwards allocate and free many few-MiB activations; glibc keeps the freed
    space in its arena, so without this resident memory ratchets up block after block. The pipeline calls it at every group barrier and after every block (a few
    milliseconds each). A fixed 1 MiB mmap threshold holds memory lower still, at a price in time
    (`return_large_frees_to_os`). No-op elsewhere; returns whether it ran.
    """
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


M_ARENA_MAX = -8  # glibc mallopt parameter


@functools.cache
def share_one_arena() -> bool:
    """glibc: let every thread allocate from one malloc arena (`mallopt(M_ARENA_MAX, 1)`).

    The lockstep calibration runs each chunk in its own thread but only one at a time, so a
    shared arena costs no contention, while per-thread arenas would each grow to their thread's
    transient peak. Applies to threads created afterwards; process-wide and kept. No-op elsewhere.
    """
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_ARENA_MAX, 1))


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@functools.cache
def return_large_frees_to_os(threshold: int = 1 << 20) -> bool:
    """glibc: serve every allocation above `threshold` bytes with its own mapping (low-memory mode).

    glibc raises its mmap threshold after large frees (up to 32 MiB), so few-MiB activations then
    come from the heap and their space stays with the process. A fixed threshold unmaps them on
    free: GPTQ on SmolLM2 (64x512) peaked at 790 MiB instead of 932-1017 MiB, but every large
    temporary is mapped afresh and page-faulted in: 69 s instead of 47-49 s. Process-wide
    and kept (glibc has no way back to the adaptive threshold). No-op elsewhere.
    """
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
