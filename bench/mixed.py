"""Mixed precision (lowbit plan) against uniform GPTQ at matched bits per weight, SmolLM2-135M.

    OMP_NUM_THREADS=1 .venv/bin/python bench/mixed.py     # targets 2.5,3.0,3.5,4.0,4.5 (resumes by row)
    .venv/bin/python bench/mixed.py --targets 3.0,3.5
    .venv/bin/python bench/mixed.py --print               # the stored table (and the plot again)

A mixed row is rerun when the plan at its target changed (e.g. a measurement gained the grouped
sensitivity probe); the row it replaces is kept under "superseded" in the results.

The measurement is `lowbit plan`'s (cached: GPTQ at every option of bits {2,3,4,5,6,8} x group
{32,64,128,channel}, 32 x 512 pydoc calibration tokens, sensitivities from 2 x 128 calibration
tokens). For each target t the mixed plan gets floor(t x parameters) bits; the uniform baselines
are every single option whose whole-model bits per weight lie within 0.05 of t (so a uniform
baseline may hold slightly MORE bits than the mixed plan, never fewer than t - 0.05), and the
mixed plan is compared with the best of them. Both are GPTQ with the same options and the same
calibration (--samples x 512 pydoc tokens); evaluation: held-out Debian python3.11-doc text,
--windows x 512 tokens (bench/methods.py's helpers). Bits per weight count the decoder Linears'
packed codes, scales and zeros as lowbit stores them. Results: bench/results/mixed.json, plot:
bench/results/mixed.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from methods import _quality, _reference  # noqa: E402  (bench/methods.py: the same eval as the README table)

from lowbit.calibration import calibration_batches, eval_windows, load_text, load_text_or_pydoc  # noqa: E402
from lowbit.methods import get_method  # noqa: E402
from lowbit.mixed.allocate import allocate, measurement_layers  # noqa: E402
from lowbit.mixed.apply import measure_source, plan_recipe  # noqa: E402
from lowbit.mixed.measure import storage_bits  # noqa: E402
from lowbit.models import load_model  # noqa: E402
from lowbit.pipeline import quantize_model  # noqa: E402
from lowbit.recipe import Recipe  # noqa: E402

OUT = Path(__file__).parent / "results" / "mixed.json"
PNG = OUT.with_suffix(".png")
TARGETS = (2.5, 3.0, 3.5, 4.0, 4.5)
WINDOW = 0.05


def _load() -> dict:
    return json.loads(OUT.read_text()) if OUT.is_file() else {"rows": {}}


def _save(res: dict) -> None:
    OUT.parent.mkdir(exist_ok=True)
    tmp = OUT.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(res, indent=2, sort_keys=True))
    tmp.replace(OUT)


def uniform_bpw(meas) -> dict[str, float]:
    """Each option's whole-model bits per weight when every layer takes it."""
    out = {}
    for opt in meas.options:
        if all(opt in layer["bits"] for layer in meas.layers.values()):
            out[opt] = sum(layer["bits"][opt] for layer in meas.layers.values()) / meas.params
    return out


def run(recipe: Recipe, calib, ref, windows) -> dict:
    model, _ = load_model("default")
    t = time.perf_counter()
    records = quantize_model(model, recipe, get_method("gptq"), calib, progress=True, swap=False)
    seconds = time.perf_counter() - t
    bits = sum(storage_bits(n, qw) for n, qw in records.items())
    params = sum(qw.codes.numel() for qw in records.values())
    return {**_quality(ref, model, windows), "bpw": bits / params, "quantize_s": round(seconds, 1)}


def summary(res: dict) -> list[dict]:
    fp = res["fp32"]["perplexity"]
    rows = []
    for t in res.get("targets", []):
        key = f"{t:.2f}"
        mixed = res["rows"].get(f"mixed|{key}")
        unis = [(o, res["rows"][f"uniform|{o}"]) for o in res["uniform_for"].get(key, [])
                if f"uniform|{o}" in res["rows"]]
        if mixed is None or not unis:
            continue
        o, best = min(unis, key=lambda u: u[1]["perplexity"])
        cut = 1 - (mixed["perplexity"] - fp) / (best["perplexity"] - fp)
        rows.append({"target": t, "mixed_bpw": mixed["bpw"], "mixed_ppl": mixed["perplexity"],
                     "mixed_kl": mixed["kl"], "uniform": o, "uniform_bpw": best["bpw"],
                     "uniform_ppl": best["perplexity"], "uniform_kl": best["kl"], "increase_cut": cut,
                     "beats": mixed["perplexity"] < best["perplexity"]})
    return rows


def print_table(res: dict) -> None:
    fp = res["fp32"]["perplexity"]
    print(f"SmolLM2-135M-Instruct; fp32 perplexity {fp:.3f}; eval {res['eval']}; calibration {res['calibration']}")
    print("| target bpw | uniform GPTQ (best within ±0.05) | bpw | ppl | KL | mixed bpw | mixed ppl | mixed KL "
          "| Δppl cut |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in summary(res):
        print(f"| {r['target']:.1f} | {r['uniform']} | {r['uniform_bpw']:.3f} | {r['uniform_ppl']:.3f} | "
              f"{r['uniform_kl']:.4f} | {r['mixed_bpw']:.3f} | **{r['mixed_ppl']:.3f}** | {r['mixed_kl']:.4f} | "
              f"{100 * r['increase_cut']:.0f}% |")


def plot(res: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    uni = sorted((r["bpw"], r["perplexity"], k.split("|")[1]) for k, r in res["rows"].items()
                 if k.startswith("uniform|"))
    mix = sorted((r["bpw"], r["perplexity"]) for k, r in res["rows"].items() if k.startswith("mixed|"))
    ax.scatter([u[0] for u in uni], [u[1] for u in uni], color="tab:blue", label="uniform GPTQ", zorder=2)
    for b, p, name in uni:
        ax.annotate(name, (b, p), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.plot([m[0] for m in mix], [m[1] for m in mix], "o-", color="tab:red", label="mixed (lowbit plan)")
    ax.axhline(res["fp32"]["perplexity"], color="gray", linestyle="--", linewidth=1, label="fp32")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (decoder Linears: codes + scales + zeros)")
    ax.set_ylabel("perplexity, held-out python docs")
    ax.set_title("SmolLM2-135M: mixed precision vs uniform GPTQ")
    ax.legend()
    fig.savefig(PNG, format="png", metadata={"Software": None})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--print", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    res = _load()
    if args.print:
        print_table(res)
        plot(res)
        return
    meas = measure_source("default")
    layers = measurement_layers(meas)
    ubpw = uniform_bpw(meas)
    text, split = load_text_or_pydoc("python-docs")
    original, tok = load_model("default")
    windows = eval_windows(tok, split.evaluation, 512, args.windows)
    calib = calibration_batches(tok, load_text("pydoc").calibration, args.samples, 512)
    ref, orig = _reference(original, windows)
    del original
    res.update(fp32=orig, eval=f"{text} held-out, {windows.numel()} tokens", calibration=f"pydoc {args.samples}x512",
               measurement={"key": meas.key, "seconds": meas.meta.get("seconds"), **meas.meta})
    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    res["targets"] = sorted(set(res.get("targets", [])) | set(targets))
    res.setdefault("uniform_for", {})
    for t in targets:
        key = f"{t:.2f}"
        plan = allocate(layers, t)
        mkey = f"mixed|{key}"
        digest = hashlib.sha256(json.dumps(plan.choices, sort_keys=True).encode()).hexdigest()[:16]
        counts = dict(sorted(__import__("collections").Counter(plan.choices.values()).items()))
        if mkey in res["rows"] and "plan" not in res["rows"][mkey] and res["rows"][mkey].get("choices") == counts:
            res["rows"][mkey]["plan"] = digest  # a row from before the digest: the same option counts
        if mkey in res["rows"] and res["rows"][mkey].get("plan") != digest:  # another plan: keep the old row aside
            res.setdefault("superseded", {}).setdefault(mkey, []).append(res["rows"].pop(mkey))
        if mkey not in res["rows"]:
            r = run(plan_recipe(plan, meas), calib, ref, windows)
            res["rows"][mkey] = {**r, "predicted_kl": plan.cost, "gap": plan.gap, "plan": digest,
                                 "choices": dict(sorted(__import__("collections").Counter(plan.choices.values()).items()))}
            _save(res)
            print(f"mixed {t}: bpw {r['bpw']:.4f} ppl {r['perplexity']:.3f} KL {r['kl']:.4f} "
                  f"(predicted {plan.cost:.4f})", file=sys.stderr, flush=True)
        res["uniform_for"][key] = [o for o, b in sorted(ubpw.items(), key=lambda x: -x[1]) if abs(b - t) <= WINDOW]
        for o in res["uniform_for"][key]:
            ukey = f"uniform|{o}"
            if ukey in res["rows"]:
                continue
            r = run(Recipe(meas.options[o], method="gptq"), calib, ref, windows)
            res["rows"][ukey] = r
            _save(res)
            print(f"uniform {o}: bpw {r['bpw']:.4f} ppl {r['perplexity']:.3f} KL {r['kl']:.4f}", file=sys.stderr,
                  flush=True)
    res["summary"] = summary(res)
    _save(res)
    print_table(res)
    plot(res)


if __name__ == "__main__":
    main()
