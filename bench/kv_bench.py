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
            "turboquant + key basis": ("turboquant", {"key_basis": "calibrated"}),
            "turboquant + key basis, 8-bit norms": ("turboquant", {"key_basis": "calibrated", "norm_bits": 8})}
#: variant -> nominal bits evaluated (the default set; --all-methods adds prod / polarquant / qjl)
GRID = {"turboquant (plain)": [2.5, 3.5], "kivi": [2, 3, 4], "turboquant + key basis": [2.5, 3.5],
        "turboquant + key basis, 8-bit norms": [2, 2.125, 2.5, 3, 3.25, 3.5, 4, 4.125]}
#: --small-grid: the rows that decide the targets and the matched comparison (slow machines, larger models)
GRID_SMALL = {"kivi": [2, 4], "turboquant + key basis, 8-bit norms": [2.125, 3.25, 3.5, 4.125]}
MODELS = {"default": "smollm2-135m", "gemma3-270m": "gemma3-270m"}
#: (restated issue-16 targets) model -> {stored bits/coordinate: max Δperplexity %}
TARGETS = {"smollm2-135m": {3.5: 1.0, 2.5: 5.0}, "gemma3-270m": {3.5: 0.5, 2.5: 2.0}}


def best_at(rows, bits, key="kl"):
    """The lowbit row with the lowest ``key`` among those storing <= ``bits`` bits/coordinate."""
    ok = [r for r in rows if r["kv_bits_per_coordinate"] <= bits + 1e-9 and r.get("peer") is None]
    return min(ok, key=lambda r: r[key]) if ok else None


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results.get("models", {})
    fig, axes = plt.subplots(1, 1 + len(models), figsize=(6 * (1 + len(models)), 4.4))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    dist = [r for r in results.get("distortion", []) if r["dim"] == 128]
    ax = axes[0]
    if dist:
        b = [r["bits"] for r in dist]
        ax.semilogy(b, [r["D_mse"] for r in dist], "o-", label="TurboQuant-MSE D_mse (d=128)")
        ax.semilogy(b, [r["D_mse_polarquant"] for r in dist], "s-", label="PolarQuant D_mse (d=128)")
        ax.semilogy(b, [r["d*D_prod"] for r in dist], "^-", label="TurboQuant-Prod d·D_prod (d=128)")
        ax.semilogy(b, [r["D_mse_lloyd_max_gauss"] for r in dist], "k:", label="Lloyd-Max, Gaussian")
        ax.semilogy(b, [r["lower_bound_4^-b"] for r in dist], "k--", label="lower bound 4^-b")
        ax.set_xlabel("bits per coordinate")
        ax.set_title("Distortion on unit vectors")
        ax.legend(fontsize=7)
    for ax, (label, res) in zip(axes[1:], models.items()):
        rows = res.get("quality", [])
        for v in dict.fromkeys(r["variant"] for r in rows):
            rr = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["kv_bits_per_coordinate"])
            style = "s--" if rr[0].get("peer") else "o-"
            ax.plot([r["kv_bits_per_coordinate"] for r in rr], [r["kl"] for r in rr], style, label=v)
        ax.set_yscale("log")
        ax.set_xlabel("stored KV bits per coordinate (codes + norms/scales + fp tokens)")
        ax.set_ylabel("KL(full-precision cache || quantized)")
        ax.set_title(f"{label}, held-out {results.get('text', 'pydoc')} text")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def fmt_quality(rows):
    return fmt_table(["variant", "bits", "KV bits/coord", "mem ratio", "ppl", "Δppl %", "KL", "top-1"],
                     [[x["variant"], x["bits"], f"{x['kv_bits_per_coordinate']:.3f}", f"{x['kv_memory_ratio']:.2f}x",
                       f"{x['perplexity']:.3f}", f"{x['perplexity_change_pct']:+.2f}", f"{x['kl']:.4f}",
                       f"{100 * x['top1_agreement']:.1f}%"] for x in rows])


def compare_matched(rows, label):
    """Each peer / KIVI row against the best lowbit TurboQuant row storing no more bits; the restated targets."""
    ours = [r for r in rows if r["method"] == "turboquant" and not r.get("peer")]
    out = []
    for p in rows:
        if not (p.get("peer") or p["method"] == "kivi"):
            continue
        b = best_at(ours, p["kv_bits_per_coordinate"])
        if b is None:
            continue
        out.append({"peer": p["variant"], "peer_bits": p["bits"], "peer_stored_bits": p["kv_bits_per_coordinate"],
                    "peer_kl": p["kl"], "peer_dppl": p["perplexity_change_pct"], "lowbit": f"{b['variant']}@{b['bits']}",
                    "lowbit_stored_bits": b["kv_bits_per_coordinate"], "lowbit_kl": b["kl"],
                    "lowbit_dppl": b["perplexity_change_pct"], "kl_ratio_peer_over_lowbit": p["kl"] / b["kl"],
                    "lowbit_better": b["kl"] < p["kl"] and b["perplexity_change_pct"] < p["perplexity_change_pct"]})
    targets = []
    for bits, limit in TARGETS.get(label, {}).items():
        b = best_at(ours, bits, "perplexity_change_pct")
        nominal = [r for r in ours if r["bits"] == bits and r["variant"] == "turboquant + key basis, 8-bit norms"]
        targets.append({"stored_bits": bits, "max_dppl_pct": limit,
                        "best_within_bits": None if b is None else f"{b['variant']}@{b['bits']}",
                        "best_dppl": None if b is None else b["perplexity_change_pct"],
                        "met_at_stored_bits": b is not None and b["perplexity_change_pct"] <= limit,
                        "nominal_dppl": nominal[0]["perplexity_change_pct"] if nominal else None,
                        "nominal_stored_bits": nominal[0]["kv_bits_per_coordinate"] if nominal else None,
                        "met_at_nominal_bits": bool(nominal) and nominal[0]["perplexity_change_pct"] <= limit})
    return out, targets


def attn_speed_section(args, results, save) -> None:
    """One layer's batch-1 decode attention at each --speed-ctx, once per --attn-threads count (kv_longctx)."""
    from kv_longctx import attention_speed

    runs = results.setdefault("attention_speed", {})
    if isinstance(runs, list):  # the first layout: one list of rows
        runs = results["attention_speed"] = {}
    for th in [int(t) for t in args.attn_threads.split(",")]:
        torch.set_num_threads(th)
        rows = attention_speed([int(c) for c in args.speed_ctx.split(",")], reps=args.attn_reps)
        runs[f"threads={th}"] = rows
        save()
        print(f"\n## One layer's decode attention (SmolLM2 shape: 9 query / 3 kv heads, d=64), {th} thread(s), medians\n")
        print(fmt_table(["context", "contender", "ms", "speed vs fastest fp", "memory vs fastest fp", "memory vs fp32",
                         "rel. error vs fp32"],
                        [[r["context"], r["contender"], f"{r['ms']:.3f}", f"{r['speed_vs_fastest_fp']:.2f}x",
                          f"{r['memory_vs_fastest_fp']:.3f}", f"{r['memory_vs_fp32']:.3f}",
                          f"{r['output_rel_error_vs_fp32']:.4f}"] for r in rows]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default", choices=sorted(MODELS), help="bundled model to run")
    ap.add_argument("--sections", default="quality,peers,greedy,niah",
                    help="comma list of distortion, quality, peers, greedy, niah, speed")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--greedy-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4, help="greedy-decode prompts (one batch)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--peer-windows", type=int, default=2, help="windows of the token-by-token peer evaluation")
    ap.add_argument("--peer-seq-len", type=int, default=256, help="tokens of each token-by-token window")
    ap.add_argument("--residual", type=int, default=32, help="QuantizedCache residual_length (fp tokens, counted)")
    ap.add_argument("--long-ctx", type=int, default=4096, help="needle-in-a-haystack context (tokens)")
    ap.add_argument("--speed-ctx", default="1024,4096,8192")
    ap.add_argument("--speed-tokens", type=int, default=16)
    ap.add_argument("--attn-threads", default="1", help="attn-speed: comma list of torch thread counts")
    ap.add_argument("--attn-reps", type=int, default=15, help="attn-speed: timed calls per contender")
    ap.add_argument("--vectors", type=int, default=8000)
    ap.add_argument("--basis-windows", type=int, default=4, help="calibration windows of the key basis")
    ap.add_argument("--text", default="python-docs", help="text source (falls back to the stdlib pydoc text)")
    ap.add_argument("--window", type=int, default=0, help="full-precision recent window of the caches")
    ap.add_argument("--small-grid", action="store_true", help="only the rows of GRID_SMALL")
    ap.add_argument("--all-methods", action="store_true", help="also turboquant-prod, polarquant, qjl")
    ap.add_argument("--quick", action="store_true", help="1 window of 256 tokens, small greedy / needle runs")
    args = ap.parse_args()
    if args.quick:
        args.windows, args.seq_len, args.greedy_tokens, args.speed_tokens = 1, 256, 16, 4
        args.prompts, args.prompt_len, args.vectors, args.basis_windows = 2, 64, 2000, 1
        args.peer_windows, args.long_ctx, args.speed_ctx = 1, 512, "256"
    sections = set(args.sections.split(","))
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "kv.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.setdefault("models", {})
    results.pop("smollm2", None)  # the first round's layout
    label = MODELS[args.model]
    res = results["models"].setdefault(label, {})
    res["args"] = vars(args)

    def save():
        path.write_text(json.dumps(results, indent=2))

    if "distortion" in sections:
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
    if "attn-speed" in sections and not sections & {"quality", "peers", "greedy", "niah", "speed"}:
        return attn_speed_section(args, results, save)
    if not sections & {"quality", "peers", "greedy", "niah", "speed"}:
        return save()

    from lowbit.calibration import eval_windows, load_text_or_pydoc
    from lowbit.kvcache.key_basis import basis_nbytes, calibrate_key_bases
    from lowbit.models import load_model

    model, tok = load_model(args.model)
    model.eval()
    cfg = model.config
    results["text"], split = load_text_or_pydoc(args.text)
    ids = eval_windows(tok, split.evaluation, seq_len=args.seq_len, max_windows=max(args.windows, args.prompts))
    prompts = ids[:args.prompts, :args.prompt_len]
    ids = ids[:args.windows]
    bases = calibrate_key_bases(model, eval_windows(tok, split.calibration, seq_len=args.seq_len,
                                                    max_windows=args.basis_windows))
    res["key_basis_bytes"] = basis_nbytes(bases)
    text_cfg = cfg.get_text_config(decoder=True)
    res["head_dim"] = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads

    def factory(variant, bits, **extra):
        method, kw = VARIANTS[variant]
        kw = {**kw, **extra}
        if kw.get("key_basis") == "calibrated":
            kw["key_basis"] = bases
        return lambda: QuantizedKVCache(method, bits, cfg, window=args.window, **kw)

    grid = dict(GRID_SMALL if args.small_grid else GRID)
    if args.all_methods:
        grid.update({m: BITS for m in ("turboquant-prod", "polarquant", "qjl")})
    if "quality" in sections:
        keys = [(v, b) for v, bs in grid.items() for b in bs]
        r = kv_eval(model, ids, {f"{v}@{b}": factory(v, b) for v, b in keys})
        res["quality"] = [{"variant": v, "method": VARIANTS[v][0], "bits": b, **r[f"{v}@{b}"]} for v, b in keys]
        save()
    if "peers" in sections:
        from kv_peers import available, peer_factory, stepwise_eval

        peers = {f"transformers QuantizedCache {be} (residual {args.residual})@{nb}": (be, nb)
                 for be in ("quanto", "hqq") if available(be) for nb in (2, 4)}
        res["peers_missing"] = [be for be in ("quanto", "hqq") if not available(be)]
        pw = ids[:args.peer_windows, :args.peer_seq_len]
        lowbit_pick = {f"{v}@{b}": factory(v, b) for v, b in
                       (("turboquant + key basis, 8-bit norms", 2.25), ("turboquant + key basis, 8-bit norms", 4.125))}
        with tqdm(total=len(pw) * (len(peers) + len(lowbit_pick)), desc="token-by-token eval") as bar:
            st = stepwise_eval(model, pw, {**{k: peer_factory(be, nb, cfg, residual_length=args.residual)
                                              for k, (be, nb) in peers.items()}, **lowbit_pick}, bar)
        rows = []
        for k, v in st.items():
            name, bits = k.rsplit("@", 1)
            rows.append({"variant": name + " [token by token]", "method": "peer" if k in peers else "turboquant",
                         "bits": float(bits), "peer": k in peers, "windows": len(pw), **v})
        res["quality"] = [r for r in res.get("quality", []) if "[token by token]" not in r["variant"]] + rows
        save()
    if "quality" in sections or "peers" in sections:
        rows = res.get("quality", [])
        res["matched"], res["targets"] = compare_matched(rows, label)
        save()
        print(f"\n## {label} (head_dim {res['head_dim']}), {ids.numel()} held-out {results['text']} tokens "
              f"({args.windows}x{args.seq_len}; token-by-token rows: {args.peer_windows} windows), "
              f"fp perplexity {rows[0]['perplexity_fp']:.3f}\n")
        print(fmt_quality(rows))
        print("\n## At matched stored bits: each peer / KIVI row vs the best lowbit TurboQuant row storing no more\n")
        print(fmt_table(["peer", "bits", "stored", "KL", "Δppl %", "lowbit", "stored", "KL", "Δppl %", "KL ratio", "better"],
                        [[m["peer"], m["peer_bits"], f"{m['peer_stored_bits']:.3f}", f"{m['peer_kl']:.4f}",
                          f"{m['peer_dppl']:+.2f}", m["lowbit"], f"{m['lowbit_stored_bits']:.3f}", f"{m['lowbit_kl']:.4f}",
                          f"{m['lowbit_dppl']:+.2f}", f"{m['kl_ratio_peer_over_lowbit']:.2f}x", m["lowbit_better"]]
                         for m in res["matched"]]))
        print("\n## Restated targets\n")
        for t in res["targets"]:
            print(t)
    if "greedy" in sections:
        from kv_peers import peer_factory

        picks = {"turboquant + key basis, 8-bit norms@2.25": factory("turboquant + key basis, 8-bit norms", 2.25,
                                                                     decode_buffer=True),
                 "turboquant + key basis, 8-bit norms@3.25": factory("turboquant + key basis, 8-bit norms", 3.25,
                                                                     decode_buffer=True),
                 "kivi@2": factory("kivi", 2, decode_buffer=True), "kivi@4": factory("kivi", 4, decode_buffer=True)}
        for be in ("quanto", "hqq"):
            for nb in (2, 4):
                picks[f"QuantizedCache {be}@{nb}"] = peer_factory(be, nb, cfg, residual_length=args.residual)
        ref, res["greedy"] = None, {}
        for k, make in tqdm(picks.items(), desc="greedy decode"):
            try:
                g = greedy_agreement(model, prompts, make, n_tokens=args.greedy_tokens, reference=ref)
            except Exception as e:  # a peer that cannot generate on this model
                res["greedy"][k] = {"error": f"{type(e).__name__}: {e}"[:200]}
                continue
            ref = g.pop("reference")
            res["greedy"][k] = g
            save()
        print(f"\n## Greedy agreement ({args.prompts} prompts x {args.prompt_len} tokens, {args.greedy_tokens} decoded)\n")
        for k, g in res["greedy"].items():
            print(f"{k:50s} {g}")
    if "niah" in sections:
        from kv_longctx import needle_runs

        caches = {"fp (DynamicCache)": lambda: DynamicCache(config=cfg),
                  "turboquant + key basis, 8-bit norms@3.25": factory("turboquant + key basis, 8-bit norms", 3.25),
                  "turboquant + key basis, 8-bit norms@2.25": factory("turboquant + key basis, 8-bit norms", 2.25)}
        res["niah"] = needle_runs(model, tok, split.evaluation, caches, args.long_ctx)
        save()
        print(f"\n## Needle in a haystack + greedy agreement at {args.long_ctx} tokens\n")
        for row in res["niah"]:
            print(row)
    if "attn-speed" in sections:
        attn_speed_section(args, results, save)
    if "speed" in sections:
        from kv_longctx import speed_runs

        res["speed"] = speed_runs(model, cfg, [int(c) for c in args.speed_ctx.split(",")], args.speed_tokens,
                                  bases=bases, residual=args.residual)
        save()
        print("\n## Decode speed (batch 1), tokens/s and ratio to the fastest full-precision cache\n")
        for row in res["speed"]:
            print(row)
    save()
    try:
        plot(results, OUT / "kv.png")
        print(f"\nwrote {OUT / 'kv.json'} and {OUT / 'kv.png'}")
    except ImportError:
        print(f"\nwrote {OUT / 'kv.json'} (matplotlib missing: no plot)")


if __name__ == "__main__":
    main()
