"""Long-context sections of bench/kv_bench.py: needle in a haystack (+ greedy agreement) and decode speed.

Needle: a passcode sentence is put at a depth of a haystack of held-out python-docs text, the prompt ends
with a question about it, and 16 tokens are decoded greedily with each cache; the needle is found when the
passcode appears in the decoded text.  The fp cache's continuation is the reference for the greedy match.

Speed: batch-1 decode after a random-token prompt of each context length; all contenders are prefilled
first, then their decode steps are interleaved (one step of each in turn) and each one's median step time
is taken, so machine load hits them alike.  Memory is the cache's bytes after the prompt.
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm import tqdm
from transformers import DynamicCache

from lowbit.kv import QuantizedKVCache

NEEDLE = "\nThe secret passcode is {code}. Remember the secret passcode.\n"
QUESTION = "\nQuestion: what is the secret passcode mentioned above?\nAnswer: The secret passcode is"


@torch.no_grad()
def needle_runs(model, tok, text: str, caches: dict, ctx: int, depths=(0.25, 0.75), n_tokens: int = 16,
                code: str = "48613") -> list[dict]:
    hay = tok(text, add_special_tokens=False).input_ids
    needle = tok(NEEDLE.format(code=code), add_special_tokens=False).input_ids
    question = tok(QUESTION, add_special_tokens=False).input_ids
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    n_hay = ctx - len(bos) - len(needle) - len(question)
    if len(hay) < n_hay:
        hay = (hay * (n_hay // max(len(hay), 1) + 1))
    hay = hay[:n_hay]
    rows = []
    for depth in depths:
        at = int(depth * n_hay)
        ids = torch.tensor([bos + hay[:at] + needle + hay[at:] + question])
        ref = None
        for name, make in tqdm(caches.items(), desc=f"needle at {depth:.0%} of {ctx} tokens"):
            t = time.perf_counter()
            out = model.generate(ids, past_key_values=make(), max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                                 do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)[0, ids.shape[1]:]
            answer = tok.decode(out)
            if ref is None:
                ref = out
            same = (out == ref).float()
            first = int((out != ref).nonzero()[0]) if bool((out != ref).any()) else len(out)
            rows.append({"cache": name, "context": ids.shape[1], "depth": depth, "answer": answer,
                         "found": code in answer, "greedy_match_vs_fp": float(same.mean()),
                         "tokens_to_first_divergence": first, "seconds": time.perf_counter() - t})
    return rows


def _nbytes_fp(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)


def _memory(cache) -> dict:
    if isinstance(cache, QuantizedKVCache):
        m = cache.memory_report()
        return {"kv_bytes": m["kv_bytes"], "working_copy_bytes": m["decode_buffer_bytes"]}
    if type(cache).__name__ == "QuantizedCache" or hasattr(cache.layers[0], "nbits"):
        from kv_peers import _stored_bits

        coords = sum(2 * layer.cumulative_length * layer.keys_shape_hd for layer in cache.layers) \
            if hasattr(cache.layers[0], "keys_shape_hd") else None
        return {"bits_per_coordinate": _stored_bits(cache), "kv_bytes": coords}
    return {"kv_bytes": _nbytes_fp(cache), "working_copy_bytes": 0}


@torch.no_grad()
def speed_runs(model, cfg, contexts, n_tokens: int, bases=None, residual: int = 32, contenders=None) -> list[dict]:
    from kv_peers import available, peer_factory

    from lowbit.kvcache.code_scoring import enable_code_scoring

    if contenders is None:
        kw = dict(key_basis=bases, norm_bits=8)
        contenders = {
            "fp32 DynamicCache": lambda: DynamicCache(config=cfg),
            "lowbit tq 3.25 code scoring": lambda: QuantizedKVCache("turboquant", 3.25, cfg, score_codes=True,
                                                                    **{**kw, "key_basis": None}),
        }
        if available("quanto"):
            for nb in (4, 2):
                contenders[f"QuantizedCache quanto {nb}-bit"] = peer_factory("quanto", nb, cfg, residual_length=residual)
    enable_code_scoring(model)  # score_codes caches' decode steps score the codes; every other cache: SDPA
    rows = []
    gen = torch.Generator().manual_seed(0)
    vocab = cfg.get_text_config(decoder=True).vocab_size
    for ctx in contexts:
        ids = torch.randint(100, vocab - 100, (1, ctx), generator=gen)
        state = {}
        for name, make in tqdm(contenders.items(), desc=f"prefill {ctx}"):
            try:
                cache = make()
                logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
            except Exception as e:  # noqa: BLE001 - a contender that cannot run here is reported, not fatal
                rows.append({"context": ctx, "cache": name, "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            state[name] = [cache, logits.argmax(-1, keepdim=True), []]
        for _ in tqdm(range(n_tokens), desc=f"decode {ctx}"):
            for name, st in state.items():
                t = time.perf_counter()
                logits = model(st[1], past_key_values=st[0], use_cache=True).logits[:, -1]
                st[2].append(time.perf_counter() - t)
                st[1] = logits.argmax(-1, keepdim=True)
        fp_names = [n for n in state if n.startswith("fp")]
        fp_step = min(statistics.median(state[n][2]) for n in fp_names) if fp_names else None
        fp_bytes = _nbytes_fp(state[fp_names[0]][0]) if fp_names else None
        for name, (cache, _, times) in state.items():
            step = statistics.median(times)
            mem = _memory(cache)
            row = {"context": ctx, "cache": name, "step_ms": 1000 * step, "tokens_per_s": 1 / step,
                   "speed_vs_fp": None if fp_step is None else fp_step / step, **mem}
            if fp_bytes and mem.get("kv_bytes"):
                row["memory_vs_fp32"] = mem["kv_bytes"] / fp_bytes
                row["memory_vs_fp32_with_working_copy"] = (mem["kv_bytes"] + mem.get("working_copy_bytes", 0)) / fp_bytes
            if "bits_per_coordinate" in mem:
                row["memory_vs_fp32"] = mem["bits_per_coordinate"] / 32
            rows.append(row)
        del state
    model.set_attn_implementation("sdpa")
    return rows


@torch.no_grad()
def attention_speed(contexts, bits=(2, 3.25, 4), torch_bits=(3.25,), quanto_bits=(2, 4), kv_heads: int = 3,
                    q_heads: int = 9, d: int = 64, reps: int = 15, inv_theta: float = 100000.0,
                    window: int = 0) -> list[dict]:
    """One layer's batch-1 decode attention (SmolLM2's shape) after ``n`` cached tokens, interleaved, medians:
    fp32 / fp16 K,V + SDPA; lowbit scoring the codes (TurboQuant, 8-bit norms, one fp16 sink token, ``window``
    fp tail tokens) with the C++ kernels (``bits``) and in pure torch (``torch_bits``); quanto 2/4-bit
    dequantize-then-SDPA (what transformers' QuantizedCache does each step; its residual buffer and periodic
    re-quantization are left out, which favours it).  Keys / values: random with a few large channels,
    RoPE'd at their positions.  Memory: bytes held (lowbit: codes + norms + frame + sink + tail, as
    ``QuantizedKVCache.memory_report``; quanto: codes + an fp16 scale and zero per 64 values)."""
    import torch.nn.functional as F

    from lowbit.kvcache.cache_layer import QuantizedKVLayer
    from lowbit.kvcache.code_scoring import attend_codes, code_kernels
    from lowbit.kvcache.key_frame import RopeTable, rope
    from lowbit.kvcache.methods import make_kv_quantizers

    have_ext = code_kernels(None, torch.device("cpu")) is not None
    inv = 1.0 / (inv_theta ** (torch.arange(0, d, 2).float() / d))
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in contexts:
        k = torch.randn(1, kv_heads, n, d, generator=g)
        k[..., :4] = k[..., :4] * 8 + 5
        k = rope(k, torch.arange(n), inv)
        v = torch.randn(1, kv_heads, n, d, generator=g)
        q = torch.randn(1, q_heads, 1, d, generator=g)
        k32, v32 = k.float().contiguous(), v.float().contiguous()
        k16, v16 = k.half(), v.half()
        scale = d ** -0.5
        fp32_bytes = 2 * k.numel() * 4
        contenders = {
            "fp32 K,V + SDPA": (lambda: F.scaled_dot_product_attention(q, k32, v32, scale=scale, enable_gqa=True),
                                fp32_bytes),
            "fp16 K,V + SDPA": (lambda: F.scaled_dot_product_attention(q.half(), k16, v16, scale=scale,
                                                                       enable_gqa=True).float(), fp32_bytes // 2),
        }
        layers = {}
        for b in sorted(set(bits) | set(torch_bits)):
            layer = QuantizedKVLayer(lambda kd, vd, b=b: make_kv_quantizers("turboquant", kd, vd, b, 0, norm_bits=8),
                                     sink=1, window=window, inv_freq=inv, key_scale_power=0.25, score_codes=True,
                                     rope_table=RopeTable(inv))
            layer.update(k, v)
            layers[b] = layer
            mem = layer.storage()["bytes"]
            if b in bits and have_ext:
                contenders[f"lowbit {b:g}-bit codes, C++"] = (
                    lambda layer=layer: attend_codes(layer, q, scale, kernels=True), mem)
            if b in torch_bits:
                contenders[f"lowbit {b:g}-bit codes, torch"] = (
                    lambda layer=layer: attend_codes(layer, q, scale, kernels=False), mem)
        try:
            from optimum.quanto import MaxOptimizer, qint2, qint4, quantize_weight

            opt = MaxOptimizer()
            for nb in quanto_bits:
                qtype = {2: qint2, 4: qint4}[nb]

                def qz(t, qtype=qtype):
                    s_, z_ = opt(t, qtype, 0, 64)
                    return quantize_weight(t, qtype, 0, s_, z_, 64)

                qk, qv = qz(k32), qz(v32)
                contenders[f"quanto {nb}-bit dequantize + SDPA"] = (
                    lambda qk=qk, qv=qv: F.scaled_dot_product_attention(q, qk.dequantize(), qv.dequantize(),
                                                                        scale=scale, enable_gqa=True),
                    fp32_bytes * (nb + 32 / 64) / 32)
        except ImportError:
            pass
        ref = F.scaled_dot_product_attention(q, k32, v32, scale=scale, enable_gqa=True)
        times = {name: [] for name in contenders}
        err = {}
        for name, (fn, _) in contenders.items():
            err[name] = float((fn().float() - ref).norm() / ref.norm())  # warm-up, and how far from fp32
        # the pure-torch code path (30x slower, large temporaries) is timed on its own afterwards: interleaved, it
        # slowed whichever contender ran next by up to 3x (caches and freshly mapped memory)
        slow = [name for name in contenders if name.endswith(", torch")]
        for group in ([n for n in contenders if n not in slow], slow):
            for _ in range(reps):
                for name in group:
                    t = time.perf_counter()
                    contenders[name][0]()
                    times[name].append(time.perf_counter() - t)
        fp_name = min(("fp32 K,V + SDPA", "fp16 K,V + SDPA"), key=lambda c: statistics.median(times[c]))
        fp, fp_mem = statistics.median(times[fp_name]), contenders[fp_name][1]
        for name, ts in times.items():
            mem = contenders[name][1]
            rows.append({"context": n, "contender": name, "ms": 1000 * statistics.median(ts),
                         "speed_vs_fastest_fp": fp / statistics.median(ts), "fastest_fp": fp_name,
                         "memory_bytes": mem, "memory_vs_fastest_fp": mem / fp_mem,
                         "memory_vs_fp16": mem / (fp32_bytes // 2), "memory_vs_fp32": mem / fp32_bytes,
                         "output_rel_error_vs_fp32": err[name], "threads": torch.get_num_threads()})
    return rows
