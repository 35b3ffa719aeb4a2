"""LoftQ-style initialisation: quantize W and start the adapters from the quantization residual.

Alternating T times (LoftQ, Li et al. 2023): Q = quantize(W - B A), then B A = the rank-r truncated
SVD of W - dequantize(Q). The 4-bit base plus the adapters then start closer to W than the 4-bit
base alone (zero init: B = 0). Pure function over tensors.
"""

from __future__ import annotations

import torch

from lowbit.qlora.storage import Packed4bit, quantize_4bit


def loftq(w: torch.Tensor, r: int, quant_type: str = "nf4", double_quant: bool = True,
          iters: int = 5) -> tuple[Packed4bit, torch.Tensor, torch.Tensor]:
    """(packed base, B [out, r], A [r, in]) with dequantize(packed) + B @ A ~ w."""
    w = w.detach().float()
    ab = torch.zeros_like(w)
    for _ in range(max(1, iters)):
        packed = quantize_4bit(w - ab, quant_type, double_quant)
        u, s, vh = torch.linalg.svd(w - packed.dequantize(), full_matrices=False)
        root = s[:r].sqrt()
        b, a = u[:, :r] * root, root.unsqueeze(1) * vh[:r]
        ab = b @ a
    return packed, b, a
