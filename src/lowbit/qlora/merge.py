"""Merge adapters into the base: every LoraLinear becomes a dense nn.Linear with W + B @ A * alpha / r.

The base weight is the original full-precision one when given (`original`: the model the adapters
were trained for, as peft's merge_and_unload on the original model does), else the dequantized
4-bit base. The merged model is a plain Hugging Face model: save it and quantize it with any lowbit
method, export it to any lowbit format (`lowbit finetune ... --merge` writes it)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.qlora.linear4bit import Linear4bit
from lowbit.qlora.lora import LoraLinear


def _dense(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    if isinstance(module, nn.Linear):
        return module
    w = module.dense(torch.float32)
    lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if module.bias is not None:
            lin.bias.copy_(module.bias.float())
    return lin


@torch.no_grad()
def merge(model: nn.Module, original: nn.Module | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """With `original`: add each adapter's B @ A * alpha / r to the original model's weight, in place,
    and return `original` (the adapted model's 4-bit base and bf16 parts are not used). Without:
    replace the adapters (and 4-bit bases) of `model` by dense Linears in place; returns `model` in `dtype`."""
    if original is not None:
        for name, m in model.named_modules():
            if isinstance(m, LoraLinear):
                w = original.get_submodule(name).weight
                w.add_(m.delta_weight().to(w.dtype))
        model = original
    inner = {f"{n}.base" for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    todo = [(n, m) for n, m in model.named_modules() if isinstance(m, (LoraLinear, Linear4bit)) and n not in inner]
    for name, m in todo:
        base = _dense(m.base if isinstance(m, LoraLinear) else m, dtype)
        if isinstance(m, LoraLinear):
            base.weight.add_(m.delta_weight().to(base.weight.dtype))
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, base.to(dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(dtype)
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        model.gradient_checkpointing_disable()
    model.config.use_cache = True
    return model
