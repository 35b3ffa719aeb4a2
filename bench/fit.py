"""`lowbit fit` on SmolLM2-135M at context 8192: predicted vs measured perplexity and memory.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fit.py                       # budgets 250MB,300MB (resumes by row)
    .venv/bin/python bench/fit.py --budgets 250MB --long-windows 1
    .venv/bin/python bench/fit.py --print

For each budget: the choice `lowbit fit default --memory B --context 8192` makes (the weights
measurement is `lowbit plan`'s, cached; the KV options are measured on 2 x 512 calibration tokens,
cached), then GPTQ with the plan (32 x 512 pydoc calibration tokens, as bench/mixed.py) and:
- held-out python-docs text, 16 x 512-token windows, against the full-precision model with a
  full-precision cache: quantized weights + fp cache, fp weights + the chosen cache, and both
  (the plan as it runs) -> perplexity, KL; does KL add up?
- long context: --long-windows windows of 8192 held-out tokens, fed in chunks of 512 through the
  cache (a chunked prefill, so each chunk attends to everything before it, up to 8192 tokens of
  cache): perplexity of the full-precision model + cache and of the plan with its cache;
- memory: in a fresh process, the saved checkpoint loaded and 8192 tokens prefilled (chunks of 512)
  and 8 decoded with the chosen cache: RSS over the RSS after importing every module loading uses
  (as bench/kernels.py --memory; the tokenizer, ~17 MiB, is loaded with the checkpoint): after
  loading, after the prefill, the peak while decoding; against the prediction.
Results: bench/results/fit.json; checkpoints in $TMPDIR/lowbit-fit-bench/BUDGET (reused on --redo).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results" / "fit.json"
CONTEXT = 8192
CHUNK = 512
CKPTS = Path(tempfile.gettempdir()) / "lowbit-fit-bench"  # the fitted checkpoints (reused by a rerun)


def _load() -> dict:
    return json.loads(OUT.read_text()) if OUT.is_file() else {"rows": {}}


def _save(res: dict) -> None:
    OUT.parent.mkdir(exist_ok=True)
    tmp = OUT.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(res, indent=2, sort_keys=True))
    tmp.replace(OUT)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@torch.no_grad()
def long_eval(model, ref_model, ids: torch.Tensor, make_cache, make_ref_cache) -> dict:
    """Perplexity / KL over [n, L] windows fed CHUNK tokens at a time through each model's cache."""
    nll = nll_ref = kl = 0.0
    n = 0
    for w in ids:
        cache, ref_cache = make_cache(), make_ref_cache()
        for s in range(0, w.numel() - 1, CHUNK):
            x = w[None, s:s + CHUNK]
            y = w[s + 1:s + CHUNK + 1]
            lp = model(x, past_key_values=cache, use_cache=True).logits[0, :y.numel()].float().log_softmax(-1)
            rp = ref_model(x, past_key_values=ref_cache, use_cache=True).logits[0, :y.numel()].float().log_softmax(-1)
            nll -= float(lp.gather(-1, y[:, None]).sum())
            nll_ref -= float(rp.gather(-1, y[:, None]).sum())
            kl += float((rp.exp() * (rp - lp)).sum())
            n += y.numel()
    return {"perplexity": math.exp(nll / n), "perplexity_fp": math.exp(nll_ref / n), "kl": kl / n, "tokens": n}


RSS_CHILD_IMPORTS = ("transformers", "lowbit.models", "lowbit.api", "lowbit.export", "lowbit.kvcache.cache",
                     "transformers.models.llama.modeling_llama", "transformers.models.auto.tokenization_auto")


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss_probe(checkpoint: str, method: str, bits: float, context: int) -> dict:
    """Run in a fresh process: RSS of loading `checkpoint` and decoding at `context` with the cache,
    over the RSS after importing every module loading uses (as bench/kernels.py --memory)."""
    import importlib

    for m in RSS_CHILD_IMPORTS:
        importlib.import_module(m)
    from lowbit.eval.size import memory_bytes
    from lowbit.export.lowbit import load
    from lowbit.mixed.kv_options import cache_from_meta
    from lowbit.runtime.memory import release_free_memory

    release_free_memory()
    base = _status("VmRSS")
    model, _ = load(checkpoint)
    release_free_memory()
    loaded = _status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: the peak from here on
    cache = cache_from_meta({"method": method, "bits": bits}, model.config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=g)
    with torch.no_grad():
        for s in range(0, context, CHUNK):
            model(ids[:, s:s + CHUNK], past_key_values=cache, use_cache=True, logits_to_keep=1)
        release_free_memory()
        after_prefill = _status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")
        tok = ids[:, -1:]
        for _ in range(8):
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        decode_peak = _status("VmHWM")
    release_free_memory()
    after = _status("VmRSS")
    kv = cache.memory_report()["kv_bytes"] if hasattr(cache, "memory_report") else None
    return {"baseline_rss": base, "weights_rss": loaded - base, "model_bytes": memory_bytes(model),
            "after_prefill_rss": after_prefill - base, "after_decode_rss": after - base,
            "decode_peak_rss": decode_peak - base, "kv_bytes_report": kv}


def run_budget(budget_text: str, setup, fp_model, tok, args) -> dict:
    from lowbit import api
    from lowbit.calibration import eval_windows, load_text_or_pydoc
    from lowbit.mixed.apply import plan_recipe
    from lowbit.mixed.fit_run import evaluate_fit, fit, fit_json, format_fit
    from lowbit.mixed.kv_options import KVOption, kv_choice_meta
    from lowbit.mixed.memory import parse_memory

    budget = parse_memory(budget_text)
    choice = fit(setup, budget, CONTEXT)
    print(format_fit(choice, setup, CONTEXT), flush=True)
    row = fit_json(choice, setup, CONTEXT)
    opt = setup.option(choice.best.kv.name)
    ckpt = CKPTS / budget_text
    if not (ckpt / "lowbit.json").is_file():
        t = time.perf_counter()
        api.quantize_to("default", ckpt, plan_recipe(choice.best.plan, setup.meas), n_samples=32, seq_len=512,
                        meta={"kv_cache": kv_choice_meta(opt, CONTEXT, budget)}, overwrite=True)
        row["quantize_s"] = round(time.perf_counter() - t, 1)
    old = _load()["rows"].get(budget_text, {})
    if "short" in old and "long" in old:
        row.update({k: old[k] for k in ("short", "short_eval", "long", "long_eval", "quantize_s") if k in old})
    else:
        from lowbit.export.lowbit import load

        q_model, _ = load(ckpt)
        text, split = load_text_or_pydoc("python-docs")
        short = evaluate_fit(fp_model, q_model, tok, opt, text=text, seq_len=512, windows=args.windows)
        row["short"] = {k: short[k] for k in ("weights", "kv", "both")}
        row["short_eval"] = f"{text} held-out, {args.windows} x 512"
        ids = eval_windows(tok, split.evaluation, seq_len=CONTEXT, max_windows=args.long_windows)
        fp, q_config = KVOption(None), q_model.config
        row["long"] = long_eval(q_model, fp_model, ids, lambda: opt.make_cache(q_config),
                                lambda: fp.make_cache(fp_model.config))
        row["long_eval"] = f"{text} held-out, {ids.shape[0]} x {ids.shape[1]} in chunks of {CHUNK}"
        del q_model
    probe = subprocess.run([sys.executable, __file__, "--rss", str(ckpt), opt.method or "fp", str(opt.bits)],
                           capture_output=True, text=True)
    if probe.returncode:
        raise RuntimeError(probe.stderr[-2000:])
    row["rss"] = json.loads(probe.stdout.strip().splitlines()[-1])
    ppl_fp = row["short"]["both"]["perplexity_fp"]
    row["predicted_perplexity"] = ppl_fp * math.exp(row["predicted_kl"])
    row["predicted_perplexity_long"] = row["long"]["perplexity_fp"] * math.exp(row["predicted_kl"])
    return row


def summary(res: dict) -> None:
    print(f"\n{'budget':>8} {'KV':>15} {'bpw':>6} {'pred KL':>8} {'KL w':>7} {'KL kv':>7} {'KL both':>8} "
          f"{'pred ppl':>9} {'ppl':>8} {'fp ppl':>8} {'8k ppl':>8} {'8k fp':>8} {'8k pred':>8} {'pred MB':>8} "
          f"{'peak MB':>8}")
    for key, r in sorted(res["rows"].items()):
        s = r["short"]
        print(f"{key:>8} {r['kv']:>15} {r['weight_bpw']:>6.3f} {r['predicted_kl']:>8.4f} {s['weights']['kl']:>7.4f} "
              f"{s['kv']['kl']:>7.4f} {s['both']['kl']:>8.4f} {r['predicted_perplexity']:>9.3f} "
              f"{s['both']['perplexity']:>8.3f} {s['both']['perplexity_fp']:>8.3f} {r['long']['perplexity']:>8.3f} "
              f"{r['long']['perplexity_fp']:>8.3f} {r['predicted_perplexity_long']:>8.3f} "
              f"{r['memory']['total_bytes'] / 1e6:>8.1f} {r['rss']['decode_peak_rss'] / 1e6:>8.1f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rss":
        _, _, ckpt, method, bits = sys.argv[:5]
        print(json.dumps(rss_probe(ckpt, method, float(bits), CONTEXT)))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="250MB,300MB")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--long-windows", type=int, default=1)
    ap.add_argument("--print", action="store_true")
    ap.add_argument("--redo", action="store_true", help="recompute rows already stored (evaluations are reused "
                                                         "when stored; the checkpoint when saved)")
    args = ap.parse_args()
    res = _load()
    if args.print:
        summary(res)
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from lowbit.mixed.fit_run import prepare
    from lowbit.models import load_model

    fp_model, tok = load_model("default")
    fp_model.eval()
    setup = prepare(fp_model, tok, "default")
    for b in args.budgets.split(","):
        if b in res["rows"] and not args.redo:
            continue
        res["rows"][b] = run_budget(b, setup, fp_model, tok, args)
        res["context"] = CONTEXT
        _save(res)
    summary(res)


if __name__ == "__main__":
    main()
