"""KV-cache / vector quantization benchmark: distortion, SmolLM2 quality, memory and speed.

    OMP_NUM_THREADS=1 .venv/bin/python bench/kv_bench.py [--windows 4] [--seq-len 512] [--greedy-tokens 128]
        [--prompts 8] [--prompt-len 128] [--speed-tokens 64] [--quick]

Prints the tables, writes bench/results/kv.json and bench/results/kv.png.  Cache variants: every method
with the default key frame (RoPE undone, centred, var^-1/4 scaled, one fp16 sink token), TurboQuant as
the paper applies it (``plain``), and TurboQuant with a key basis calibrated on the calibration split.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

from lowbit.kv import KIVI, QJL, PolarQuant, QuantizedKVCache, TurboQuantMSE, TurboQuantProd, greedy_agreement, kv_eval

OUT = Path(__file__).parent / "results"
GAUSS = {1: 0.3634, 2: 0.1175, 3: 0.0345, 4: 0.0095}
PAPER_DPROD = {1: 1.57, 2: 0.56, 3: 0.18, 4: 0.047}
METHODS = ["turboquant", "turboquant-prod", "polarquant", "qjl", "kivi"]
BITS = [2.5, 3, 3.5, 4]


def unit(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def distortion(n: int) -> list[dict]:
    rows = []
    for d in (64, 128, 1536):
        m = n if d < 1000 else n // 4
        x, z = unit(m, d, 1), unit(m, d, 2)
        y = 0.6 * x + 0.8 * z  # correlated query: <x, y> ≈ 0.6, makes the MSE variant's bias visible
        for b in (1, 2, 3, 4):
            xm = TurboQuantMSE(d, b, seed=3)(x)
            xp = TurboQuantProd(d, b, seed=3)(x)
            xpo = PolarQuant(d, b, seed=3)(x) if b >= 1 else None
            ip = (x * y).sum(-1)
            rows.append({
                "dim": d, "bits": b,
                "D_mse": ((xm - x) ** 2).sum(-1).mean().item(),
                "D_mse_lloyd_max_gauss": GAUSS[b],
                "lower_bound_4^-b": 4.0 ** -b,
                "D_mse_polarquant": ((xpo - x) ** 2).sum(-1).mean().item(),
                "d*D_prod": d * (((xp - x) * z).sum(-1) ** 2).mean().item(),
                "d*D_prod_paper": PAPER_DPROD[b],
                "ip_slope_mse": ((xm * y).sum(-1) * ip).sum().item() / (ip * ip).sum().item(),
                "ip_slope_prod": ((xp * y).sum(-1) * ip).sum().item() / (ip * ip).sum().item(),
                "ip_bias_prod": ((xp * y).sum(-1) - ip).mean().item(),
            })
    return rows


def quantize_speed(n: int = 32768, d: int = 64) -> dict:
    x = torch.randn(n, d)
    out = {}
    for name, q in [("turboquant", TurboQuantMSE(d, 4)), ("turboquant-prod", TurboQuantProd(d, 4)),
                    ("polarquant", PolarQuant(d, 4)), ("qjl", QJL(d, 4)), ("kivi-value", KIVI(d, 4))]:
        q.quantize(x[:256])
        t = time.perf_counter()
        p = q.quantize(x)
        tq = time.perf_counter() - t
        t = time.perf_counter()
        q.dequantize(p)
        out[name] = {"quantize_vectors_per_s": n / tq, "dequantize_vectors_per_s": n / (time.perf_counter() - t)}
    return out


@torch.no_grad()
def decode_speed(model, prompt, make, n_tokens) -> float:
    """Decode tokens/s after the prompt: a 1-token generate (prefill) is timed and subtracted."""
    ids = prompt.reshape(1, -1)

    def run(n):
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids),
                  pad_token_id=0)
        t = time.perf_counter()
        model.generate(ids, past_key_values=make(), **kw)
        return time.perf_counter() - t

    return (n_tokens - 1) / (run(n_tokens) - run(1))


def fmt_table(header, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


VARIANTS = {"turboquant (plain)": ("turboquant", {"plain": True}),
            **{m: (m, {}) for m in METHODS},
            "turboquant + key basis": ("turboquant", {"key_basis": "calibrated"})}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    dist = [r for r in results["distortion"] if r["dim"] == 128]
    b = [r["bits"] for r in dist]
    ax = axes[0]
    ax.semilogy(b, [r["D_mse"] for r in dist], "o-", label="TurboQuant-MSE D_mse (d=128)")
    ax.semilogy(b, [r["D_mse_polarquant"] for r in dist], "s-", label="PolarQuant D_mse (d=128)")
    ax.semilogy(b, [r["d*D_prod"] for r in dist], "^-", label="TurboQuant-Prod d·D_prod (d=128)")
    ax.semilogy(b, [r["D_mse_lloyd_max_gauss"] for r in dist], "k:", label="Lloyd-Max, Gaussian")
    ax.semilogy(b, [r["lower_bound_4^-b"] for r in dist], "k--", label="lower bound 4^-b")
    ax.set_xlabel("bits per coordinate")
    ax.set_title("Distortion on unit vectors")
    ax.legend(fontsize=7)
    for ax, key, ylab, log in ((axes[1], "kl", "KL(full-precision cache || quantized)", True),
                               (axes[2], "greedy_match", "greedy agreement (128 tokens, 8 prompts)", False)):
        for v in VARIANTS:
            rows = [r for r in results["smollm2"] if r["variant"] == v and key in r]
            if rows:
                style = "--" if "plain" in v else "-"
                ax.plot([r["kv_bits_per_coordinate"] for r in rows], [r[key] for r in rows], "o" + style, label=v)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("stored KV bits per coordinate (codes + norms/scales)")
        ax.set_ylabel(ylab)
        ax.set_title(f"SmolLM2-135M, held-out {results.get('text', 'pydoc')} text")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--greedy-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8, help="greedy-decode prompts (one batch)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--speed-tokens", type=int, default=64)
    ap.add_argument("--vectors", type=int, default=8000)
    ap.add_argument("--basis-windows", type=int, default=4, help="calibration windows of the key basis")
    ap.add_argument("--text", default="python-docs", help="text source (falls back to the stdlib pydoc text)")
    ap.add_argument("--window", type=int, default=0, help="full-precision recent window of the caches")
    ap.add_argument("--quick", action="store_true", help="1 window of 256 tokens, 2 prompts, 32 greedy tokens")
    args = ap.parse_args()
    if args.quick:
        args.windows, args.seq_len, args.greedy_tokens, args.speed_tokens = 1, 256, 32, 16
        args.prompts, args.prompt_len, args.vectors, args.basis_windows = 2, 64, 2000, 1
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    results = {"args": vars(args)}

    def save():
        (OUT / "kv.json").write_text(json.dumps(results, indent=2))

    results["distortion"] = dist = distortion(args.vectors)
    print("\n## Distortion on unit vectors (TurboQuant-MSE, PolarQuant, TurboQuant-Prod)\n")
    print(fmt_table(
        ["d", "b", "D_mse", "Lloyd-Max(N)", "4^-b", "PolarQ D_mse", "d·D_prod", "paper", "slope MSE", "slope Prod"],
        [[r["dim"], r["bits"], f"{r['D_mse']:.4f}", r["D_mse_lloyd_max_gauss"], f"{r['lower_bound_4^-b']:.4f}",
          f"{r['D_mse_polarquant']:.4f}", f"{r['d*D_prod']:.3f}", r["d*D_prod_paper"],
          f"{r['ip_slope_mse']:.3f}", f"{r['ip_slope_prod']:.3f}"] for r in dist]))

    results["quantize_speed"] = qs = quantize_speed()
    save()
    print("\n## Quantize / dequantize throughput (d=64, 4 bits, CPU)\n")
    print(fmt_table(["method", "quantize vec/s", "dequantize vec/s"],
                    [[k, f"{v['quantize_vectors_per_s']:.3g}", f"{v['dequantize_vectors_per_s']:.3g}"]
                     for k, v in qs.items()]))

    from lowbit.calibration import eval_windows, load_text_or_pydoc
    from lowbit.kvcache.key_basis import basis_nbytes, calibrate_key_bases
    from lowbit.models import load_model

    model, tok = load_model("default")
    model.eval()
    cfg = model.config
    results["text"], split = load_text_or_pydoc(args.text)
    ids = eval_windows(tok, split.evaluation, seq_len=args.seq_len, max_windows=max(args.windows, args.prompts))
    prompts = ids[:args.prompts, :args.prompt_len]
    ids = ids[:args.windows]
    bases = calibrate_key_bases(model, eval_windows(tok, split.calibration, seq_len=args.seq_len,
                                                    max_windows=args.basis_windows))
    results["key_basis_bytes"] = basis_nbytes(bases)

    def factory(variant, bits, **extra):
        method, kw = VARIANTS[variant]
        kw = {**kw, **extra}
        if kw.get("key_basis") == "calibrated":
            kw["key_basis"] = bases
        return lambda: QuantizedKVCache(method, bits, cfg, window=args.window, **kw)

    keys = [(v, b) for v in VARIANTS for b in BITS]
    r = kv_eval(model, ids, {f"{v}@{b}": factory(v, b) for v, b in keys})
    rows = [{"variant": v, "method": VARIANTS[v][0], "bits": b, **r[f"{v}@{b}"]} for v, b in keys]
    results["smollm2"] = rows
    save()
    ref = None
    for row in tqdm(rows, desc="greedy decode"):
        # the decode buffer reads the same values as the packed cache (tests hold it to 1e-4), only faster
        g = greedy_agreement(model, prompts, factory(row["variant"], row["bits"], decode_buffer=True),
                             n_tokens=args.greedy_tokens, reference=ref)
        ref = g.pop("reference")
        row.update(g)
        save()  # partial results survive a long run
    print(f"\n## SmolLM2-135M, {ids.numel()} held-out {results['text']} tokens ({args.windows}x{args.seq_len}), "
          f"fp perplexity {rows[0]['perplexity_fp']:.3f}; greedy: {args.prompts} prompts x {args.prompt_len} "
          f"tokens, {args.greedy_tokens} tokens each\n")
    print(fmt_table(["variant", "bits", "KV bits/coord", "mem ratio", "ppl", "Δppl %", "KL", "top-1",
                     "greedy match", "mean prefix"],
                    [[x["variant"], x["bits"], f"{x['kv_bits_per_coordinate']:.3f}", f"{x['kv_memory_ratio']:.2f}x",
                      f"{x['perplexity']:.3f}", f"{x['perplexity_change_pct']:+.2f}", f"{x['kl']:.4f}",
                      f"{100 * x['top1_agreement']:.1f}%", f"{100 * x['greedy_match']:.1f}%",
                      f"{x['greedy_prefix']:.1f}"] for x in rows]))

    prompt = ids[0]
    fp = [decode_speed(model, prompt, lambda: DynamicCache(config=cfg), args.speed_tokens)]
    speed = {}
    for m in METHODS:
        speed[m] = {f"tokens_per_s_{mode}": decode_speed(
            model, prompt, lambda m=m, buf=buf: QuantizedKVCache(m, 4, cfg, decode_buffer=buf), args.speed_tokens)
            for mode, buf in (("packed", False), ("buffered", True))}
    fp.append(decode_speed(model, prompt, lambda: DynamicCache(config=cfg), args.speed_tokens))
    fp_tps = sum(fp) / len(fp)
    for m in METHODS:
        for mode in ("packed", "buffered"):
            speed[m][f"ratio_{mode}"] = speed[m][f"tokens_per_s_{mode}"] / fp_tps
    results["decode_speed"] = {"full_precision_tokens_per_s": fp_tps, "full_precision_runs": fp,
                               "prompt_tokens": prompt.numel(), "decoded_tokens": args.speed_tokens, **speed}
    print(f"\n## Decode speed after a {prompt.numel()}-token prompt, 4-bit caches vs DynamicCache "
          f"({fp_tps:.1f} tok/s)\n")
    print(fmt_table(["method", "packed tok/s", "ratio", "buffered tok/s", "ratio"],
                    [[m, f"{speed[m]['tokens_per_s_packed']:.1f}", f"{speed[m]['ratio_packed']:.2f}",
                      f"{speed[m]['tokens_per_s_buffered']:.1f}", f"{speed[m]['ratio_buffered']:.2f}"]
                     for m in METHODS]))
    save()
    try:
        plot(results, OUT / "kv.png")
        print(f"\nwrote {OUT / 'kv.json'} and {OUT / 'kv.png'}")
    except ImportError:
        print(f"\nwrote {OUT / 'kv.json'} (matplotlib missing: no plot)")


if __name__ == "__main__":
    main()
