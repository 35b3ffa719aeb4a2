"""lowbit's GGUF files against llama.cpp's own quantizations of the same fp32 model, measured by llama.cpp.

    nice .venv/bin/python bench/gguf_llamacpp.py [--windows 16] [--samples 64]

In one go (SmolLM2-135M, the bundled default):
1. lowbit writes the fp32 model as an F32 GGUF, and an importance matrix (mean x² per input column
   of every decoder Linear, llama-imatrix's quantity) from the calibration text GPTQ uses (pydoc);
2. llama.cpp (llama-cpp-python, its own venv: bench/.venv-llamacpp) quantizes the F32 file to
   Q8_0, Q4_0, Q4_K_M, each Q4 type also with the importance matrix (`llama_model_quantize`);
3. lowbit runs GPTQ on each type's own grid (Q8_0, Q4_0, and Q4_K with exactly the per-tensor
   types of llama.cpp's Q4_K_M file, so both files have the same size) and writes the GGUFs;
4. llama.cpp measures every file: perplexity on held-out windows of the Debian python3.11-doc text
   (the same token ids for every file), logits on fixed prompts, size on disk, decode tok/s;
5. lowbit's own fp32 forward of each file's weights (read back by lowbit, records dequantized) on
   the same prompts: max |Δlogit| and top-1 agreement against llama.cpp (which also quantizes the
   activations to 8 bits for its quantized dot products).
Results: bench/results/gguf.json; a table on stdout.

    OMP_NUM_THREADS=1 .venv/bin/python bench/gguf_llamacpp.py --mixed Q3_K_M,Q4_K_M

lowbit's mixed precision against llama.cpp's K-quant mixes at their own bits per weight: llama.cpp
quantizes the F32 file to each mix (with and without the importance matrix); lowbit measures every
decoder Linear under the GGUF types llama.cpp can store for its shape (GPTQ onto each type's grid,
the type's exact bits per weight; K-types only where the row is a multiple of 256, so SmolLM2's
576-wide rows take Q4_0/Q5_0/Q8_0), allocates one type per Linear with at most the mix's decoder
Linear bits, quantizes that plan with GPTQ and writes it as GGUF (token embedding at the mix's
type). With --same-types also lowbit GPTQ with exactly the mix's per-tensor types. llama.cpp computes every file's
perplexity from its own logits on the same held-out windows as bench/mixed.py (python-docs,
16 x 512). Q4_1/Q5_1 are left out of lowbit's types: the bundled SmolLM2 is a dequantized Q4_1
model, on which those asym-min g32 grids are lossless. Results: bench/results/gguf_mixed.json.
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
# the llama-cpp-python venv (built from source; see README); LLAMACPP_PYTHON points elsewhere
LLAMA_PY = Path(os.environ.get("LLAMACPP_PYTHON", HERE / ".venv-llamacpp" / "bin" / "python"))
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "import os\nimport sys\n\n",
           "The Python standard library", "In mathematics, a prime number", "Once upon a time"]
FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15, "Q3_K_M": 12, "Q2_K": 10}  # llama_ftype
MIX_TYPES = ("Q2_K", "Q3_K", "Q4_0", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0")  # lowbit's options (no Q4_1/Q5_1)


# ---- worker: runs in the llama-cpp-python venv (no torch) -------------------------------------------
def _imatrix_array(npz_path):
    import ctypes

    import llama_cpp

    data = np.load(npz_path)
    keep = []
    arr = (llama_cpp.llama_model_imatrix_data * (len(data.files) + 1))()
    for i, name in enumerate(data.files):
        v = np.ascontiguousarray(data[name], dtype=np.float32)
        keep.append(v)
        arr[i].name = name.encode()
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    arr[len(data.files)].name = None  # NULL-terminated
    return arr, keep


def worker_quantize(job):
    import ctypes

    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FTYPES[job["ftype"]]
    p.nthread = job.get("threads", 2)
    keep = None
    if job.get("imatrix"):
        arr, keep = _imatrix_array(job["imatrix"])
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(job["src"].encode(), job["dst"].encode(), ctypes.byref(p))
    del keep
    return {"rc": int(rc)}


def worker_measure(job):
    import llama_cpp

    windows = np.load(job["windows"])  # [n, seq_len] token ids
    seq = windows.shape[1]
    llm = llama_cpp.Llama(job["file"], n_ctx=seq, n_batch=seq, n_ubatch=seq, logits_all=True, verbose=False,
                          n_threads=job.get("threads", 2), n_threads_batch=job.get("threads", 2))
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    for ids in windows:
        llm.reset()
        llm.eval(ids.tolist())
        logits = np.asarray(llm.scores[:seq - 1], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
        nll += float((lse - logits[np.arange(seq - 1), ids[1:]]).sum())
        count += seq - 1
    prefill_s = time.perf_counter() - t0
    prompt_logits = []
    for ids in job["prompts"]:
        llm.reset()
        llm.eval(ids)
        prompt_logits.append(np.array(llm.scores[:len(ids)], dtype=np.float32, copy=True))  # scores is reused
    np.savez(job["logits_out"], *prompt_logits)
    return {"ppl": float(np.exp(nll / count)), "tokens": count, "prefill_tok_s": count / prefill_s,
            "size": os.path.getsize(job["file"])}


def worker_speed(job):
    """Decode tok/s: greedy, one token per eval after a short prompt (batch 1, 2 threads)."""
    import llama_cpp

    llm = llama_cpp.Llama(job["file"], n_ctx=256, verbose=False, n_threads=job.get("threads", 2),
                          n_threads_batch=job.get("threads", 2))
    llm.eval(list(job["prompt"]))
    n = job.get("decode_tokens", 64)
    t0 = time.perf_counter()
    for _ in range(n):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return {"decode_tok_s": n / (time.perf_counter() - t0)}


def worker_main():
    job = json.loads(sys.stdin.read())
    fn = {"quantize": worker_quantize, "measure": worker_measure, "speed": worker_speed}[job.pop("cmd")]
    print(json.dumps(fn(job)))


def call_worker(job: dict) -> dict:
    if not LLAMA_PY.is_file():
        sys.exit(f"llama-cpp-python venv missing: {LLAMA_PY}")
    res = subprocess.run([str(LLAMA_PY), __file__, "--worker"], input=json.dumps(job), capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ""})
    if res.returncode:
        sys.exit(f"llama.cpp worker failed ({job.get('cmd')}): {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---- main: lowbit's venv ---------------------------------------------------------------------------
def imatrix(model, tokenizer, samples, seq_len, out):
    """mean x² per input column of every decoder Linear (llama-imatrix's statistic), by GGUF name."""
    import torch

    from lowbit.calibration import calibration_batches, load_text
    from lowbit.export.gguf_meta import name_map

    names = name_map(model.config)
    sums, counts, hooks = {}, {}, []
    for hf, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and hf in names and hf != "lm_head":
            def hook(m, inp, _out, key=names[hf] + ".weight"):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + (x * x).sum(0)
                counts[key] = counts.get(key, 0) + x.shape[0]
            hooks.append(mod.register_forward_hook(hook))
    batches = calibration_batches(tokenizer, load_text("pydoc").calibration, samples, seq_len)
    with torch.no_grad():
        for b in batches:
            model(b if b.dim() == 2 else b[None])
    for h in hooks:
        h.remove()
    np.savez(out, **{k: (sums[k] / counts[k]).float().numpy() for k in sums})


def dense_model(qm):
    """A float32 transformers model holding exactly a GGUF file's weights (records dequantized)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(qm.config, dtype=torch.float32)
    state = dict(qm.tensors)
    for name, qw in qm.layers.items():
        state[f"{name}.weight"] = qw.dequantize()
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(qm.config, "tie_word_embeddings", False):
        model.tie_weights()
    from lowbit.export.model import _rebuild_buffers

    _rebuild_buffers(model)
    return model.eval()


def linear_types(path) -> dict:
    """{GGUF tensor name: (type, parameters, bits)} of a file's decoder Linears (blk.*, 2-D), bits from
    the stored bytes."""
    import gguf

    return {t.name: (t.tensor_type.name, int(np.prod(t.shape)), int(t.n_bytes) * 8)
            for t in gguf.GGUFReader(str(path)).tensors
            if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2}


def lowbit_gptq(out: Path, type_name: str, samples: int, overrides: dict | None):
    import lowbit.api as api
    from lowbit.export.gguf_blocks import LAYOUTS
    from lowbit.recipe import Recipe

    recipe = api.make_recipe(method="gptq", bits=4, group_size=32, symmetric=True)
    if overrides:
        recipe = Recipe(**{**recipe.__dict__, "overrides": tuple(
            (f"^{n.replace('.', '[.]')}$", LAYOUTS[t].spec) for n, t in overrides.items())})
    t0 = time.perf_counter()
    api.quantize_to("default", out, recipe, calib_text="pydoc", n_samples=samples, seq_len=512, overwrite=True,
                    progress=False, fmt="gguf", format_options={"type": type_name})
    return time.perf_counter() - t0


def _measure_file(work: Path, path: Path, prompts, check_lowbit: bool) -> dict:
    import collections

    import gguf
    import torch

    from lowbit.export import gguf as G

    logits_out = work / f"logits-{path.stem}.npz"
    r = call_worker({"cmd": "measure", "file": str(path), "windows": str(work / "windows.npy"),
                     "prompts": prompts, "logits_out": str(logits_out)})
    r["types"] = dict(sorted(collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors).items()))
    lin = linear_types(path)
    r["linear_bpw"] = sum(b for _, _, b in lin.values()) / sum(p for _, p, _ in lin.values())
    if check_lowbit:  # llama.cpp's logits against lowbit's fp32 forward of the records it wrote
        dense = dense_model(G.read(path))
        theirs = np.load(logits_out)
        dmax, agree, n = 0.0, 0, 0
        with torch.no_grad():
            for i, ids in enumerate(prompts):
                ours = dense(torch.tensor([ids])).logits[0].numpy()
                dmax = max(dmax, float(np.abs(ours - theirs[f"arr_{i}"]).max()))
                agree += int((ours.argmax(-1) == theirs[f"arr_{i}"].argmax(-1)).sum())
                n += len(ids)
        r.update(max_abs_dlogit=dmax, top1_agree=agree / n)
    return r


def mixed(args) -> None:
    """lowbit's mixed plan over GGUF types against llama.cpp's K-quant mixes at their bits per weight."""
    from collections import Counter

    import lowbit.api as api
    from lowbit.calibration import eval_windows, load_text
    from lowbit.export import gguf as G
    from lowbit.export.model import QuantizedModel
    from lowbit.mixed.allocate import allocate, measurement_layers
    from lowbit.mixed.apply import measure_source, plan_recipe
    from lowbit.mixed.options import gguf_options
    from lowbit.models import load_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    mixes = [m for m in args.mixed.split(",") if m]
    model, tok = load_model("default")
    f32 = work / "smollm2-f32.gguf"
    if not (args.reuse and f32.exists()):
        G.write(QuantizedModel.from_model(model, tok, {}, source="SmolLM2-135M-Instruct"), f32, overwrite=True,
                type="F32")
    imat = work / "imatrix.npz"
    if not (args.reuse and imat.exists()):
        imatrix(model, tok, args.samples, 512, imat)
    windows = eval_windows(tok, load_text("python-docs").evaluation, seq_len=args.seq_len,
                           max_windows=args.windows).numpy()
    np.save(work / "windows.npy", windows)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    back = {g + ".weight": hf for hf, g in G.gguf_meta.name_map(model.config).items()}
    del model
    t0 = time.perf_counter()
    meas = measure_source("default", options=gguf_options(MIX_TYPES), n_samples=args.mixed_samples)
    measure_s = time.perf_counter() - t0
    layers = measurement_layers(meas)
    files, plans = {"fp32": (f32, False)}, {}
    for mix in mixes:
        for im in (False, True):
            dst = work / f"llamacpp-{mix}{'-imat' if im else ''}.gguf"
            if not (args.reuse and dst.exists()):
                rc = call_worker({"cmd": "quantize", "src": str(f32), "dst": str(dst), "ftype": mix,
                                  "imatrix": str(imat) if im else None})["rc"]
                assert rc == 0, (mix, rc)
            files[f"llama.cpp {mix}{' +imatrix' if im else ''}"] = (dst, False)
        theirs = linear_types(files[f"llama.cpp {mix}"][0])
        bits, params = sum(b for _, _, b in theirs.values()), sum(p for _, p, _ in theirs.values())
        assert params == meas.params, (params, meas.params)
        embed = next(t.tensor_type.name for t in __import__("gguf").GGUFReader(str(files[f"llama.cpp {mix}"][0])).tensors
                     if t.name == "token_embd.weight")
        t0 = time.perf_counter()
        plan = allocate(layers, bits / params)
        alloc_s = time.perf_counter() - t0
        assert plan.bits <= bits, (plan.bits, bits)
        dst = work / f"lowbit-mixed-{mix}.gguf"
        t0 = time.perf_counter()
        if not (args.reuse and dst.exists()):
            api.quantize_to("default", dst, plan_recipe(plan, meas), calib_text="pydoc", n_samples=args.mixed_samples,
                            seq_len=512, overwrite=True, progress=False, fmt="gguf",
                            format_options={"output_type": embed})
        files[f"lowbit mixed @{mix} bpw"] = (dst, True)
        plans[mix] = {"llama_linear_bits": bits, "params": params, "target_bpw": bits / params, "plan_bits": plan.bits,
                      "plan_bpw": plan.bpw, "predicted_kl": plan.cost, "gap": plan.gap, "allocate_s": alloc_s,
                      "quantize_s": time.perf_counter() - t0, "embed_type": embed,
                      "llama_types": dict(sorted(Counter(t for t, _, _ in theirs.values()).items())),
                      "plan_types": dict(sorted(Counter(plan.choices.values()).items()))}
        if args.same_types:  # control: lowbit GPTQ with exactly the mix's per-tensor types
            same = work / f"lowbit-gptq-{mix}-types.gguf"
            if not (args.reuse and same.exists()):
                lowbit_gptq(same, "Q4_0", args.mixed_samples, {back[g]: t for g, (t, _, _) in theirs.items()})
            files[f"lowbit GPTQ, {mix}'s types"] = (same, True)
        print(f"{mix}: llama.cpp decoder Linears {bits / params:.4f} bpw; lowbit plan {plan.bpw:.4f} bpw "
              f"({plans[mix]['plan_types']})", flush=True)
    results = {}
    for key, (path, ours) in files.items():
        r = results[key] = _measure_file(work, path, prompts, ours)
        print(f"{key:34s} ppl {r['ppl']:.4f}  linear bpw {r['linear_bpw']:.4f}  size {r['size'] / 2**20:6.1f} MiB"
              + (f"  max|Δlogit| {r['max_abs_dlogit']:.3f} top-1 {r['top1_agree']:.3f}" if ours else ""), flush=True)
    base = results["fp32"]["ppl"]
    inc = {k: v["ppl"] / base - 1 for k, v in results.items()}
    ratios = {}
    for mix in mixes:
        for ref in (f"llama.cpp {mix}", f"llama.cpp {mix} +imatrix"):
            ratios[f"lowbit mixed increase / {ref}'s"] = inc[f"lowbit mixed @{mix} bpw"] / inc[ref]
    print("\n| file | decoder Linear bpw | MiB | perplexity (llama.cpp) | Δppl |")
    print("|---|---:|---:|---:|---:|")
    for k, r in results.items():
        print(f"| {k} | {r['linear_bpw']:.4f} | {r['size'] / 2**20:.2f} | {r['ppl']:.3f} | {inc[k]:+.2%} |")
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    out = Path(args.results) if args.results else HERE / "results" / "gguf_mixed.json"
    out.write_text(json.dumps({"windows": int(windows.shape[0]), "seq_len": args.seq_len,
                               "calibration": f"pydoc {args.mixed_samples}x512", "imatrix_samples": args.samples,
                               "lowbit_types": list(MIX_TYPES), "measurement": {"key": meas.key, "seconds_this_run":
                               measure_s, **meas.meta}, "plans": plans, "results": results, "ppl_increase": inc,
                               "ratios": ratios}, indent=2) + "\n")
    print(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--work", default=str(HERE / "out" / "gguf"))
    ap.add_argument("--reuse", action="store_true", help="keep files already made in --work")
    ap.add_argument("--speed-rounds", type=int, default=3)
    ap.add_argument("--mixed", default="", help="K-quant mixes (e.g. Q3_K_M,Q4_K_M): lowbit's mixed plan at their bpw")
    ap.add_argument("--mixed-samples", type=int, default=32, help="calibration windows of the mixed measurement/plan")
    ap.add_argument("--results", default="", help="--mixed: results file (default bench/results/gguf_mixed.json)")
    ap.add_argument("--same-types", action="store_true", help="--mixed: also lowbit GPTQ with each mix's own types")
    args = ap.parse_args()
    if args.mixed:
        return mixed(args)

    import gguf
    import torch

    from lowbit.calibration import eval_windows, load_text
    from lowbit.export import gguf as G
    from lowbit.export.model import QuantizedModel
    from lowbit.models import load_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, tok = load_model("default")
    f32 = work / "smollm2-f32.gguf"
    if not (args.reuse and f32.exists()):
        G.write(QuantizedModel.from_model(model, tok, {}, source="SmolLM2-135M-Instruct"), f32, overwrite=True,
                type="F32")
    imat = work / "imatrix.npz"
    if not (args.reuse and imat.exists()):
        imatrix(model, tok, args.samples, 512, imat)
    windows = eval_windows(tok, load_text("python-docs").evaluation, seq_len=args.seq_len,
                           max_windows=args.windows).numpy()
    np.save(work / "windows.npy", windows)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]

    files = {"fp32": f32}
    timings = {}
    for ft in ("Q8_0", "Q4_0", "Q4_K_M"):
        for im in ((False,) if ft == "Q8_0" else (False, True)):
            key = f"llama.cpp {ft}{' +imatrix' if im else ''}"
            dst = work / f"llamacpp-{ft}{'-imat' if im else ''}.gguf"
            if not (args.reuse and dst.exists()):
                rc = call_worker({"cmd": "quantize", "src": str(f32), "dst": str(dst), "ftype": ft,
                                  "imatrix": str(imat) if im else None})["rc"]
                assert rc == 0, (key, rc)
            files[key] = dst
    # lowbit's Q4_K file takes exactly the per-tensor types of llama.cpp's Q4_K_M file
    back = {g: hf for hf, g in G.gguf_meta.name_map(model.config).items()}
    k_types = {back[t.name.rsplit(".", 1)[0]]: t.tensor_type.name
               for t in gguf.GGUFReader(str(files["llama.cpp Q4_K_M"])).tensors
               if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2}
    del model
    for type_name, overrides in (("Q8_0", None), ("Q4_0", None), ("Q4_K", k_types)):
        dst = work / f"lowbit-gptq-{type_name}.gguf"
        if not (args.reuse and dst.exists()):
            timings[type_name] = lowbit_gptq(dst, type_name, args.samples, overrides)
        files[f"lowbit GPTQ {type_name}"] = dst

    results = {}
    for key, path in files.items():
        logits_out = work / f"logits-{path.stem}.npz"
        r = call_worker({"cmd": "measure", "file": str(path), "windows": str(work / "windows.npy"),
                         "prompts": prompts, "logits_out": str(logits_out)})
        r["types"] = dict(sorted(__import__("collections").Counter(
            t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors).items()))
        if True:  # every file: lowbit reads it (records for lowbit's types) and runs its weights in fp32
            dense = dense_model(G.read(path))
            llama_logits = np.load(logits_out)
            dmax, agree, n = 0.0, 0, 0
            with torch.no_grad():
                for i, ids in enumerate(prompts):
                    ours = dense(torch.tensor([ids])).logits[0].numpy()
                    theirs = llama_logits[f"arr_{i}"]
                    dmax = max(dmax, float(np.abs(ours - theirs).max()))
                    agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
                    n += len(ids)
            r.update(max_abs_dlogit=dmax, top1_agree=agree / n, logit_range=float(np.abs(ours).max()))
            if key.split()[-1] in timings:
                r["quantize_s"] = timings[key.split()[-1]]
        results[key] = r
        print(f"{key:28s} ppl {r['ppl']:.4f}  size {r['size'] / 2**20:6.1f} MiB"
              + (f"  max|Δlogit| {r['max_abs_dlogit']:.3f} top-1 {r['top1_agree']:.3f}" if "max_abs_dlogit" in r else ""),
              flush=True)
    # decode speed: round-robin over the files, best of `--speed-rounds` (the machine is shared)
    for _ in range(args.speed_rounds):
        for key, path in files.items():
            v = call_worker({"cmd": "speed", "file": str(path), "prompt": prompts[0]})["decode_tok_s"]
            results[key]["decode_tok_s"] = max(results[key].get("decode_tok_s", 0.0), v)

    base = results["fp32"]["ppl"]
    inc = {k: v["ppl"] / base - 1 for k, v in results.items()}
    ratios = {
        "Q4_0: lowbit GPTQ increase / llama.cpp's": inc["lowbit GPTQ Q4_0"] / inc["llama.cpp Q4_0"],
        "Q4_0: lowbit GPTQ increase / llama.cpp +imatrix's": inc["lowbit GPTQ Q4_0"] / inc["llama.cpp Q4_0 +imatrix"],
        "Q4_K: lowbit GPTQ increase / llama.cpp Q4_K_M's": inc["lowbit GPTQ Q4_K"] / inc["llama.cpp Q4_K_M"],
        "Q4_K: lowbit GPTQ increase / llama.cpp Q4_K_M +imatrix's":
            inc["lowbit GPTQ Q4_K"] / inc["llama.cpp Q4_K_M +imatrix"],
        "Q8_0: lowbit GPTQ increase / llama.cpp's": inc["lowbit GPTQ Q8_0"] / inc["llama.cpp Q8_0"]
        if inc["llama.cpp Q8_0"] else float("nan"),
    }
    print("\n| file | perplexity (llama.cpp) | Δppl | MiB | decode tok/s | × fp32 | max abs Δlogit | top-1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for k, r in results.items():
        speed = r["decode_tok_s"] / results["fp32"]["decode_tok_s"]
        print(f"| {k} | {r['ppl']:.3f} | {inc[k]:+.2%} | {r['size'] / 2**20:.1f} | {r['decode_tok_s']:.1f} | {speed:.2f} | "
              f"{r.get('max_abs_dlogit', float('nan')):.3f} | {r.get('top1_agree', float('nan')):.3f} |")
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    out = HERE / "results" / "gguf.json"
    out.write_text(json.dumps({"windows": int(windows.shape[0]), "seq_len": args.seq_len, "samples": args.samples,
                               "results": results, "ppl_increase": inc, "ratios": ratios}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main()
    else:
        main()
