"""QuantizedModel: what every writer takes and every reader returns.

The quantized Linears as records (`QuantizedWeight`, by module name), every other tensor under its
Hugging Face state-dict name (the bias of a quantized Linear included, as `<name>.bias`), the model
config, the tokenizer, and free-form metadata (method, source model, calibration, per-layer extras).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

import torch

from lowbit.core.quantize import QuantizedWeight


@dataclass
class QuantizedModel:
    config: Any  # transformers.PretrainedConfig
    layers: Mapping[str, QuantizedWeight]  # a dict, or the pipeline's packed QuantizedLayers
    tensors: dict[str, torch.Tensor]
    tokenizer: Any | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_model(cls, model, tokenizer, layers, **meta) -> "QuantizedModel":
        """From a model whose quantized Linears were swapped (or not) and their records `layers`."""
        tensors = {}
        names = set(layers)
        tied = getattr(model.config, "tie_word_embeddings", False)
        for key, value in model.state_dict().items():
            owner, _, leaf = key.rpartition(".")
            if owner in names and leaf != "bias":
                continue
            if tied and key == "lm_head.weight":
                continue
            tensors[key] = value.detach().contiguous()
        # the pipeline's QuantizedLayers stays as it is (records unpacked one at a time on access):
        # a dict of every unpacked record would hold a byte per weight for the whole model at once
        return cls(model.config, layers, tensors, tokenizer, dict(meta))

    def float_embeddings(self) -> "QuantizedModel":
        """This model with a quantized embedding table (`--embed-bits`) held dequantized among the
        plain tensors, for formats whose embeddings are floating point (the values are the int8
        table's, so the format's model computes what lowbit's does)."""
        from lowbit.models.arch import arch_for

        embed = arch_for(self.config).embed
        if embed not in self.layers:
            return self
        layers = {n: qw for n, qw in self.layers.items() if n != embed}
        tensors = {**self.tensors, f"{embed}.weight": self.layers[embed].dequantize(torch.float32)}
        return QuantizedModel(self.config, layers, tensors, self.tokenizer, self.meta)

    def bias(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(f"{name}.bias")

    def to_module(self):
        """A runnable transformers model: QuantLinear kernels for the records, the rest as stored."""
        from transformers import AutoModelForCausalLM

        from lowbit.errors import LowbitError
        from lowbit.models.arch import arch_for
        from lowbit.nn import QuantLinear
        from lowbit.nn.int8_linear import ACT_TENSORS, Int8Linear
        from lowbit.nn.replace import replace_linear
        from lowbit.runtime.memory import release_free_memory

        arch_for(self.config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        schemes = self.meta.get("schemes") or {}  # activation-quantized layers (lowbit.ptq.llm)
        embed = arch_for(self.config).embed
        for name, qw in self.layers.items():
            if name == embed:
                _install_embedding(model, name, qw)
            elif name in schemes:
                params = {t: self.tensors.get(f"{name}.{t}") for t in ACT_TENSORS}
                replace_linear(model, name, Int8Linear.from_saved(qw, self.bias(name), schemes[name], params, name))
            else:
                replace_linear(model, name, QuantLinear.from_quantized(qw, self.bias(name), name=name))
        rest = {k: v for k, v in self.tensors.items() if k.rpartition(".")[0] not in self.layers}  # act scales too
        _, unexpected = model.load_state_dict(rest, strict=False, assign=True)
        if unexpected:
            raise LowbitError(f"the checkpoint holds tensors the model does not have: {unexpected[:5]}")
        if getattr(self.config, "tie_word_embeddings", False):
            model.tie_weights()
        if any(p.is_meta for p in model.buffers()):
            _rebuild_buffers(model)
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise LowbitError(f"the checkpoint lacks tensors for {missing[:5]}")
        model.eval()
        release_free_memory()  # the per-layer temporaries of building the kernels
        return model


def _install_embedding(model, name: str, qw) -> None:
    from lowbit.nn.quant_embedding import QuantEmbedding
    from lowbit.nn.replace import replace_linear

    old = model.get_submodule(name)
    replace_linear(model, name, QuantEmbedding.from_quantized(qw, old.padding_idx, name=name))


def _rebuild_buffers(model) -> None:
    """Non-persistent buffers (rotary inv_freq) are not saved: rebuild their modules on the CPU."""
    for name, mod in list(model.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)) and hasattr(mod, "config"):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, type(mod)(mod.config))
