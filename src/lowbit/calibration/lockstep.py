"""Run one function over many calibration chunks in lockstep, so hooks can wait for all chunks.

Block-sequential calibration wants, inside a block, every chunk's input to a Linear before that
Linear is quantized, and the rest of the forward to run on the quantized weight. Re-running the
block once per group pays for the block's early layers again and again; here each chunk's forward
runs in its own thread instead, one thread at a time (a baton passed round-robin), and a hook
calls `barrier(action)`: the chunk pauses there, the next chunk runs up to the same point, and the
last chunk to arrive runs `action` (quantize the group) before every chunk resumes. One forward
per block then gives the Hessians of every group *and* the block's quantized outputs.

Only one thread ever runs, so there is no data race and results are deterministic; memory holds
each chunk's live activations at the barrier it waits at. The threads come from a pool that
outlives one block (see `_executor`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_RUN_LOCK = threading.Lock()


def _executor(n: int) -> ThreadPoolExecutor:
    """Worker threads shared by every block's run instead of `n` new threads (each with its own
    OpenMP team) per block. Only one run uses the pool at a time (`_RUN_LOCK`): a run needs all
    `n` threads at once."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < n:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="lowbit-chunk")
        return _POOL


class _Abort(BaseException):
    """Unwinds the other chunks' threads after one of them failed."""


class Lockstep:
    def __init__(self, n: int):
        self.n = n
        self._cv = threading.Condition()
        self._turn = 0
        self._alive = set(range(n))
        self._error: BaseException | None = None
        self._local = threading.local()

    def current(self) -> int:
        """Index of the chunk whose thread is running (inside `run`)."""
        return self._local.index

    def barrier(self, action: Callable[[], None] | None = None) -> None:
        """Wait until every running chunk reached this point; the last one runs `action` first."""
        c = self.current()
        if c == max(self._alive) and action is not None:
            action()
        self._pass(c)
        self._wait(c)

    def run(self, fn: Callable, items: Sequence) -> list:
        """[fn(item) for item in items], each call in its own thread, in lockstep at barriers."""
        results: list = [None] * self.n

        def worker(c: int) -> None:
            self._local.index = c
            try:
                self._wait(c)
                with torch.no_grad():
                    results[c] = fn(items[c])
            except _Abort:
                return
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                with self._cv:
                    if self._error is None:
                        self._error = e
                    self._cv.notify_all()
                return
            with self._cv:
                self._alive.discard(c)
            self._pass(c)

        with _RUN_LOCK:  # the pool holds exactly the threads one run needs
            pool = _executor(self.n)
            for future in [pool.submit(worker, c) for c in range(self.n)]:
                future.result()
        if self._error is not None:
            raise self._error
        return results

    def _pass(self, c: int) -> None:
        with self._cv:
            for k in range(1, self.n + 1):
                nxt = (c + k) % self.n
                if nxt in self._alive:
                    self._turn = nxt
                    break
            self._cv.notify_all()

    def _wait(self, c: int) -> None:
        with self._cv:
            while self._turn != c and self._error is None:
                self._cv.wait()
            if self._error is not None:
                raise _Abort
