"""Calibrated methods on SmolLM2-135M: RTN, HQQ, GPTQ, AWQ, AWQ+GPTQ beside fp32, plus GPTQ cost.

    .venv/bin/python bench/methods.py                      # everything (slow: 20 quantizations)
    .venv/bin/python bench/methods.py --settings "W4 g64 sym,W3 g64 asym" --methods rtn,gptq
    .venv/bin/python bench/methods.py --timing-only        # GPTQ wall time and peak RSS alone

Calibration: 64 random 512-token windows of the stdlib pydoc text (calibration split).
Evaluation: held-out Debian python3.11-doc sources (else the held-out pydoc split), `--windows`
windows of 512 tokens; perplexity, KL to fp32 and top-1 agreement. Results are merged into
bench/results/methods.json (one row per setting x method), so settings can be run separately.

The timing runs are fresh processes (peak RSS = ru_maxrss of that process), default and
`--low-memory` (`lowbit quantize --low-memory`): load the model lazily as `lowbit quantize` does,
tokenize the calibration text, GPTQ W4 g64 sym over all decoder Linears with packed swap, no evaluation.
W4 g32 asym is not benchmarked: the model's weights came from a Q4_1 GGUF, so it is lossless.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from lowbit.methods import get_method
from lowbit.calibration import calibration_batches, eval_windows, load_text, load_text_or_pydoc
from lowbit.models import load_model
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe
from lowbit.runtime import configure
from lowbit.spec import QuantSpec

SETTINGS = {
    "W4 g64 sym": QuantSpec(bits=4, group_size=64),
    "W4 g64 asym": QuantSpec(bits=4, group_size=64, symmetric=False),
    "W3 g64 asym": QuantSpec(bits=3, group_size=64, symmetric=False),
    "W2 g64 asym": QuantSpec(bits=2, group_size=64, symmetric=False),
}
METHODS = ("rtn", "hqq", "gptq", "awq", "awq+gptq")
OUT = Path(__file__).parent / "results" / "methods.json"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timing(samples: int, seq_len: int, method: str, low_memory: bool = False) -> dict:
    configure(low_memory=low_memory)  # the process settings `lowbit quantize` makes
    t0 = time.perf_counter()
    model, tok = load_model("default", lazy=True)  # as `lowbit quantize` does
    calib = calibration_batches(tok, load_text("pydoc").calibration, samples, seq_len)
    t1 = time.perf_counter()
    quantize_model(model, Recipe(SETTINGS["W4 g64 sym"], method=method), get_method(method), calib,
                   progress=True, swap=True)
    t2 = time.perf_counter()
    return {"method": method, "samples": samples, "seq_len": seq_len, "threads": torch.get_num_threads(),
            "low_memory": low_memory,
            "quantize_s": t2 - t1, "total_s": t2 - t0, "peak_rss_mib": _rss_mib()}


@torch.no_grad()
def _reference(model, windows) -> tuple[list[torch.Tensor], dict]:
    ref, nll, n = [], 0.0, 0
    for ids in windows:
        lp = torch.log_softmax(model(input_ids=ids[None], use_cache=False).logits.float()[0, :-1], -1)
        nll -= float(lp.gather(-1, ids[1:, None]).sum())
        n += ids.numel() - 1
        ref.append(lp)
    return ref, {"perplexity": math.exp(nll / n), "kl": 0.0, "top1_agreement": 1.0, "eval_tokens": n}


@torch.no_grad()
def _quality(ref, model, windows) -> dict:
    """Perplexity, mean per-token KL(fp32 || quantized) and top-1 agreement (as lowbit.eval.quality)."""
    nll = kl = 0.0
    top1 = n = 0
    for lp_ref, ids in zip(ref, windows):
        lp = torch.log_softmax(model(input_ids=ids[None], use_cache=False).logits.float()[0, :-1], -1)
        nll -= float(lp.gather(-1, ids[1:, None]).sum())
        kl += float((lp_ref.exp() * (lp_ref - lp)).sum())
        top1 += int((lp_ref.argmax(-1) == lp.argmax(-1)).sum())
        n += ids.numel() - 1
    return {"perplexity": math.exp(nll / n), "kl": kl / n, "top1_agreement": top1 / n, "eval_tokens": n}


def _load_results() -> dict:
    if OUT.is_file():
        return json.loads(OUT.read_text())
    return {"rows": {}}


def _save(res: dict) -> None:
    """Merge into the stored file (re-read first, so concurrent runs on other settings keep their rows)."""
    OUT.parent.mkdir(exist_ok=True)
    stored = _load_results()
    stored.update({k: v for k, v in res.items() if k != "rows"})
    stored["rows"].update(res.get("rows", {}))
    tmp = OUT.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(stored, indent=2))
    tmp.replace(OUT)


def print_table(res: dict) -> None:
    rows = res["rows"]
    fp = res.get("fp32")
    if not fp:
        return
    print(f"SmolLM2-135M-Instruct; calibration {res.get('calibration')}; eval {res.get('eval')}")
    print("| setting | method | ppl | Δppl vs fp32 | Δppl / RTN's | KL | top-1 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print(f"| fp32 | - | {fp['perplexity']:.3f} | - | - | 0 | 1.000 |")
    for setting in SETTINGS:
        rtn = rows.get(f"{setting}|rtn")
        for m in METHODS:
            r = rows.get(f"{setting}|{m}")
            if r is None:
                continue
            d = r["perplexity"] - fp["perplexity"]
            ratio = f"{d / (rtn['perplexity'] - fp['perplexity']):.2f}" if rtn else "-"
            top1 = f"{r['top1_agreement']:.3f}" if r.get('top1_agreement') is not None else '-'
            print(f"| {setting} | {m} | {r['perplexity']:.3f} | {100 * d / fp['perplexity']:+.2f}% | {ratio} | "
                  f"{r['kl']:.4f} | {top1} |")
    for key in ("timing", "timing_low_memory"):
        if key in res:
            t = res[key]
            print(f"\nGPTQ W4 g64 sym, {t['samples']}x{t['seq_len']} calibration, {t['threads']} threads"
                  f"{', --low-memory' if t.get('low_memory') else ''}: quantize {t['quantize_s']:.1f} s "
                  f"(process total {t['total_s']:.1f} s), peak RSS {t['peak_rss_mib']:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--text", default="python-docs")
    ap.add_argument("--timing", action="store_true", help="also run the GPTQ timing in a fresh process")
    ap.add_argument("--timing-only", action="store_true")
    ap.add_argument("--timing-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--low-memory", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--print", action="store_true", help="print the stored table and exit")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.timing_child:
        print(json.dumps(timing(args.samples, args.seq_len, "gptq", args.low_memory)))
        return
    res = _load_results()
    if args.print:
        print_table(res)
        return
    if args.timing or args.timing_only:
        for key, extra in (("timing", []), ("timing_low_memory", ["--low-memory"])):  # each a fresh process
            out = subprocess.run([sys.executable, __file__, "--timing-child", "--samples", str(args.samples),
                                  "--seq-len", str(args.seq_len), *extra], check=True, capture_output=True, text=True)
            res[key] = json.loads(out.stdout.strip().splitlines()[-1])
        _save(res)
        if args.timing_only:
            print_table(res)
            return

    text, split = load_text_or_pydoc(args.text)
    original, tok = load_model("default")
    windows = eval_windows(tok, split.evaluation, args.seq_len, args.windows)
    calib = calibration_batches(tok, load_text("pydoc").calibration, args.samples, args.seq_len)
    ref, orig = _reference(original, windows)  # fp32 log-probs once, reused for every method
    res["calibration"] = f"pydoc {args.samples}x{args.seq_len}"
    res["eval"] = f"{text} held-out, {windows.numel()} tokens"
    for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
        spec = SETTINGS[setting]
        for m in [m.strip() for m in args.methods.split(",") if m.strip()]:
            model, _ = load_model("default")
            t = time.perf_counter()
            quantize_model(model, Recipe(spec, method=m), get_method(m), calib, progress=True, swap=False)
            elapsed = time.perf_counter() - t
            r = _quality(ref, model, windows)
            res["fp32"] = orig
            res["rows"][f"{setting}|{m}"] = {**r, "quantize_s": elapsed, "calibration": res["calibration"]}
            results = {m: r}
            _save(res)  # one row at a time: a long run can be stopped and resumed by setting/method
            print(f"{setting} {m}: quantized in {elapsed:.1f} s, ppl {results[m]['perplexity']:.3f} "
                  f"(fp32 {orig['perplexity']:.3f}), KL {results[m]['kl']:.4f}", file=sys.stderr, flush=True)
            del model
    print_table(res)


if __name__ == "__main__":
    main()
