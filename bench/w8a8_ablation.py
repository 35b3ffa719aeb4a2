"""Where SmolLM2's W8A8 loss comes from: quantize one Linear kind at a time (every block) with a
scheme and report Δppl / KL on a few held-out windows (issue 12 ablation).

    PYTHONPATH=src .venv/bin/python bench/w8a8_ablation.py --scheme w8a8-dynamic --windows 2
    ... --scheme w8a8-static --smoothquant "qkv=0.8,o=0.5,gate_up=0.8,down=0.8"   # alphas per mapping
    ... --ranges --smoothquant 0.8      # who sets each static range: the first token or the rest

--ranges: for every block Linear's input (after the smoothing), max |x| over the calibration
windows' first positions against max |x| over all other positions, and the 99.99th percentile of
|x| over the other positions; summarised per Linear kind.
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
from lowbit.ptq.calibrate import watch_inputs
from lowbit.ptq.smoothquant import parse_alpha, smooth
from lowbit.spec import scheme


def first_token_ranges(model, names, batches) -> dict:
    """{kind: summary} of where each Linear's static input range comes from (see --ranges)."""
    first, rest, p9999 = {}, {}, {}

    def on_input(name, x):
        a = x.abs().float()
        f, r = a[:, 0].amax(), a[:, 1:].amax()
        first[name] = torch.maximum(first.get(name, f), f)
        rest[name] = torch.maximum(rest.get(name, r), r)
        flat = a[:, 1:].reshape(-1)
        k = max(1, int(flat.numel() * 1e-4))
        q = flat.topk(k).values[-1]
        p9999[name] = torch.maximum(p9999.get(name, q), q)

    watch_inputs(model, names, batches, on_input)
    kinds: dict = {}
    for n in names:
        kind = n.rsplit(".", 1)[-1]
        ratio = float(first[n] / rest[n])
        kinds.setdefault(kind, []).append((ratio, float(rest[n] / p9999[n]), n.split(".")[2]))
    return {k: {"layers_first_token_sets_range": sum(r > 1 for r, _, _ in v),
                "max_first_over_rest": round(max(r for r, _, _ in v), 2),
                "worst_layers_first_over_rest": sorted(((round(r, 1), i) for r, _, i in v), reverse=True)[:4],
                "median_rest_max_over_p99.99": round(sorted(q for _, q, _ in v)[len(v) // 2], 2)}
            for k, v in kinds.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scheme", default="w8a8-dynamic")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--smoothquant", default=None, help="alpha in [0, 1], 'auto', or per mapping "
                    "'qkv=0.8,o=0.5,gate_up=0.8,down=auto'")
    ap.add_argument("--observer", default=None, help="static schemes: the input observer")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ranges", action="store_true", help="only print who sets each static input range")
    ap.add_argument("--dynamic", default=None, help="regex: these Linears get W8A8 dynamic (per-token) inputs "
                    "instead of the scheme, e.g. 'layers\\.(11|28)\\.mlp\\.down_proj$'")
    ap.add_argument("--kinds", default="all,self_attn.q_proj|self_attn.k_proj|self_attn.v_proj,self_attn.o_proj,"
                    "mlp.gate_proj|mlp.up_proj,mlp.down_proj")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, tok = load_model("default")
    split = load_text()
    ev = eval_windows(tok, split.evaluation, 512, args.windows)
    calib = calibration_batches(tok, split.calibration, args.samples, 512)
    base = copy.deepcopy(model)
    if args.smoothquant is not None:
        alpha = parse_alpha(args.smoothquant)
        alphas: dict = {}
        smooth(base, list(calib.split(4)), alpha, dynamic=scheme(args.scheme).input.dynamic, alphas=alphas)
        if alphas:
            print(json.dumps({"alphas": alphas}))
    arch_for(model)
    if args.ranges:
        print(json.dumps({"smoothquant": args.smoothquant,
                          **first_token_ranges(base, block_linears(base), list(calib.split(4)))}, indent=1))
        return
    sch = scheme(args.scheme, args.observer)
    models = {}
    for kind in args.kinds.split(","):
        names = block_linears(base)
        if kind != "all":
            names = [n for n in names if any(n.endswith(k) for k in kind.split("|"))]
        m = copy.deepcopy(base)
        overrides = ((args.dynamic, scheme("w8a8-dynamic")),) if args.dynamic else ()
        ptq.prepare(m, ptq.PTQConfig(sch, targets=tuple(names), overrides=overrides))
        if not sch.input.dynamic:
            ptq.calibrate(m, list(calib.split(4)))
        models[kind] = ptq.convert(m)
    orig, res = quality_many(model, models, ev, progress=False)
    out = {k: {"dppl_pct": round((r["perplexity"] / orig["perplexity"] - 1) * 100, 3), "kl": round(r["kl"], 4)}
           for k, r in res.items()}
    print(json.dumps({"scheme": args.scheme, "observer": args.observer, "smoothquant": args.smoothquant,
                      "dynamic": args.dynamic, "windows": args.windows, **out},
                     indent=1))


if __name__ == "__main__":
    main()
