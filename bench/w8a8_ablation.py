"""Where SmolLM2's W8A8 loss comes from: quantize one Linear kind at a time (every block) with a
scheme and report Δppl / KL on a few held-out windows (issue 12 ablation).

    PYTHONPATH=src .venv/bin/python bench/w8a8_ablation.py --scheme w8a8-dynamic --windows 2
"""

from __future__ import annotations

import argparse
import copy
import json
import logging

import torch

from lowbit import ptq
from lowbit.calibration import calibration_batches, eval_windows, load_text
from lowbit.eval.quality import quality_many
from lowbit.models import load_model
from lowbit.models.arch import arch_for
from lowbit.ptq.llm import block_linears
from lowbit.ptq.smoothquant import smooth
from lowbit.spec import scheme


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scheme", default="w8a8-dynamic")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--smoothquant", default=None, help="alpha in [0, 1] or 'auto'")
    ap.add_argument("--kinds", default="all,self_attn.q_proj|self_attn.k_proj|self_attn.v_proj,self_attn.o_proj,"
                    "mlp.gate_proj|mlp.up_proj,mlp.down_proj")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    model, tok = load_model("default")
    split = load_text()
    ev = eval_windows(tok, split.evaluation, 512, args.windows)
    calib = calibration_batches(tok, split.calibration, args.samples, 512)
    base = copy.deepcopy(model)
    if args.smoothquant is not None:
        alpha = args.smoothquant if args.smoothquant == "auto" else float(args.smoothquant)
        alphas: dict = {}
        smooth(base, list(calib.split(4)), alpha, dynamic=scheme(args.scheme).input.dynamic, alphas=alphas)
        if alphas:
            print(json.dumps({"alphas": alphas}))
    arch_for(model)
    models = {}
    for kind in args.kinds.split(","):
        names = block_linears(base)
        if kind != "all":
            names = [n for n in names if any(n.endswith(k) for k in kind.split("|"))]
        m = copy.deepcopy(base)
        ptq.prepare(m, ptq.PTQConfig(scheme(args.scheme), targets=tuple(names)))
        if not scheme(args.scheme).input.dynamic:
            ptq.calibrate(m, list(calib.split(4)))
        models[kind] = ptq.convert(m)
    orig, res = quality_many(model, models, ev, progress=False)
    out = {k: {"dppl_pct": round((r["perplexity"] / orig["perplexity"] - 1) * 100, 3), "kl": round(r["kl"], 4)}
           for k, r in res.items()}
    print(json.dumps({"scheme": args.scheme, "smoothquant": args.smoothquant, "windows": args.windows, **out},
                     indent=1))


if __name__ == "__main__":
    main()
