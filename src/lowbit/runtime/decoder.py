"""lowbit's batch-1 runtime for Llama-family decoders: greedy generation without transformers' per-token
machinery, over the model's own modules (QuantLinear kernels or plain Linears).

One fused q/k/v GEMV and one fused gate/up GEMV per block (the fused layers' buffers are the
originals' storage, viewed — no second copy), RoPE cos/sin computed once per position by the
model's own rotary module, a preallocated KV cache. When every block's projections run on lowbit's
compiled kernels (an fp32 model with QuantLinear layers), a decode step is one call into
lowbit._cpu.Decoder (csrc/decoder.cpp: the whole step in C++, float16 KV cache); otherwise it runs
the same steps as torch ops. Prefill runs torch ops over the whole prompt (causal attention); its
QuantLinear layers with integer codes quantize their inputs to int8 in blocks of 32 and multiply with
VNNI (`int8_prefill`, on by default where the CPU has it: llama.cpp's scheme for its quantized
matmuls, ~1.3x a dense bf16 GEMM; bench/kernels.py measures its perplexity cost), other layers take
their dequantize + bf16 GEMM path. Output equals the Hugging Face forward of the same model up to float
summation order (fp32 models) or bf16 / float16 rounding (quantized ones; int8 prefill adds its
activation rounding) (tests/runtime/test_decoder.py).

Supported: model types whose attention is plain RoPE + GQA with RMSNorm (llama, mistral, qwen2);
`supports(model)` says whether a model qualifies, and callers use `generate()` otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn import QuantLinear, cpu_kernels

MODEL_TYPES = ("llama", "mistral", "qwen2")


def supports(model) -> bool:
    """Llama-family attention (RoPE + GQA, no per-head q/k norms) on a batch-1 causal LM."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in MODEL_TYPES:
        return False
    layers = getattr(getattr(model, "model", None), "layers", None)
    return bool(layers) and not hasattr(layers[0].self_attn, "q_norm") and hasattr(model.model, "rotary_emb")


def _fuse(mods: list[nn.Module]) -> nn.Module | None:
    """One QuantLinear whose rows are the given layers' rows; the originals are re-pointed at views of
    the fused buffers so the weights are held once. None when the layers cannot share a kernel."""
    if not all(isinstance(m, QuantLinear) for m in mods):
        return None
    first = mods[0]
    same = all(m.spec == first.spec and m.kernel == first.kernel and m.in_features == first.in_features
               and m.g_idx is None and (m.perm is None) == (first.perm is None)
               and (m.perm is None or torch.equal(m.perm, first.perm))
               and (m.bias is None) == (first.bias is None) for m in mods)
    if not same or first.g_idx is not None:
        return None
    n = sum(m.out_features for m in mods)
    fused = QuantLinear(first.in_features, n, first.spec, bias=first.bias is not None, perm=first.perm is not None,
                        kernel=first.kernel, name="+".join(m.name for m in mods))
    for buf in ("qweight", "scale", "zero", "bias"):
        parts = [getattr(m, buf) for m in mods]
        if parts[0] is None:
            continue
        if parts[0].shape[0] == 1 and buf in ("scale", "zero"):  # per-tensor: one row each
            if not all(torch.equal(p, parts[0]) for p in parts):
                return None
            setattr(fused, buf, parts[0])
            continue
        whole = torch.cat(parts, dim=0)
        setattr(fused, buf, whole)
        row = 0
        for m in mods:
            setattr(m, buf, whole[row:row + m.out_features])
            row += m.out_features
    if first.perm is not None:
        fused.perm = first.perm
    return fused


class _Block:
    def __init__(self, layer, cfg):
        attn, mlp = layer.self_attn, layer.mlp
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
        self.gate, self.up, self.down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act = mlp.act_fn


def _rms(norm, x):
    var = x.pow(2).mean(-1, keepdim=True)
    return norm.weight * (x * torch.rsqrt(var + norm.variance_epsilon))


def _rope(x, cos, sin):  # x [T, heads, D]; cos/sin [T, 1, D]
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class Decoder:
    """Greedy batch-1 generation for a Llama-family model (see module docstring)."""

    def __init__(self, model, max_len: int = 2048, int8_prefill: bool = True):
        cfg = model.config
        self.int8_prefill = int8_prefill
        self.model, self.cfg = model, cfg
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        inner = model.model
        self.embed, self.norm, self.head = inner.embed_tokens, inner.norm, model.lm_head
        self.blocks = [_Block(layer, cfg) for layer in inner.layers]
        self.dtype = getattr(self.embed, "out_dtype", None) or self.embed.weight.dtype  # an int8 table: what it returns
        self.max_len = 0
        self.rotary = inner.rotary_emb
        self.scale = self.head_dim ** -0.5
        self.native = None  # lowbit._cpu.Decoder when every block runs on the compiled kernels
        self._grow(max_len)

    def _grow(self, max_len: int) -> None:
        if max_len <= self.max_len:
            return
        max_len = -(-max_len // 16) * 16  # the compiled step reads keys 16 positions at a time
        self.max_len = max_len
        pos = torch.arange(max_len).unsqueeze(0)
        probe = torch.zeros(1, 1, self.head_dim, dtype=torch.float32)
        cos, sin = self.rotary(probe, pos)  # once per position
        self.cos, self.sin = cos[0].unsqueeze(1).to(self.dtype), sin[0].unsqueeze(1).to(self.dtype)
        shape = (len(self.blocks), self.kv_heads, max_len, self.head_dim)
        native = self._native_ok()
        cache_dtype = torch.float16 if native else self.dtype  # float16 like llama.cpp's default cache
        # keys position-minor [blocks, kv_heads, head_dim, max_len]: a query's scores against 16
        # positions are one vector of FMAs; values position-major [blocks, kv_heads, max_len, head_dim]
        self.k_cache = torch.zeros(shape[:2] + (self.head_dim, max_len), dtype=cache_dtype)
        self.v_cache = torch.zeros(shape, dtype=cache_dtype)
        self.native = self._build_native(cos[0], sin[0]) if native else None

    def _native_ok(self) -> bool:
        """Whether decode steps can run in lowbit._cpu.Decoder: fp32 activations, every projection a
        QuantLinear on the compiled kernels (q/k/v and gate/up fused), silu, sizes the step handles."""
        cfg = self.cfg
        return (cpu_kernels.load() is not None and self.dtype == torch.float32
                and getattr(cfg, "hidden_act", None) == "silu" and cfg.hidden_size % 16 == 0
                and cfg.intermediate_size % 16 == 0 and self.head_dim % 32 == 0
                and all(b.qkv is not None and b.gate_up is not None
                        and all(m.kernel == "cpu" for m in (b.qkv, b.o, b.gate_up, b.down)) for b in self.blocks))

    def _build_native(self, cos: torch.Tensor, sin: torch.Tensor):
        ext = cpu_kernels.ext()
        nd = ext.Decoder(self.cfg.hidden_size, self.heads, self.kv_heads, self.head_dim, self.cfg.intermediate_size,
                         float(self.blocks[0].ln1.variance_epsilon), cos, sin, self.k_cache, self.v_cache)

        def add(m: QuantLinear) -> int:
            return nd.add_linear(*m._kernel_args(), m.perm, m.bias, *m._layout_args()[:2], m.in_features,
                                 *m._layout_args()[2:])

        for b in self.blocks:
            nd.add_block(b.ln1.weight.detach(), b.ln2.weight.detach(), add(b.qkv), add(b.o), add(b.gate_up),
                         add(b.down))
        return nd

    def _prefill_linear(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.int8_prefill and isinstance(m, QuantLinear) and m.takes_int8_activations:
            return m.forward_int8_activations(x)
        return m(x)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits of the last position for token ids [T] placed at positions start..start+T-1."""
        t = ids.shape[0]
        end = start + t
        if t > 1 and start:
            raise ValueError("prefill runs from position 0; decode one token at a time after it")
        if end > self.max_len:
            raise ValueError(f"context of {end} tokens exceeds the decoder's {self.max_len}")
        h = self.embed(ids)  # [T, hidden]
        if t == 1 and self.native is not None:
            h = self.native.step(h[0], start).unsqueeze(0)
            return self.head(_rms(self.norm, h))[0]
        cos, sin = self.cos[start:end], self.sin[start:end]
        hq, hk, d = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.head_dim
        lin = self._prefill_linear if t > 1 else (lambda m, x: m(x))
        for i, b in enumerate(self.blocks):
            x = _rms(b.ln1, h)
            if b.qkv is not None:  # queries and keys rotated by one call
                qkv = lin(b.qkv, x)
                qk = _rope(qkv[:, :hq + hk].reshape(t, self.heads + self.kv_heads, d), cos, sin)
                q, k, v = qk[:, :self.heads], qk[:, self.heads:], qkv[:, hq + hk:]
            else:
                q, k, v = lin(b.q, x), lin(b.k, x), lin(b.v, x)
                q = _rope(q.reshape(t, self.heads, d), cos, sin)
                k = _rope(k.reshape(t, self.kv_heads, d), cos, sin)
            v = v.reshape(t, self.kv_heads, d)
            self.k_cache[i, :, :, start:end] = k.permute(1, 2, 0)
            self.v_cache[i, :, start:end] = v.transpose(0, 1)
            if t == 1:  # one query: grouped heads as rows of one matmul per KV head
                qg = q.reshape(self.kv_heads, self.heads // self.kv_heads, d)
                att = torch.softmax(torch.bmm(qg, self.k_cache[i, :, :, :end]) * self.scale, dim=-1)
                a = torch.bmm(att, self.v_cache[i, :, :end]).reshape(1, hq)
            else:
                a = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                                   v.transpose(0, 1).unsqueeze(0), is_causal=True, enable_gqa=True)
                a = a[0].transpose(0, 1).reshape(t, hq)
            h = h + lin(b.o, a)
            x = _rms(b.ln2, h)
            if b.gate_up is not None:
                gu = lin(b.gate_up, x)
                g, u = gu[:, :b.gate.out_features], gu[:, b.gate.out_features:]
            else:
                g, u = lin(b.gate, x), lin(b.up, x)
            h = h + lin(b.down, b.act(g) * u)
        return self.head(_rms(self.norm, h[-1:]))[0]

    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos: set[int] | None = None,
                 on_token: Callable[[int], None] | None = None) -> dict:
        """Greedy decode after the prompt `ids` ([T] or [1, T]); returns {"tokens", "prefill_s", "decode_s"}."""
        ids = ids.reshape(-1)
        self._grow(ids.numel() + max_new_tokens)
        t0 = time.perf_counter()
        logits = self.forward(ids, 0)
        t1 = time.perf_counter()
        out: list[int] = []
        pos = ids.numel()
        for _ in range(max_new_tokens):
            tok = int(torch.argmax(logits))
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if (eos and tok in eos) or len(out) == max_new_tokens:
                break
            logits = self.forward(torch.tensor([tok]), pos)
            pos += 1
        t2 = time.perf_counter()
        return {"tokens": out, "prefill_s": t1 - t0, "decode_s": t2 - t1}
