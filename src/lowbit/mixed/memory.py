"""What a quantized model takes in memory at a context length: weights + KV cache + decode working set.

Pure arithmetic (no model, no I/O): `lowbit fit` uses it to split a memory budget between the
weights and the KV cache.

    total(context) = weight bytes + KV-cache bytes(context) + decode working set(context)

- weight bytes = the bytes of every tensor the runtime holds besides the planned Linears
  (embeddings, norms, lm_head if untied, rotary tables; in the model's own dtype, shared storage
  once: what `lowbit eval` reports as memory) + each planned Linear's storage (packed codes,
  scales, zeros, g_idx: the option's measured bits / 8);
- KV-cache bytes as `QuantizedKVCache.memory_report()["kv_bytes"]` counts them, for batch 1 and a
  cache filled with `context` tokens: per quantized layer, the first `sink` tokens and the newest
  full-precision tail at 16 bits per coordinate, the packed tokens at the quantizer's bytes per
  token block, and the per-sequence side data (key mean + key scale + value mean, fp16). A
  full-precision cache (`KVLayout.fp`) holds every coordinate at the model dtype's width;
- decode working set (one token at a time after the prompt, batch 1; the prompt prefilled in
  chunks, whose activations are not counted): the fp32 logits of one token, the layer's keys and
  values read back in the model dtype (a packed cache dequantizes its whole context every step),
  their copy expanded to every query head (grouped-query attention), one head-row of attention
  scores per head (fp32), and the hidden / MLP activations of one token. The interpreter and
  libraries (python, torch, transformers: a few hundred MB of RSS) are not counted, nor the
  temporaries of dequantizing the packed cache (int64 codes, fp32 rotations: measured ~14x the
  read-back at 3 bits; bench/fit.py: the peak while decoding is ~2.5x this total), so the budget
  is the steady state, not the peak of a decode step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lowbit.errors import LowbitError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30,
          "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_memory(text: str | int, what: str = "--memory") -> int:
    """'600MB' / '600M' -> 600,000,000; '1.5GiB' / '1.5Gi' -> 1,610,612,736; a bare number is bytes.
    K/M/G/T (with or without B) are decimal, Ki/Mi/Gi/Ti (with or without B) binary."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise LowbitError(f"{what} {text!r} is not a memory size; write e.g. 600MB, 600M, 1.5GiB or 800MiB")
        value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value <= 0:
        raise LowbitError(f"{what} must be a positive size; got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs of a decoder config (batch 1)."""

    layers: int
    kv_heads: int
    heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    dtype_bytes: int  # the runtime's activation / full-precision KV width

    @classmethod
    def from_config(cls, config, dtype_bytes: int = 4) -> "ModelShape":
        c = config.get_text_config(decoder=True)
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        types = set(getattr(c, "layer_types", None) or ["full_attention"])
        if types != {"full_attention"}:
            raise LowbitError(f"lowbit fit's memory model covers full-attention decoders; this model has layer types "
                              f"{sorted(types)}")
        return cls(layers=c.num_hidden_layers, kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                   heads=heads, head_dim=head_dim, hidden=c.hidden_size, intermediate=c.intermediate_size,
                   vocab=c.vocab_size, dtype_bytes=dtype_bytes)

    @property
    def coords_per_token(self) -> int:
        """Key + value coordinates one token adds to one layer's cache."""
        return 2 * self.kv_heads * self.head_dim


@dataclass(frozen=True)
class KVLayout:
    """How one cache option stores a layer: `block_bytes` packed bytes per `block` tokens (keys and
    values of every kv head, codes and per-token side data), `sink` / `window` full-precision
    tokens, `side_vectors` fp16 head vectors per layer (key mean, key scale, value mean), and
    `quantized_layers` of the model's layers (the others hold a full-precision cache). `fp`: no
    quantization at all (the runtime's DynamicCache in the model dtype)."""

    block: int = 1
    block_bytes: int = 0
    sink: int = 0
    window: int = 0
    side_vectors: int = 3
    quantized_layers: int | None = None
    fp: bool = False


def kv_layer_bytes(shape: ModelShape, layout: KVLayout, context: int) -> int:
    """One quantized layer's kv_bytes after `context` tokens (QuantizedKVLayer.storage's count)."""
    c = shape.coords_per_token
    sink = min(layout.sink, context)
    rest = context - sink
    movable = max(rest - layout.window, 0)
    packed = movable - movable % layout.block
    tail = rest - packed
    side = 2 * layout.side_vectors * shape.kv_heads * shape.head_dim if packed else 0
    return 2 * c * (sink + tail) + layout.block_bytes * (packed // layout.block) + side


def kv_bytes(shape: ModelShape, layout: KVLayout, context: int) -> int:
    """The whole cache after `context` tokens, batch 1 (memory_report()['kv_bytes'])."""
    if layout.fp:
        return shape.layers * shape.coords_per_token * context * shape.dtype_bytes
    q = shape.layers if layout.quantized_layers is None else layout.quantized_layers
    return q * kv_layer_bytes(shape, layout, context) + (shape.layers - q) * 2 * shape.coords_per_token * context


def decode_overhead_bytes(shape: ModelShape, context: int, quantized_kv: bool) -> int:
    """The working set of decoding one token with `context` tokens cached (see the module doc)."""
    e = shape.dtype_bytes
    logits = 4 * shape.vocab
    read_back = shape.coords_per_token * context * e if quantized_kv else 0
    gqa = 2 * shape.heads * shape.head_dim * context * e if shape.heads != shape.kv_heads else 0
    scores = 4 * shape.heads * context
    acts = (4 * shape.hidden + 3 * shape.intermediate + 2 * shape.heads * shape.head_dim) * e
    return logits + read_back + gqa + scores + acts


@dataclass(frozen=True)
class MemoryBreakdown:
    fixed_weights: int  # everything but the planned Linears
    linear_weights: int  # the planned Linears' storage
    kv: int
    overhead: int

    @property
    def weights(self) -> int:
        return self.fixed_weights + self.linear_weights

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.overhead

    def to_json(self) -> dict:
        return {"fixed_weight_bytes": self.fixed_weights, "linear_weight_bytes": self.linear_weights,
                "weight_bytes": self.weights, "kv_bytes": self.kv, "overhead_bytes": self.overhead,
                "total_bytes": self.total}


def breakdown(shape: ModelShape, layout: KVLayout, context: int, fixed_weight_bytes: int,
              linear_bits: int) -> MemoryBreakdown:
    return MemoryBreakdown(fixed_weights=fixed_weight_bytes, linear_weights=-(-linear_bits // 8),
                           kv=kv_bytes(shape, layout, context),
                           overhead=decode_overhead_bytes(shape, context, not layout.fp))
