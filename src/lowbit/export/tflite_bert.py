"""TFLite export of a BERT-family encoder (Hugging Face BertModel, e.g. all-MiniLM-L6-v2) whose
Linears lowbit converted to static int8: int8 FULLY_CONNECTED for every Linear, float islands
(DEQUANTIZE -> float ops -> QUANTIZE) where TFLite has no int8 form of what lowbit runs in float:
embeddings (GATHER), LayerNorm (MEAN / SUB / MUL / RSQRT / ADD), attention (BATCH_MATMUL, SOFTMAX
over the additive key mask) and GELU.

Inputs input_ids, attention_mask, token_type_ids (int32 [batch, T], T fixed at export: the
position embeddings are a constant [1, T, H]); output last_hidden_state (float32 [batch, T, H]).
Each Linear's int8 input grid is lowbit's calibrated one; its int8 output grid (TFLite
FULLY_CONNECTED writes int8) is the min-max range of that Linear's outputs on `example_inputs`, so
the file rounds once more than lowbit, which keeps the product in float.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.tflite import (DEQUANTIZE, OUTPUT_SPEC, QUANTIZE, RESHAPE, TRANSPOSE, VERSIONS, Qp,
                                  fully_connected, input_qparams, spec_qparams)
from lowbit.export.tflite_file import TFLiteFile, options
from lowbit.io.atomic import atomic_write_bytes
from lowbit.nn.int8_linear import Int8Linear
from lowbit.observers.qparams import range_qparams

ADD, SUB, MUL, MEAN, RSQRT, SOFTMAX, GATHER, CAST, BATCH_MATMUL, GELU = 0, 41, 18, 40, 76, 25, 36, 53, 126, 150
CONCATENATION = 2
GROUPS = 6  # output-channel groups per Linear: ranges from max|y| down to max|y| / 32
OPT = {"ConcatenationOptions": 10, "ReducerOptions": 27, "SoftmaxOptions": 9, "GatherOptions": 23,
       "BatchMatMulOptions": 101, "GeluOptions": 116}  # builtin option union types
MASK_MIN = -1e9  # additive key mask: exp underflows to 0 as with HF's dtype minimum
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class _Graph:
    def __init__(self, seq_len: int, int32: bool):
        self.f = TFLiteFile()
        self.int32 = int32
        self.t = seq_len
        self.n = 0
        self.quantized: dict[tuple[int, Qp], int] = {}

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}:{self.n}"

    def act(self, base: str, shape, dtype=np.float32, qp: Qp | None = None) -> int:
        kw = {} if qp is None else {"scale": qp[0], "zero": qp[1]}
        return self.f.tensor(self.name(base), (1, *shape[1:]), dtype, batch_dim=True, **kw)

    def op(self, code: int, inputs, shape, base: str, table: str | None = None, dtype=np.float32, **fields) -> int:
        out = self.act(base, shape, dtype)
        opt = options(table, **fields) if table else None
        self.f.op(code, inputs, [out], OPT.get(table, 0), opt, VERSIONS.get(code, 1))
        return out

    def const(self, base: str, value) -> int:
        return self.f.const(self.name(base), np.asarray(value))

    def shape_of(self, x: int) -> tuple[int, ...]:
        return self.f.tensors[x].shape

    # ---- float islands -------------------------------------------------------------------------------
    def layer_norm(self, x: int, ln: nn.LayerNorm, name: str) -> int:
        shape = self.shape_of(x)
        axis = self.const("axis", np.array([len(shape) - 1], np.int32))
        mean = self.op(MEAN, [x, axis], (*shape[:-1], 1), f"{name}.mean", "ReducerOptions", KeepDims=True)
        d = self.op(SUB, [x, mean], shape, f"{name}.centered")
        var = self.op(MEAN, [self.op(MUL, [d, d], shape, f"{name}.sq"), axis], (*shape[:-1], 1), f"{name}.var",
                      "ReducerOptions", KeepDims=True)
        eps = self.const("eps", np.array(ln.eps, np.float32))
        r = self.op(RSQRT, [self.op(ADD, [var, eps], (*shape[:-1], 1), f"{name}.var_eps")], (*shape[:-1], 1),
                    f"{name}.rstd")
        y = self.op(MUL, [d, r], shape, f"{name}.normed")
        y = self.op(MUL, [y, self.const(f"{name}.weight", ln.weight.detach().float().numpy())], shape,
                    f"{name}.scaled")
        return self.op(ADD, [y, self.const(f"{name}.bias", ln.bias.detach().float().numpy())], shape, name)

    def reshape(self, x: int, shape, base: str) -> int:
        new = self.const("shape", np.array((-1, *shape[1:]), np.int32))
        return self.op(RESHAPE, [x, new], shape, base)

    def transpose(self, x: int, perm, base: str) -> int:
        shape = tuple(self.shape_of(x)[i] for i in perm)
        return self.op(TRANSPOSE, [x, self.const("perm", np.array(perm, np.int32))], shape, base)

    # ---- int8 islands --------------------------------------------------------------------------------
    def linear(self, x: int, lin: Int8Linear, name: str, out_range: tuple[float, float]) -> int:
        """float x -> QUANTIZE (shared by Linears with the same input grid) -> int8 FC -> DEQUANTIZE."""
        in_qp = input_qparams(lin, name)
        key = (x, in_qp)
        if key not in self.quantized:
            q = self.act(f"{name}.input_q", self.shape_of(x), np.int8, in_qp)
            self.f.op(QUANTIZE, [x], [q], version=VERSIONS[QUANTIZE])
            self.quantized[key] = q
        if self.int32:
            return self.int32_linear(self.quantized[key], lin, name, in_qp)
        return self.grouped_linear(self.quantized[key], lin, name, in_qp, out_range)

    def grouped_linear(self, q: int, lin: Int8Linear, name: str, in_qp: Qp, out_range) -> int:
        """int8 FULLY_CONNECTED with int8 outputs, the output channels split into groups of similar
        range (max |y| within a factor 2 of each other, the smallest ones together), each with its
        own min-max grid: TFLite activations have one grid per tensor, and one grid for all of a
        layer's outputs is ~40x too coarse for MiniLM's outlier channels. The groups are DEQUANTIZEd,
        concatenated and put back in channel order (GATHER)."""
        lo, hi = out_range
        if lin.scheme.output is not None:
            groups = [np.arange(lin.out_features)]
        else:
            amax = np.maximum(np.abs(lo), np.abs(hi)).clip(min=1e-12)
            level = np.clip(np.floor(np.log2(amax.max() / amax)), 0, GROUPS - 1).astype(int)
            groups = [np.flatnonzero(level == g) for g in range(GROUPS) if (level == g).any()]
        base = self.shape_of(q)[:-1]
        parts = []
        for j, rows in enumerate(groups):
            if lin.scheme.output is not None:
                out_qp = spec_qparams(lin.output_scale, lin.output_zero)
            else:
                s, z = range_qparams(torch.tensor(float(lo[rows].min())), torch.tensor(float(hi[rows].max())),
                                     OUTPUT_SPEC)
                out_qp = spec_qparams(s, z)
            shape = (*base, len(rows))
            part = f"{name}.part{j}" if len(groups) > 1 else name
            y = self.act(part, shape, np.int8, out_qp)
            fully_connected(self.f, part, lin, q, in_qp, y, keep_dims=len(shape) > 2,
                            rows=None if len(groups) == 1 else rows)
            parts.append(self.op(DEQUANTIZE, [y], shape, f"{part}.float"))
        if len(parts) == 1:
            return parts[0]
        shape = (*base, lin.out_features)
        cat = self.op(CONCATENATION, parts, shape, f"{name}.grouped", "ConcatenationOptions", Axis=len(shape) - 1)
        order = np.argsort(np.concatenate(groups)).astype(np.int32)
        return self.op(GATHER, [cat, self.const(f"{name}.order", order)], shape, f"{name}.float", "GatherOptions",
                       Axis=len(shape) - 1)

    def int32_linear(self, q: int, lin: Int8Linear, name: str, in_qp: Qp) -> int:
        """BATCH_MATMUL int8 x int8 -> int32 (the input's zero point applied by the kernel), then the
        rescale lowbit does in float: CAST, x (input scale x weight scale) per output, + bias."""
        shape = (*self.shape_of(q)[:-1], lin.out_features)
        w = self.f.const(f"{name}.weight", np.ascontiguousarray(lin.weight_codes.numpy().T), scale=1.0, zero=0)
        acc = self.act(f"{name}.int32", shape, np.int32)
        self.f.op(BATCH_MATMUL, [q, w], [acc], OPT["BatchMatMulOptions"], options("BatchMatMulOptions"), 4)
        y = self.op(CAST, [acc], shape, f"{name}.acc")
        scale = (in_qp[0] * lin.weight_scale.double().numpy()).astype(np.float32)
        y = self.op(MUL, [y, self.const(f"{name}.scale", scale)], shape, f"{name}.rescaled")
        if lin.bias is not None:
            y = self.op(ADD, [y, self.const(f"{name}.bias", lin.bias.detach().float().numpy())], shape, name)
        return y


def _check(model) -> None:
    cfg = getattr(model, "config", None)
    if cfg is None or not all(hasattr(model, a) for a in ("embeddings", "encoder")):
        raise LowbitError(f"{type(model).__name__}: the encoder export takes a Hugging Face BertModel (embeddings, "
                          "encoder.layer); other models go through lowbit.export.tflite.export")
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute" or cfg.hidden_act not in ("gelu",):
        raise LowbitError(f"{type(model).__name__}: only absolute position embeddings and exact GELU are lowered "
                          f"(got {getattr(cfg, 'position_embedding_type', None)}, {cfg.hidden_act})")
    names = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense")
    for i, layer in enumerate(model.encoder.layer):
        for n in names:
            if not isinstance(layer.get_submodule(n), Int8Linear):
                raise LowbitError(f"encoder.layer.{i}.{n}: not an int8 Linear; convert the encoder with a static "
                                  "scheme (ptq w8a8-static) before exporting")


def _output_ranges(model, example: dict) -> dict[str, tuple[float, float]]:
    """Per output channel min / max of every Int8Linear's output on the example batch."""
    seen, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, Int8Linear):
            def hook(m, args, out, name=name):
                y = out.detach().reshape(-1, out.shape[-1])
                seen[name] = (y.amin(0).numpy(), y.amax(0).numpy())
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**example)
    finally:
        for h in hooks:
            h.remove()
    return seen


def to_tflite(model, example_inputs: dict, int32: bool = False) -> bytes:
    """The .tflite bytes of a converted BertModel; `example_inputs`: a dict of int tensors
    (input_ids, attention_mask, token_type_ids, [batch, T]) that fixes T and the output grids."""
    _check(model)
    example = {k: torch.as_tensor(v) for k, v in example_inputs.items() if k in INPUTS}
    if "input_ids" not in example or example["input_ids"].dim() != 2:
        raise LowbitError("example_inputs: needs input_ids of shape [batch, T]")
    ranges = _output_ranges(model, example)
    cfg = model.config
    t, h = example["input_ids"].shape[1], cfg.hidden_size
    heads = cfg.num_attention_heads
    hd = h // heads
    g = _Graph(t, int32)
    ids, mask, types = (g.f.tensor(n, (1, t), np.int32, batch_dim=True) for n in INPUTS)
    g.f.inputs.extend([ids, mask, types])
    e = model.embeddings
    word = g.op(GATHER, [g.const("word_embeddings", e.word_embeddings.weight.detach().float().numpy()), ids],
                (1, t, h), "embeddings.word", "GatherOptions", Axis=0)
    tok = g.op(GATHER, [g.const("token_type_embeddings", e.token_type_embeddings.weight.detach().float().numpy()),
                        types], (1, t, h), "embeddings.token_type", "GatherOptions", Axis=0)
    pos = g.const("position_embeddings", e.position_embeddings.weight.detach().float().numpy()[None, :t])
    x = g.op(ADD, [g.op(ADD, [word, tok], (1, t, h), "embeddings.sum"), pos], (1, t, h), "embeddings.pos")
    x = g.layer_norm(x, e.LayerNorm, "embeddings.LayerNorm")
    # additive key mask [batch, 1, 1, T]: 0 where attended, MASK_MIN where padding
    mf = g.op(CAST, [mask], (1, t), "mask.float")
    neg = g.op(MUL, [g.op(SUB, [g.const("one", np.array(1.0, np.float32)), mf], (1, t), "mask.inverted"),
                     g.const("mask_min", np.array(MASK_MIN, np.float32))], (1, t), "mask.additive")
    neg = g.reshape(neg, (1, 1, 1, t), "mask.4d")
    scale = g.const("attention_scale", np.array(hd ** -0.5, np.float32))
    for i, layer in enumerate(model.encoder.layer):
        p = f"encoder.layer.{i}"
        heads_of = lambda y, what: g.transpose(g.reshape(y, (1, t, heads, hd), f"{p}.{what}.heads"),  # noqa: E731
                                               (0, 2, 1, 3), f"{p}.{what}.bhtd")
        sa = layer.attention.self
        q, k, v = (heads_of(g.linear(x, getattr(sa, w), f"{p}.attention.self.{w}",
                                     ranges[f"{p}.attention.self.{w}"]), w) for w in ("query", "key", "value"))
        s = g.op(BATCH_MATMUL, [q, k], (1, heads, t, t), f"{p}.scores", "BatchMatMulOptions", AdjY=True)
        s = g.op(ADD, [g.op(MUL, [s, scale], (1, heads, t, t), f"{p}.scaled"), neg], (1, heads, t, t),
                 f"{p}.masked")
        a = g.op(SOFTMAX, [s], (1, heads, t, t), f"{p}.probs", "SoftmaxOptions", Beta=1.0)
        c = g.op(BATCH_MATMUL, [a, v], (1, heads, t, hd), f"{p}.context", "BatchMatMulOptions")
        c = g.reshape(g.transpose(c, (0, 2, 1, 3), f"{p}.context.bthd"), (1, t, h), f"{p}.context.bth")
        o = g.linear(c, layer.attention.output.dense, f"{p}.attention.output.dense",
                     ranges[f"{p}.attention.output.dense"])
        x = g.layer_norm(g.op(ADD, [o, x], (1, t, h), f"{p}.attention.residual"), layer.attention.output.LayerNorm,
                         f"{p}.attention.output.LayerNorm")
        u = g.linear(x, layer.intermediate.dense, f"{p}.intermediate.dense", ranges[f"{p}.intermediate.dense"])
        u = g.op(GELU, [u], g.shape_of(u), f"{p}.gelu", "GeluOptions", Approximate=False)
        o = g.linear(u, layer.output.dense, f"{p}.output.dense", ranges[f"{p}.output.dense"])
        x = g.layer_norm(g.op(ADD, [o, x], (1, t, h), f"{p}.output.residual"), layer.output.LayerNorm,
                         f"{p}.output.LayerNorm")
    g.f.outputs.append(x)
    return g.f.to_bytes()


def export(model, example_inputs: dict, out: str | Path, int32: bool = False) -> Path:
    """Write the .tflite file of a converted BertModel (atomically)."""
    data = to_tflite(model, example_inputs, int32)
    out = Path(out)
    atomic_write_bytes(out, data)
    return out
