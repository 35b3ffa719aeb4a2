"""LoRA adapters on a frozen Linear (dense nn.Linear or a 4-bit Linear4bit base).

y = base(x) + (dropout(x) @ A.T @ B.T) * alpha / r, peft's parametrisation: A [r, in] kaiming-uniform
(a = sqrt(5)), B [out, r] zeros, so a fresh adapter changes nothing. Adapters are float32 master
weights; the product runs in `compute_dtype` (bf16 for QLoRA, float32 for plain LoRA). Only A and
B take gradients. `set_product` starts them from a given product instead (LoftQ init, loftq.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int, alpha: float,
                 dropout: float = 0.0, compute_dtype: torch.dtype = torch.bfloat16,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base, self.in_features, self.out_features = base, in_features, out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.compute_dtype = compute_dtype
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        dt = self.compute_dtype
        h = self.lora_dropout(x).to(dt)
        delta = nn.functional.linear(nn.functional.linear(h, self.lora_A.weight.to(dt)), self.lora_B.weight.to(dt))
        return (y.to(dt) + delta * self.scaling).to(x.dtype if x.dtype.is_floating_point else dt)

    def delta_weight(self) -> torch.Tensor:
        """float32 [out, in]: what merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def set_product(self, b: torch.Tensor, a: torch.Tensor) -> None:
        """Start from B @ A * scaling = b @ a (b [out, r], a [r, in]; lowbit.qlora.loftq)."""
        k = self.scaling ** -0.5
        self.lora_B.weight.copy_(b * k)
        self.lora_A.weight.copy_(a * k)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, compute_dtype={self.compute_dtype}"
