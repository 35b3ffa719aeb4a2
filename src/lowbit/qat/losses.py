"""Training losses: cross-entropy for classification, distillation for causal LMs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POSITIONS = 256  # positions per piece of the [tokens, vocab] softmax arithmetic


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    """batch = (inputs, labels)."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the softened distributions (x T²)."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="sum") / s[..., 0].numel() * t * t


def causal_lm_kd(teacher: nn.Module, temperature: float = 1.0):
    """loss_fn(student, ids [batch, seq]): distillation against the full-precision teacher's
    logits at every position (the teacher runs here, without gradients)."""

    def loss_fn(student: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        s_logits = student(input_ids=ids, use_cache=False).logits
        return distillation_kl(s_logits, t_logits, temperature)

    return loss_fn


def causal_lm_ce(student: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (no teacher)."""
    logits = student(input_ids=ids, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
