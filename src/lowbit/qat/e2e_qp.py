"""E2E-QP (EfficientQAT's second phase, Chen et al. 2024): after Block-AP, the weights stay
frozen and only the quantization parameters (scales, zero points) of the whole model train end to
end, against the full-precision model's logits (distillation, the default) or the next token
(cross-entropy) on calibration windows.

Only the qparams train (one scale and zero per group of 64: ~3% of the weights' count), so the
optimizer state is small and no weight gradient is formed; the scales get the derivative of the
forward with the codes held (`held_codes`, as in Block-AP), while the codes themselves follow
round(w / s + z) of the frozen weights, so the converted model is exactly the trained forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.qat.losses import causal_lm_ce, causal_lm_kd
from lowbit.qat.prepare import qat_layers, qat_parameters
from lowbit.qat.trainer import TrainConfig, TrainResult, train


@dataclass(frozen=True)
class E2EQPConfig:
    """steps: optimizer steps in total; batch: calibration windows per step; lr: the scales' /
    zeros' peak learning rate (cosine to 0); loss: "kd" (against the teacher's logits) or "ce"."""

    steps: int = 20
    batch: int = 1
    lr: float = 2e-5
    seed: int = 0
    loss: str = "kd"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        for key in ("steps", "batch"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LowbitError(f"E2E-QP {key}={v!r} must be a positive integer")
        if self.loss not in ("kd", "ce"):
            raise LowbitError(f"E2E-QP loss={self.loss!r}; choose 'kd' or 'ce'")
        TrainConfig(steps=self.steps, lr=self.lr)  # the learning rate's own check


def window_order(n: int, batch: int, seed: int) -> Callable[[int], torch.Tensor]:
    """batch_fn(step) -> indices of `batch` of the n windows: epochs of a seeded permutation, a
    function of (seed, step) only."""

    def batch_fn(step: int) -> torch.Tensor:
        first = step * batch
        idx = []
        for k in range(first, first + batch):
            epoch, j = divmod(k, n)
            idx.append(int(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))[j]))
        return torch.tensor(idx)

    return batch_fn


def e2e_qp(student, teacher, calib_ids: torch.Tensor, config: E2EQPConfig, *, progress: bool = True,
           on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train the scales / zeros of `student` (prepared by `prepare_qat`, usually after Block-AP)
    end to end on calibration windows `calib_ids` [n, seq]; in place. `on_step(step, loss)` runs
    after each step (evaluation, or a budget that raises to stop: the parameters stay as they are)."""
    if calib_ids.dim() != 2 or calib_ids.shape[0] < config.batch:
        raise LowbitError(f"E2E-QP needs at least batch={config.batch} calibration windows; got "
                          f"{tuple(calib_ids.shape)}")
    for layer in qat_layers(student).values():
        layer.held_codes = True
    _, qparams = qat_parameters(student, train_weights=False, train_bias=False)
    loss = causal_lm_kd(teacher, config.temperature) if config.loss == "kd" else causal_lm_ce
    order = window_order(calib_ids.shape[0], config.batch, config.seed)
    was_training = student.training
    student.train()
    try:
        return train(student, loss, lambda step: calib_ids[order(step)],
                     TrainConfig(steps=config.steps, lr=config.lr, qparam_lr=config.lr, seed=config.seed,
                                 checkpoint_every=config.steps, grad_clip=None),
                     [], qparams, progress=progress, on_step=on_step)
    finally:
        student.train(was_training)
        for p in qparams:
            p.requires_grad_(False)
