"""Batch-1 decode and prefill tokens/s of SmolLM2-135M: fp32, bf16, int8 and int4 QuantLinear.

Run: .venv/bin/python bench/speed.py [--variants a,b,...] [--new-tokens 64] [--prefill 256]
Writes bench/results/speed.json with tokens/s and ratios to fp32 measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from lowbit import QuantSpec, preset
from lowbit.methods import get_method
from lowbit.models import load_model
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe
from lowbit.runtime import compiled_decode

PROMPT = "The history of the printing press begins"

# name: (weight spec or None, quantize lm_head, cast the rest to bf16, compiled static-cache decode)
VARIANTS = {
    "fp32": (None, False, False, False),
    "bf16": (None, False, True, False),
    "int8": (preset("W8"), False, False, False),
    "int8_head": (preset("W8"), True, False, False),
    "int4": (preset("W4G64"), False, False, False),
    "int4_head": (preset("W4G64"), True, False, False),
    "int4_head_bf16": (preset("W4G64"), True, True, False),
    "fp32_compiled": (None, False, False, True),
    "int8_head_compiled": (preset("W8"), True, False, True),
    "int4_head_compiled": (preset("W4G64"), True, False, True),
    "int8_head_bf16_compiled": (preset("W8"), True, True, True),
    "int4_head_bf16_compiled": (preset("W4G64"), True, True, True),
}


def build(base, spec: QuantSpec | None, head: bool, bf16: bool, compiled: bool):
    model = copy.deepcopy(base)
    if spec is not None:
        quantize_model(model, Recipe(spec, quantize_head=head), get_method("rtn"), progress=False)
    if bf16:
        model.to(torch.bfloat16)
    if compiled:
        compiled_decode(model)
    return model.eval()


def mem_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def time_decode(model, ids, new_tokens: int) -> tuple[float, list[int]]:
    """Seconds per decoded token (the prompt's prefill subtracted) and the generated ids."""
    kw = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0)
    t0 = time.perf_counter()
    out = model.generate(ids, **kw)
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    model(ids)
    dt -= time.perf_counter() - t1
    return dt / new_tokens, out[0, ids.shape[1]:].tolist()


def time_prefill(model, ids) -> float:
    t0 = time.perf_counter()
    model(ids)
    return (time.perf_counter() - t0) / ids.shape[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, tok = load_model("default")
    base.eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    long_ids = torch.randint(100, 40000, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    results, models = {}, {}
    with torch.inference_mode():
        for name in args.variants.split(","):
            spec, head, bf16, compiled = VARIANTS[name]
            models[name] = build(base, spec, head, bf16, compiled)
            _, toks = time_decode(models[name], ids, args.new_tokens)  # warm-up; compiles when asked
            time_prefill(models[name], long_ids)
            results[name] = {"decode_s_per_token": float("inf"), "prefill_s_per_token": float("inf"),
                             "memory_bytes": mem_bytes(models[name]), "spec": None if spec is None else spec.describe(),
                             "lm_head_quantized": head, "rest_bf16": bf16, "compiled_decode": compiled,
                             "first_tokens": toks[:16]}
            log(f"built {name}")
        # round-robin repetitions so load from other jobs on the machine hits every variant alike
        for rep in range(args.reps):
            for name, model in models.items():
                r = results[name]
                r["decode_s_per_token"] = min(r["decode_s_per_token"], time_decode(model, ids, args.new_tokens)[0])
                r["prefill_s_per_token"] = min(r["prefill_s_per_token"], time_prefill(model, long_ids))
            log(f"rep {rep + 1}/{args.reps} done")
    for name, r in results.items():
        r["decode_tokens_per_s"] = 1 / r.pop("decode_s_per_token")
        r["prefill_tokens_per_s"] = 1 / r.pop("prefill_s_per_token")
        print(f"{name:26s} decode {r['decode_tokens_per_s']:7.1f} tok/s  prefill {r['prefill_tokens_per_s']:8.1f} tok/s"
              f"  mem {r['memory_bytes'] / 2**20:6.0f} MiB", flush=True)
    ref = results.get("fp32")
    if ref:
        for r in results.values():
            r["decode_ratio_to_fp32"] = r["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
            r["prefill_ratio_to_fp32"] = r["prefill_tokens_per_s"] / ref["prefill_tokens_per_s"]
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
            "load_avg_1min": os.getloadavg()[0], "new_tokens": args.new_tokens, "prefill_tokens": args.prefill}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    for name, r in results.items():
        print(f"{name:26s} decode x{r.get('decode_ratio_to_fp32', 0):.2f}  prefill x{r.get('prefill_ratio_to_fp32', 0):.2f}")


if __name__ == "__main__":
    main()
