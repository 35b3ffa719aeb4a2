"""HQQ: calibration-free half-quadratic optimisation of scale / zero (`lowbit.algorithms.hqq`)."""

from __future__ import annotations

import dataclasses

from lowbit.algorithms import hqq
from lowbit.methods.base import Method, positive


@dataclasses.dataclass(frozen=True)
class HQQOptions:
    p: float = 0.7  # lp-norm of the error
    iters: int = 20
    beta: float = 10.0
    kappa: float = 1.01
    optimize_scale: bool | None = None  # default: for symmetric grids

    def __post_init__(self):
        positive("hqq", p=self.p, iters=self.iters, beta=self.beta, kappa=self.kappa)


class HQQ(Method):
    name = "hqq"
    Options = HQQOptions

    def quantize_linear(self, name, W, spec, stats):
        return hqq.optimize(W, spec, name=name, **dataclasses.asdict(self.options))
