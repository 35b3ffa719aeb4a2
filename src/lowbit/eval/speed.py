"""Batch-1 decode and prefill throughput (wall clock; for reports and benchmarks, never tests)."""

from __future__ import annotations

import logging
import os
import statistics
import time

import torch

log = logging.getLogger(__name__)


def machine_busy(threshold: float = 0.5) -> tuple[bool, float, int]:
    """(busy, 1-minute load average, cores): busy when the load average exceeds `threshold` x cores,
    i.e. other work competes for the CPU and tokens/s would measure the machine, not the model."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return False, 0.0, cores
    return load > threshold * cores, load, cores


def warn_if_busy(threshold: float = 0.5) -> bool:
    busy, load, cores = machine_busy(threshold)
    if busy:
        log.warning("the machine is busy (1-minute load average %.2f on %d cores): the speed figures below "
                    "measure the competition for the CPU as much as the model; rerun --speed on an idle machine",
                    load, cores)
    return busy


@torch.no_grad()
def decode_tokens_per_s(model, prompt_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 2) -> float:
    """Greedy generate() of exactly `new_tokens` tokens after a short prompt, batch 1."""
    model.generate(prompt_ids[:, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
    return _timed_generate(model, prompt_ids, new_tokens, repeats)


def _timed_generate(model, prompt_ids: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Best of `repeats` greedy generate() calls of exactly `new_tokens` tokens, in tokens/s."""
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(prompt_ids, **kw)
        times.append(time.perf_counter() - t0)
    return new_tokens / min(times)


@torch.no_grad()
def prefill_tokens_per_s(model, ids: torch.Tensor, repeats: int = 3) -> float:
    """One forward pass over a [1, seq] prompt."""
    model(input_ids=ids, use_cache=False)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        times.append(time.perf_counter() - t0)
    return ids.shape[1] / statistics.median(times)


def runtime_decode_tokens_per_s(model, prompt_ids: torch.Tensor, new_tokens: int = 32,
                                repeats: int = 2) -> float | None:
    """Greedy decode tokens/s with lowbit's own runtime (`lowbit.runtime.decoder`: fused projections,
    preallocated KV cache, lowbit's kernels), best of `repeats`; None for an architecture it does not run."""
    from lowbit.runtime.decoder import Decoder, supports

    if not supports(model):
        return None
    ids = prompt_ids.reshape(-1)
    decoder = Decoder(model, ids.numel() + new_tokens + 1)
    decoder.generate(ids[:8], 4)  # warm-up
    best = min(decoder.generate(ids, new_tokens + 1)["decode_s"] for _ in range(repeats))
    return new_tokens / best
