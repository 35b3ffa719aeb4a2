"""Side-by-side comparison of an original and a quantized model."""

from __future__ import annotations

from pathlib import Path

from lowbit.calibration import eval_windows, load_text
from lowbit.eval.quality import quality_pair
from lowbit.eval.size import bits_per_weight, disk_bytes, memory_bytes
from lowbit.eval.speed import (decode_tokens_per_s, prefill_tokens_per_s, runtime_decode_tokens_per_s,
                               warn_if_busy)

KEYS = ("perplexity", "kl", "top1_agreement", "bits_per_weight", "size_bytes", "memory_bytes",
        "decode_tokens_per_s", "runtime_decode_tokens_per_s", "prefill_tokens_per_s")


def compare_models(original, quantized, tokenizer, *, original_path=None, quantized_path=None,
                   text: str = "pydoc", seq_len: int = 512, max_windows: int = 16, speed: bool = False,
                   decode_tokens: int = 32, prefill_len: int = 256, progress: bool = True) -> dict:
    """{"original": {...}, "quantized": {...}} with the KEYS above (speed keys None unless speed=True;
    decode_tokens_per_s is plain transformers generate(), runtime_decode_tokens_per_s lowbit's own
    runtime (lowbit.runtime.decoder; None for architectures it does not run), for both models;
    wall-clock figures, meaningful on an idle machine only, so a busy one gets a warning)."""
    split = load_text(text)
    windows = eval_windows(tokenizer, split.evaluation, seq_len, max_windows)
    labels = (f"the original model {original_path}" if original_path else "the original model",
              f"the quantized model {quantized_path}" if quantized_path else "the quantized model")
    orig, quant = quality_pair(original, quantized, windows, progress, labels)
    if speed:
        warn_if_busy()
    for metrics, model, path in ((orig, original, original_path), (quant, quantized, quantized_path)):
        metrics["bits_per_weight"] = bits_per_weight(model)
        metrics["memory_bytes"] = memory_bytes(model)
        metrics["size_bytes"] = disk_bytes(path) if path and Path(path).exists() else metrics["memory_bytes"]
        if speed:
            prompt = windows[:1, :16]
            prefill = windows[:1, :prefill_len]
            metrics["decode_tokens_per_s"] = decode_tokens_per_s(model, prompt, decode_tokens)
            metrics["runtime_decode_tokens_per_s"] = runtime_decode_tokens_per_s(model, prompt, decode_tokens)
            metrics["prefill_tokens_per_s"] = prefill_tokens_per_s(model, prefill)
        else:
            metrics["decode_tokens_per_s"] = metrics["prefill_tokens_per_s"] = None
            metrics["runtime_decode_tokens_per_s"] = None
    return {"original": orig, "quantized": quant,
            "text": {"source": text, "part": "held-out", "windows": int(windows.shape[0]), "seq_len": int(seq_len)}}


def format_table(result: dict) -> str:
    o, q = result["original"], result["quantized"]
    rows = [("metric", "original", "quantized", "ratio")]
    for k in KEYS:
        a, b = o.get(k), q.get(k)
        if a is None or b is None:
            continue
        ratio = f"{b / a:.3f}" if isinstance(a, (int, float)) and a else ""
        fmt = (lambda v: f"{v / 2**20:.1f} MiB") if k.endswith("bytes") else (lambda v: f"{v:.4g}")
        rows.append((k, fmt(a), fmt(b), ratio))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    t = result.get("text")
    if t:
        lines.append(f"text: held-out part of {t['source']}, {t['windows']} windows x {t['seq_len']} tokens"
                     + ("" if o.get("decode_tokens_per_s") is not None else "; add --speed for tokens/s"))
    return "\n".join(lines)
