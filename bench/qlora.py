"""QLoRA side by side: fp32 LoRA vs lowbit QLoRA (zero and LoftQ init) vs peft + bitsandbytes QLoRA.

Same model (SmolLM2-135M), same data (the first --max-chars of the Debian Python docs; every 10th
document held out for evaluation), same adapters (r, alpha, dropout, the 7 projections), same
steps, batches, learning-rate schedule and seed, same trainer loop (lowbit.qlora.trainer.train).
Each variant runs in a fresh process, one after the other: peak RSS is that process's ru_maxrss
(load + quantize + train + evaluate). tokens/s counts training tokens (forward + backward + step).

    PYTHONPATH=src python bench/qlora.py            # writes bench/results/qlora.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("fp32-lora", "lowbit-qlora", "lowbit-qlora-loftq", "peft-bnb-qlora", "peft-fp32-lora")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(variant: str, a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    from lowbit.models import load_model
    from lowbit.models.loader import default_model_dir
    from lowbit.qlora.adapt import Adapted, LoraConfig, adapt
    from lowbit.qlora.data import load_dataset
    from lowbit.qlora.trainer import TrainConfig, perplexity, train

    t0 = time.perf_counter()
    folder = default_model_dir() if a.model == "default" else Path(a.model)
    tok = AutoTokenizer.from_pretrained(folder)
    ds = load_dataset(a.data, tok, seq_len=a.seq_len, max_eval_windows=a.eval_windows, max_chars=a.max_chars)
    lora = dict(r=a.rank, alpha=a.alpha, dropout=a.dropout, targets=TARGETS, seed=a.seed)
    if variant == "fp32-lora":
        model, _ = load_model(str(folder), dtype=torch.float32)
        adapted = adapt(model, LoraConfig(**lora, quant_type=None))
    elif variant.startswith("lowbit-qlora"):
        model, _ = load_model(str(folder), dtype=torch.float32, lazy=True)
        adapted = adapt(model, LoraConfig(**lora, quant_type="nf4", double_quant=True,
                                          init="loftq" if variant.endswith("loftq") else "zero"))
    else:
        import peft
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        if variant == "peft-fp32-lora":  # peft's own LoRA on the fp32 base: is the trainer loop fair to peft?
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        else:
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, dtype=torch.bfloat16)
        model.config.use_cache = False
        torch.manual_seed(a.seed)
        pm = peft.get_peft_model(model, peft.LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                                        target_modules=list(TARGETS), task_type="CAUSAL_LM"))
        adapted = Adapted(pm, LoraConfig(**lora, quant_type=None), list(TARGETS), variant)
    prepared = time.perf_counter() - t0
    before = perplexity(adapted.model, ds.eval, 4)
    with tempfile.TemporaryDirectory() as out:
        m = train(adapted, ds.train, ds.eval, out, TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                                                               warmup=a.warmup, seed=a.seed, save_every=a.steps))
    return {"variant": variant, "ppl_before": before, "ppl_after": m["eval_ppl"], "final_loss": m["final_loss"],
            "losses": m["losses"], "tokens_per_s": m["tokens_per_s"], "peak_rss_mb": rss_mb(),
            "prepare_s": prepared, "total_s": time.perf_counter() - t0,
            "train_windows": len(ds.train), "eval_windows": len(ds.eval)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", choices=VARIANTS)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--model", default="default")
    p.add_argument("--data", default="python-docs")
    p.add_argument("--max-chars", type=int, default=600_000)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=12)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "qlora.json"))
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a)), flush=True)
        return
    args = list(sys.argv[1:])
    results = {}
    if a.variants != ",".join(VARIANTS) and Path(a.out).is_file():  # a subset: update the others' figures
        results = json.loads(Path(a.out).read_text()).get("results", {})
    for v in a.variants.split(","):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--child", v, *args], capture_output=True, text=True)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode or not lines:
            print(f"{v}: failed ({r.returncode})\n{r.stderr[-3000:]}", file=sys.stderr)
            results[v] = {"variant": v, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "?"}
            continue
        results[v] = json.loads(lines[-1][len("RESULT "):])
        x = results[v]
        print(f"{v:20s} ppl {x['ppl_before']:.3f} -> {x['ppl_after']:.3f}  {x['tokens_per_s']:.1f} tok/s  "
              f"peak RSS {x['peak_rss_mb']:.0f} MB  ({time.perf_counter() - t:.0f} s)", flush=True)
    ratios = {}
    ref, ours, peer = results.get("fp32-lora", {}), results.get("lowbit-qlora", {}), results.get("peft-bnb-qlora", {})
    if "ppl_after" in ref and "ppl_after" in ours:
        ratios["qlora_ppl_vs_fp32_lora"] = ours["ppl_after"] / ref["ppl_after"]
        ratios["qlora_rss_vs_fp32_lora"] = ours["peak_rss_mb"] / ref["peak_rss_mb"]
    if "ppl_after" in peer and "ppl_after" in ours:
        ratios["qlora_rss_vs_peft_bnb"] = ours["peak_rss_mb"] / peer["peak_rss_mb"]
        ratios["qlora_tokens_per_s_vs_peft_bnb"] = ours["tokens_per_s"] / peer["tokens_per_s"]
        ratios["qlora_ppl_vs_peft_bnb"] = ours["ppl_after"] / peer["ppl_after"]
    pf = results.get("peft-fp32-lora", {})
    if "ppl_after" in pf and "ppl_after" in ref:
        ratios["lowbit_fp32_lora_ppl_vs_peft_fp32_lora"] = ref["ppl_after"] / pf["ppl_after"]
    loftq = results.get("lowbit-qlora-loftq", {})
    if "ppl_after" in loftq and "ppl_after" in ours:
        ratios["loftq_ppl_before_vs_zero"] = loftq["ppl_before"] / ours["ppl_before"]
        ratios["loftq_ppl_after_vs_zero"] = loftq["ppl_after"] / ours["ppl_after"]
    for k, v in ratios.items():
        print(f"{k:34s} {v:.3f}")
    config = {k: v for k, v in vars(a).items() if k not in ("child", "out")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"config": config, "results": results, "ratios": ratios}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
