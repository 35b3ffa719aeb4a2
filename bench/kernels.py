"""lowbit's runtime against llama.cpp on this CPU: decode, prefill, memory after load, quantize peak.

    nice .venv/bin/python bench/kernels.py [--contexts 64,1024] [--rounds 3] [--memory] [--quantize-memory] [--prefill-quality] [--head-quality]

Side by side in one run, SmolLM2-135M, batch 1, 2 threads, greedy, the same random prompt ids:
- llama.cpp (llama-cpp-python, its own venv bench/.venv-llamacpp) on Q4_0 and Q8_0 files it quantizes
  itself from lowbit's F32 GGUF of the model; decode tok/s after a prompt of each context length;
- lowbit's runtime (lowbit.runtime.decoder over QuantLinear kernels) for the matching types — W4 g32
  sym (Q4_0's grid) and W8 per-channel, both with an int8 lm_head as llama.cpp keeps token_embd/output
  at Q8_0 in these files — and W3 / W2 / NF4 g32 against W4; fp32 and bf16 dense;
  decode tok/s at each context and 512-token prefill tok/s (int8 activations in blocks of 32 through the
  integer-code layers, as llama.cpp does; "bf16-act prefill" is the same model with bf16 activations);
- with --prefill-quality, the perplexity cost of those int8 activations: held-out python-docs windows
  through the W4 g32 and W8 models with every decoder projection on bf16 vs int8 activations;
- with --head-quality, the cost of quantizing lm_head (int8 per channel, int4 g32) and the input
  embedding (int8 g32, --embed-bits 8) on the W4 g32 body: perplexity / KL on held-out python-docs;
- with --memory, in a fresh process per checkpoint (saved in lowbit's format): RSS after the imports
  (torch, transformers, lowbit, tokenizers and the model/tokenizer modules loading uses), after
  loading the checkpoint (weights and tokenizer), and the peak during two 512-token
  forwards, against the model's in-memory bytes (`lowbit eval`'s figure);
- with --quantize-memory, peak RSS and wall time of `lowbit quantize` GPTQ W3/W4 g64 (64 x 512 calibration),
  by default and with --low-memory.
Speed is method-independent, so the speed checkpoints are RTN. Writes bench/results/kernels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LLAMA_PY = Path(os.environ.get("LLAMACPP_PYTHON", HERE / ".venv-llamacpp" / "bin" / "python"))
FTYPES = {"Q8_0": 7, "Q4_0": 2}

# name: (bits, dtype, symmetric, granularity, group) of the decoder Linears; every variant has an int8 head
VARIANTS = {
    "W4 g32": (4, "int", True, "group", 32),
    "W8": (8, "int", True, "channel", None),
    "W3 g32": (3, "int", True, "group", 32),
    "W2 g32": (2, "int", True, "group", 32),
    "NF4 g32": (4, "nf4", True, "group", 32),
    "W4 g32 int8 embed": (4, "int", True, "group", 32),  # + the input embedding as an int8 table (--embed-bits 8)
}
MATCH = {"W4 g32": "Q4_0", "W8": "Q8_0"}


# ---- llama.cpp worker (runs in the llama-cpp-python venv, no torch) --------------------------------
def worker(job):
    import llama_cpp

    if job["cmd"] == "quantize":
        import ctypes

        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = FTYPES[job["ftype"]]
        p.nthread = 2
        return {"rc": int(llama_cpp.llama_model_quantize(job["src"].encode(), job["dst"].encode(), ctypes.byref(p)))}
    out = {}
    n_ctx = max(job["contexts"]) + job["new_tokens"] + 8
    llm = llama_cpp.Llama(job["file"], n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=512, verbose=False, n_threads=2,
                          n_threads_batch=2)
    for ctx in job["contexts"]:
        best = 0.0
        for _ in range(job["rounds"]):
            llm.reset()
            llm.eval(job["prompt"][:ctx])
            t0 = time.perf_counter()
            for _ in range(job["new_tokens"]):
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            best = max(best, job["new_tokens"] / (time.perf_counter() - t0))
        out[str(ctx)] = best
    return {"decode_tok_s": out}


def call_worker(job: dict) -> dict:
    if not LLAMA_PY.is_file():
        sys.exit(f"llama-cpp-python venv missing: {LLAMA_PY} (see README: bench/.venv-llamacpp)")
    res = subprocess.run([str(LLAMA_PY), __file__, "--worker"], input=json.dumps(job), capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""})
    if res.returncode:
        sys.exit(f"llama.cpp worker failed: {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---- lowbit -------------------------------------------------------------------------------------------
def build(base, name):
    import copy

    import torch

    from lowbit import QuantSpec
    from lowbit.api import embed_spec
    from lowbit.methods import get_method
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    model = copy.deepcopy(base)
    if name == "bf16":
        return model.to(torch.bfloat16)
    if name == "fp32":
        return model
    bits, dtype, sym, gran, group = VARIANTS[name]
    spec = QuantSpec(bits, dtype, sym, gran, group)
    recipe = Recipe(spec, quantize_head=True, head_spec=QuantSpec(8, "int", True, "channel"),
                    embed_spec=embed_spec(8) if name.endswith("int8 embed") else None)
    model._lowbit_layers = quantize_model(model, recipe, get_method("rtn"), progress=False)  # the records
    return model


def decode_speed(decoder, prompt, contexts, new_tokens):
    import torch

    out = {}
    for ctx in contexts:
        r = decoder.generate(torch.tensor(prompt[:ctx]), new_tokens + 1)
        out[str(ctx)] = new_tokens / r["decode_s"]
    return out


def int8_activation_quality(base, tok, windows: int) -> dict:
    """Perplexity on held-out python-docs windows of W4 g32 / W8 with bf16 vs int8 prefill activations."""
    import copy

    from lowbit.calibration import eval_windows, load_text_or_pydoc
    from lowbit.eval.quality import quality_many
    from lowbit.nn import QuantLinear

    _, split = load_text_or_pydoc("python-docs")
    ids = eval_windows(tok, split.evaluation, 512, windows)
    out = {}
    for n in ("W4 g32", "W8"):
        model = build(base, n)
        int8 = copy.deepcopy(model)
        for name, m in int8.named_modules():  # the decoder projections; the head runs one row in prefill
            if isinstance(m, QuantLinear) and m.takes_int8_activations and name != "lm_head":
                m.forward = m.forward_int8_activations
        orig, res = quality_many(base, {"bf16": model, "int8": int8}, ids, progress=False)
        out[n] = {"fp32_perplexity": orig["perplexity"], "bf16_acts_perplexity": res["bf16"]["perplexity"],
                  "int8_acts_perplexity": res["int8"]["perplexity"], "int8_acts_kl": res["int8"]["kl"],
                  "windows": int(ids.shape[0])}
        print(f"prefill quality {n}: {out[n]}", file=sys.stderr, flush=True)
    return out


def head_embed_quality(base, tok, windows: int) -> dict:
    """Perplexity / KL on held-out python-docs windows of the W4 g32 body with lm_head in fp32, int8
    per channel and int4 g32, and with the int8 input embedding (model bytes too)."""
    import copy

    from lowbit import QuantSpec
    from lowbit.api import embed_spec
    from lowbit.calibration import eval_windows, load_text_or_pydoc
    from lowbit.eval.quality import quality_many
    from lowbit.eval.size import memory_bytes
    from lowbit.methods import get_method
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    _, split = load_text_or_pydoc("python-docs")
    ids = eval_windows(tok, split.evaluation, 512, windows)
    body = QuantSpec(4, "int", True, "group", 32)
    setups = {"head fp32": Recipe(body),
              "head int8": Recipe(body, quantize_head=True, head_spec=QuantSpec(8, "int", True, "channel")),
              "head int4 g32": Recipe(body, quantize_head=True, head_spec=body),
              "head int8 + int8 embed": Recipe(body, quantize_head=True, head_spec=QuantSpec(8, "int", True, "channel"),
                                               embed_spec=embed_spec(8))}
    models = {}
    for n, recipe in setups.items():
        models[n] = copy.deepcopy(base)
        quantize_model(models[n], recipe, get_method("rtn"), progress=False)
    orig, res = quality_many(base, models, ids, progress=False)
    out = {n: {"perplexity": r["perplexity"], "kl": r["kl"], "model_bytes": memory_bytes(models[n])}
           for n, r in res.items()}
    out["fp32_perplexity"] = orig["perplexity"]
    out["windows"] = int(ids.shape[0])
    print(f"head/embedding quality: {out}", file=sys.stderr, flush=True)
    return out


def prefill_speed(decoder, prompt, n=512):
    import torch

    t0 = time.perf_counter()
    decoder.forward(torch.tensor(prompt[:n]), 0)
    return n / (time.perf_counter() - t0)


MEMORY_CHILD = r"""
import json, sys, torch
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"): return int(line.split()[1]) * 1024
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"): return int(line.split()[1]) * 1024
import transformers, lowbit, lowbit.models, lowbit.api, lowbit.export, tokenizers
import transformers.models.llama.modeling_llama, transformers.models.auto.tokenization_auto
from lowbit.eval.size import memory_bytes
imports = rss()  # every module loading uses imported: what follows is data
from lowbit.api import load
model, tok = load(sys.argv[1])
loaded = rss()
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
ids = torch.randint(100, 40000, (1, 512), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    for _ in range(2):
        model(ids, use_cache=False)
print(json.dumps({"imports": imports, "loaded": loaded, "peak_forward": hwm(), "model_bytes": memory_bytes(model)}))
"""


TOKENIZER_CHILD = r"""
import json, sys, torch
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"): return int(line.split()[1]) * 1024
import transformers, lowbit, lowbit.models, lowbit.api, lowbit.export, tokenizers
import transformers.models.llama.modeling_llama, transformers.models.auto.tokenization_auto
from lowbit.models.loader import default_model_dir
from lowbit.runtime.memory import release_free_memory
a = rss()
tok = transformers.AutoTokenizer.from_pretrained(default_model_dir())
release_free_memory()  # as load() does
print(json.dumps({"tokenizer": rss() - a}))
"""


def _child(code: str, *args) -> dict:
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"memory child failed ({args}): {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def memory_of(path: Path) -> dict:
    r = _child(MEMORY_CHILD, path)
    r["tokenizer"] = _child(TOKENIZER_CHILD)["tokenizer"]  # the same tokenizer for every checkpoint
    r["load_over_model"] = (r["loaded"] - r["imports"]) / r["model_bytes"]
    r["load_without_tokenizer_over_model"] = (r["loaded"] - r["imports"] - r["tokenizer"]) / r["model_bytes"]
    r["forward_extra_mib"] = (r["peak_forward"] - r["loaded"]) / 2**20
    return r


def quantize_peak(bits: int, work: Path, low_memory: bool = False) -> dict:
    out = work / f"gptq-w{bits}g64"
    cmd = [str(Path(sys.executable).parent / "lowbit"), "quantize", "default", "--method", "gptq", "--bits", str(bits),
           "--group-size", "64", "--sym", "-o", str(out), "--overwrite", *(["--low-memory"] if low_memory else [])]
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"quantize failed: {res.stderr[-2000:]}")
    peak = next(int(line.split()[-1]) * 1024 for line in res.stderr.splitlines() if "Maximum resident" in line)
    return {"peak_rss": peak, "seconds": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="64,1024")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--quantize-memory", action="store_true")
    ap.add_argument("--no-low-memory", action="store_true", help="--quantize-memory: only the default runs")
    ap.add_argument("--prefill-quality", action="store_true")
    ap.add_argument("--head-quality", action="store_true", help="lm_head fp32 / int8 / int4 and the int8 embedding")
    ap.add_argument("--quality-windows", type=int, default=16)
    ap.add_argument("--work", default=str(HERE / "out" / "kernels"))
    ap.add_argument("--out", default=str(HERE / "results" / "kernels.json"))
    args = ap.parse_args()

    import torch

    from lowbit.export import gguf as G
    from lowbit.export.model import QuantizedModel
    from lowbit.models import load_model
    from lowbit.runtime.decoder import Decoder

    torch.set_num_threads(2)
    contexts = [int(c) for c in args.contexts.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base, tok = load_model("default")
    base.eval()
    prompt = np.random.RandomState(0).randint(100, 40000, max(contexts + [512])).tolist()

    f32 = work / "smollm2-f32.gguf"
    if not f32.exists():
        G.write(QuantizedModel.from_model(base, tok, {}, source="SmolLM2-135M-Instruct"), f32, overwrite=True, type="F32")
    files = {}
    for ft in FTYPES:
        files[ft] = work / f"llama.cpp-{ft}.gguf"
        if not files[ft].exists():
            call_worker({"cmd": "quantize", "ftype": ft, "src": str(f32), "dst": str(files[ft])})

    names = ["fp32", "bf16", *args.variants.split(",")]
    if not args.rounds:  # memory figures only
        names, files = [], {}
    decoders = {n: Decoder(build(base, n), max(contexts) + args.new_tokens + 8) for n in names}
    results = {n: {"decode_tok_s": {str(c): 0.0 for c in contexts}, "prefill_tok_s": 0.0} for n in names}
    bf16_act = {n: Decoder(decoders[n].model, 520, int8_prefill=False) for n in names if n in MATCH}
    for n in bf16_act:
        results[n]["bf16_act_prefill_tok_s"] = 0.0
    results.update({f"llama.cpp {ft}": {"decode_tok_s": {str(c): 0.0 for c in contexts}} for ft in files})
    for rnd in range(args.rounds):  # round-robin so background load hits every entry alike
        for ft, path in files.items():
            r = call_worker({"cmd": "speed", "file": str(path), "contexts": contexts, "prompt": prompt,
                             "new_tokens": args.new_tokens, "rounds": 1})
            d = results[f"llama.cpp {ft}"]["decode_tok_s"]
            for c, v in r["decode_tok_s"].items():
                d[c] = max(d[c], v)
        for n, dec in decoders.items():
            d = results[n]["decode_tok_s"]
            for c, v in decode_speed(dec, prompt, contexts, args.new_tokens).items():
                d[c] = max(d[c], v)
            results[n]["prefill_tok_s"] = max(results[n]["prefill_tok_s"], prefill_speed(dec, prompt))
            if n in bf16_act:
                results[n]["bf16_act_prefill_tok_s"] = max(results[n]["bf16_act_prefill_tok_s"],
                                                          prefill_speed(bf16_act[n], prompt))
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    ratios = {}
    for n, ft in MATCH.items():
        if n in decoders:
            for c in map(str, contexts):
                ratios[f"{n} / llama.cpp {ft} decode @{c}"] = (results[n]["decode_tok_s"][c]
                                                                / results[f"llama.cpp {ft}"]["decode_tok_s"][c])
    for n in ("W3 g32", "W2 g32", "NF4 g32"):
        if n in decoders and "W4 g32" in decoders:
            for c in map(str, contexts):
                ratios[f"{n} / W4 g32 decode @{c}"] = results[n]["decode_tok_s"][c] / results["W4 g32"]["decode_tok_s"][c]
    if "W4 g32" in decoders:
        ratios["W4 g32 / bf16 prefill 512"] = results["W4 g32"]["prefill_tok_s"] / results["bf16"]["prefill_tok_s"]
        ratios["W4 g32 / fp32 prefill 512"] = results["W4 g32"]["prefill_tok_s"] / results["fp32"]["prefill_tok_s"]
        ratios["W4 g32 bf16-act / bf16 prefill 512"] = (results["W4 g32"]["bf16_act_prefill_tok_s"]
                                                       / results["bf16"]["prefill_tok_s"])
    prefill_quality = int8_activation_quality(base, tok, args.quality_windows) if args.prefill_quality else {}
    head_quality = head_embed_quality(base, tok, args.quality_windows) if args.head_quality else {}

    memory = {}
    if args.memory:
        from lowbit.export import write

        for n in ["fp32", *args.variants.split(",")]:
            path = work / f"ckpt-{n.replace(' ', '')}"
            if n == "fp32":
                path = "default"
            else:
                model = build(base, n)
                write(QuantizedModel.from_model(model, tok, model._lowbit_layers, source="SmolLM2-135M-Instruct"),
                      path, "lowbit", overwrite=True)
            memory[n] = memory_of(path)
            print(f"memory {n}: {memory[n]}", file=sys.stderr, flush=True)
    quant = {}
    if args.quantize_memory:
        for bits in (4, 3):
            quant[f"GPTQ W{bits} g64"] = quantize_peak(bits, work)
            if not args.no_low_memory:
                quant[f"GPTQ W{bits} g64 --low-memory"] = quantize_peak(bits, work, low_memory=True)

    meta = {"torch": torch.__version__, "threads": 2, "load_avg_1min": os.getloadavg()[0], "contexts": contexts,
            "new_tokens": args.new_tokens, "rounds": args.rounds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "ratios": ratios, "memory": memory,
                                          "quantize_memory": quant, "prefill_quality": prefill_quality,
                                          "head_quality": head_quality}, indent=1))
    for n, r in results.items():
        dec = "  ".join(f"@{c}: {v:6.1f}" for c, v in r["decode_tok_s"].items())
        pf = f"  prefill {r['prefill_tok_s']:7.1f}" if "prefill_tok_s" in r else ""
        if "bf16_act_prefill_tok_s" in r:
            pf += f" (bf16 activations {r['bf16_act_prefill_tok_s']:7.1f})"
        print(f"{n:20s} decode tok/s {dec}{pf}")
    for k, v in ratios.items():
        print(f"{k:45s} {v:5.2f}")
    for n, r in memory.items():
        print(f"{n:10s} RSS load-imports {(r['loaded'] - r['imports']) / 2**20:6.0f} MiB = {r['load_over_model']:.2f} x "
              f"model bytes ({r['model_bytes'] / 2**20:.0f} MiB), {r['load_without_tokenizer_over_model']:.2f} x without "
              f"the tokenizer ({r['tokenizer'] / 2**20:.0f} MiB); 512-token forward peak +{r['forward_extra_mib']:.0f} MiB")
    for n, r in prefill_quality.items():
        print(f"{n} perplexity: fp32 {r['fp32_perplexity']:.4f}, bf16 activations {r['bf16_acts_perplexity']:.4f}, "
              f"int8 prefill activations {r['int8_acts_perplexity']:.4f}")
    for n, r in quant.items():
        print(f"{n}: peak RSS {r['peak_rss'] / 2**20:.0f} MiB, {r['seconds']:.0f} s")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        print(json.dumps(worker(json.loads(sys.stdin.read()))))
    else:
        main()
