"""RTN quality on SmolLM2-135M: fp32 vs W8 per-channel, W4 g64 sym/asym, W3 g64, W2 g64.

    .venv/bin/python bench/rtn_quality.py [--text python-docs|pydoc] [--windows 32]

Prints perplexity, KL to fp32, top-1 agreement, bits per weight and size, and writes
bench/results/rtn.json. W4 asym g32 is shown only as a check: the model's weights came from a
Q4_1 GGUF (asymmetric 4-bit, blocks of 32), so that setting is (near-)lossless and says nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from lowbit.methods import get_method
from lowbit.calibration import eval_windows, load_text_or_pydoc
from lowbit.eval.quality import quality_many
from lowbit.eval.size import bits_per_weight, memory_bytes
from lowbit.models import load_model
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe
from lowbit.spec import QuantSpec

SETTINGS = {
    "W8 per-channel": QuantSpec(bits=8, granularity="channel"),
    "W4 g64 sym": QuantSpec(bits=4, group_size=64),
    "W4 g64 asym": QuantSpec(bits=4, group_size=64, symmetric=False),
    "W4 g64 asym, float zero": QuantSpec(bits=4, group_size=64, symmetric=False, integer_zero=False),
    "W3 g64 asym": QuantSpec(bits=3, group_size=64, symmetric=False),
    "W3 g64 asym, float zero": QuantSpec(bits=3, group_size=64, symmetric=False, integer_zero=False),
    "W2 g64 asym": QuantSpec(bits=2, group_size=64, symmetric=False),
    "W4 g32 asym, float zero (source format: lossless)": QuantSpec(bits=4, group_size=32, symmetric=False,
                                                                    integer_zero=False),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default="python-docs")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    text, split = load_text_or_pydoc(args.text)
    original, tok = load_model("default")
    windows = eval_windows(tok, split.evaluation, args.seq_len, args.windows)
    models = {}
    for name, spec in SETTINGS.items():
        model, _ = load_model("default")
        quantize_model(model, Recipe(spec), get_method("rtn"), progress=False)
        models[name] = model
    orig, results = quality_many(original, models, windows)
    fp = {"setting": "fp32", **orig, "bits_per_weight": 32.0, "memory_bytes": memory_bytes(original)}
    rows = [fp] + [{"setting": k, **r, "bits_per_weight": bits_per_weight(models[k]),
                    "memory_bytes": memory_bytes(models[k])} for k, r in results.items()]
    print(f"RTN on SmolLM2-135M-Instruct, eval text: {text} held-out, {windows.numel()} tokens")
    print(f"{'setting':<52} {'ppl':>8} {'Δppl%':>7} {'KL':>7} {'top1':>6} {'bits/w':>7} {'MiB':>7}")
    for r in rows:
        d = 100 * (r["perplexity"] / fp["perplexity"] - 1)
        print(f"{r['setting']:<52} {r['perplexity']:>8.3f} {d:>7.2f} {r['kl']:>7.4f} {r['top1_agreement']:>6.3f} "
              f"{r['bits_per_weight']:>7.3f} {r['memory_bytes'] / 2**20:>7.1f}")
    out = Path(__file__).parent / "results" / "rtn.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"text": text, "tokens": windows.numel(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
