"""Hessian statistics the pipeline's hooks feed, shared by Linears that read the same input."""

from __future__ import annotations

import weakref

import torch

from lowbit.algorithms.hessian import HessianAccumulator
from lowbit.errors import LowbitError
from lowbit.methods.base import Method


class _SharedHessian(HessianAccumulator):
    """A Hessian shared by Linears that read the same input tensor (q/k/v, gate/up): each
    activation is added once, however many of those Linears' hooks see it."""

    def __init__(self, in_features: int, name: str):
        super().__init__(in_features, name=name)
        self._last = None

    def add_once(self, x: torch.Tensor) -> None:
        if self._last is not None and self._last() is x:
            return
        self._last = weakref.ref(x)
        self.add(x)


class HessianStats:
    """What the pipeline's forward hook feeds (`.add(x)`); resolves to a shared accumulator."""

    def __init__(self, pool: list, name: str, in_features: int):
        self.pool, self.name, self.in_features = pool, name, in_features
        self.acc: _SharedHessian | None = None

    def add(self, x: torch.Tensor) -> None:
        if self.acc is None:
            for ref, acc in self.pool:
                if ref() is x:
                    self.acc = acc
                    break
            else:
                self.acc = _SharedHessian(self.in_features, self.name)
                self.pool.append((weakref.ref(x), self.acc))
                self.pool[:] = [(r, a) for r, a in self.pool if r() is not None]
        self.acc.add_once(x)

    @property
    def H(self) -> torch.Tensor:
        if self.acc is None:
            raise LowbitError(f"{self.name}: no calibration activations reached this layer; its Hessian is empty")
        return self.acc.H


class HessianMethod(Method):
    """A calibrated method: Hessians of each Linear's inputs, shared where inputs are shared."""

    needs_calibration = True

    def __init__(self, options=None, **kwargs):
        super().__init__(options, **kwargs)
        self._pool: list = []

    def make_stats(self, name, linear):
        return HessianStats(self._pool, name, linear.in_features)

    def prepare_block(self, block, run_block, arch, plan, search=None) -> bool:
        self._pool.clear()
        return False
