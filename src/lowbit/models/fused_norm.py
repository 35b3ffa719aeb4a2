"""Torch's fused RMSNorm in place of Hugging Face's Llama-style RMSNorm, for calibration forwards.

`LlamaRMSNorm.forward` converts its input to float32, squares, averages, multiplies by the
reciprocal root and rounds back: four float32 temporaries of the activation's size per call.
`torch.nn.functional.rms_norm` does the same arithmetic in one kernel; multiplying its result by
the weight afterwards keeps HF's rounding order (normalise, round to the input dtype, scale), so
the outputs are the same (bit-identical in the tests; the pipeline uses it only in the bf16
working copy that calibration forwards run through). Which classes qualify is data:
`models.arch.LLAMA_STYLE_RMSNORMS`.
"""

from __future__ import annotations

import torch

from lowbit.models.arch import LLAMA_STYLE_RMSNORMS


class FusedRMSNorm(torch.nn.Module):
    def __init__(self, weight: torch.nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.nn.functional.rms_norm(x, (x.shape[-1],), None, self.eps)


def fuse_norms(module: torch.nn.Module) -> int:
    """Replace every Llama-style RMSNorm below `module` by a `FusedRMSNorm` sharing its weight;
    returns how many were replaced."""
    found = [(name, sub) for name, sub in module.named_modules()
             if name and type(sub).__name__ in LLAMA_STYLE_RMSNORMS]
    for name, sub in found:
        parent, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, FusedRMSNorm(sub.weight, sub.variance_epsilon))
    return len(found)
