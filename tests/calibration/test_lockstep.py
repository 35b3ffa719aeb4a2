"""Lockstep: chunks pause at barriers, the last one runs the action, errors surface without hangs."""

import threading

import pytest
import torch

from lowbit.calibration.lockstep import Lockstep
from lowbit.errors import LowbitError


def test_barrier_action_sees_every_chunk_and_all_resume_after_it():
    n = 5
    lock = Lockstep(n)
    arrived, log = [], []

    def fn(x):
        arrived.append(lock.current())
        lock.barrier(lambda: log.append(sorted(arrived)))  # runs once, when all have arrived
        lock.barrier(lambda: log.append("second"))
        return x * 2 + len(log)  # every chunk resumes only after both actions ran

    out = lock.run(fn, list(range(n)))
    assert log == [list(range(n)), "second"]
    assert out == [x * 2 + 2 for x in range(n)]


def test_one_thread_runs_at_a_time():
    lock = Lockstep(4)
    running, overlap = [0], [False]
    guard = threading.Lock()

    def fn(_):
        for _ in range(3):
            with guard:
                running[0] += 1
                overlap[0] |= running[0] > 1
            torch.randn(200, 200) @ torch.randn(200, 200)
            with guard:
                running[0] -= 1
            lock.barrier()
        return True

    assert lock.run(fn, [0, 1, 2, 3]) == [True] * 4
    assert not overlap[0]


def test_an_error_in_one_chunk_or_action_is_raised_without_hanging():
    lock = Lockstep(3)

    def fn(x):
        if x == 1:
            raise LowbitError("chunk 1 is bad")
        lock.barrier()
        return x

    with pytest.raises(LowbitError, match="chunk 1 is bad"):
        lock.run(fn, [0, 1, 2])

    lock = Lockstep(3)

    def boom():
        raise LowbitError("the action failed")

    with pytest.raises(LowbitError, match="the action failed"):
        lock.run(lambda x: lock.barrier(boom), [0, 1, 2])
    assert threading.active_count() < 10  # the chunks' threads are gone


def test_no_grad_inside_chunks():
    lock = Lockstep(2)
    w = torch.ones(3, requires_grad=True)
    assert lock.run(lambda x: (w * x).requires_grad, [1.0, 2.0]) == [False, False]
