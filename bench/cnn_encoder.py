"""Calibrated weight quantization of a CNN and an encoder, lowbit beside its peers, one run, same inputs.

    make bench-venv-peers                                         # torchao + optimum-quanto beside the main venv
    PYTHONPATH=src bench/.venv-peers/bin/python bench/cnn_encoder.py                  # digits, minilm
    PYTHONPATH=src bench/.venv-peers/bin/python bench/cnn_encoder.py --only digits    # one section (merged)

digits:  the Digits CNN (bench_data: trained here on load_digits, BatchNorm folded into the convs),
         for several training seeds: fp32; lowbit RTN and GPTQ (`lowbit.quantize_module`, convs on
         their unfolded-patch Hessian) at W4 and W3 symmetric per output channel, every conv and
         Linear; optimum-quanto qint4 weights (convs and Linears; it has no 3-bit type); torchao
         IntxWeightOnly int4 / int3 per channel (it quantizes the Linears only; the convs stay fp32).
         Test accuracy (540 held-out images), its drop from fp32, bytes of the state dict.
minilm:  all-MiniLM-L6-v2 at W4 g32: lowbit RTN and GPTQ, int4 asymmetric (fp16 scale + zero per 32:
         5 bits per weight; with --nf4 also NF4, fp16 scale per 32: 4.5 bits), against bitsandbytes NF4
         blocksize 32 (fp32 absmax per 32: 5 bits) on the CPU. Calibration (--calib): 512 sentences of
         the python-docs calibration text in padded batches (default; padding stays out of the
         Hessians), or 128-token windows of it. Held out: cosine of the mean-pooled sentence
         embeddings to fp32 on evaluation-text sentences, and retrieval
         recall@10 on evaluation-text paragraphs (query = first sentence, document = the rest,
         ranked against all documents).
Results: bench/results/cnn_encoder.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bench_data import digits_data, load_minilm, mean_pooled, nbytes, train_digits_cnn
import lowbit
from lowbit.ptq.fold_bn import fold_batchnorm

RESULTS = Path(__file__).parent / "results" / "cnn_encoder.json"
log = logging.getLogger("cnn_encoder")


def _peer(rows: dict, name: str, fn):
    """Run a peer; one that does not install or run is a result (its error), not a failure."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        rows[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        log.warning("%s: %s", name, rows[name]["error"])
        return None


def quanto_w4(model):
    from optimum.quanto import freeze, qint4, quantize

    q = copy.deepcopy(model)
    quantize(q, weights=qint4)
    freeze(q)
    return q


def torchao_intx(model, bits: int):
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    q = copy.deepcopy(model)
    quantize_(q, IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerAxis(0)))
    return q


# ---- digits ---------------------------------------------------------------------------------------
def digits_one(seed: int, xtr, xte, ytr, yte, calib_n: int) -> dict:
    model = train_digits_cnn(xtr, ytr, seed=seed)
    fold_batchnorm(model)  # inference form: the quantized weights are the folded ones
    calib = list(xtr[:calib_n].split(128))

    with torch.no_grad():
        ref = model(xte)

    def acc(m):
        with torch.no_grad():
            out = torch.as_tensor(m(xte)).float()
        return {"accuracy": float((out.argmax(1) == yte).float().mean()) * 100,
                "logit_rel_error": float(((out - ref) ** 2).sum() / (ref ** 2).sum()),
                "agreement_with_fp32": float((out.argmax(1) == ref.argmax(1)).float().mean()) * 100}

    rows = {"fp32": {**acc(model), "weight_bytes": nbytes(model)}}
    for bits in (4, 3):
        for method in ("rtn", "gptq"):
            q = copy.deepcopy(model)
            t0 = time.time()
            rec = lowbit.quantize_module(q, calib, method=method, bits=bits, group_size=None, symmetric=True,
                                         progress=False)
            rows[f"lowbit {method.upper()} W{bits} per-channel"] = {
                **acc(q), "weight_bytes": nbytes(q), "layers": len(rec), "seconds": time.time() - t0}
        name = f"torchao IntxWeightOnly int{bits} per-channel (Linears only)"
        q = _peer(rows, name, lambda b=bits: torchao_intx(model, b))
        if q is not None:
            rows[name] = {**acc(q), "weight_bytes": nbytes(q)}
    name = "optimum-quanto qint4 weights"
    q = _peer(rows, name, lambda: quanto_w4(model))
    if q is not None:
        rows[name] = {**acc(q), "weight_bytes": nbytes(q)}
    return rows


def digits(seeds: int, calib_n: int) -> dict:
    xtr, xte, ytr, yte = digits_data()
    per_seed = {}
    for seed in range(seeds):
        per_seed[seed] = digits_one(seed, xtr, xte, ytr, yte, calib_n)
        log.info("seed %d: %s", seed, {k: round(v.get("accuracy", float("nan")), 2) for k, v in per_seed[seed].items()})
    rows = {}
    for k in per_seed[0]:
        runs = [per_seed[s][k] for s in per_seed if "accuracy" in per_seed[s].get(k, {})]
        if not runs:
            rows[k] = per_seed[0][k]
            continue
        drops = [per_seed[s]["fp32"]["accuracy"] - per_seed[s][k]["accuracy"] for s in per_seed]
        mean = {f"{m}_mean": sum(r[m] for r in runs) / len(runs) for m in ("accuracy", "logit_rel_error",
                                                                             "agreement_with_fp32")}
        rows[k] = {**mean, "accuracy_per_seed": [r["accuracy"] for r in runs],
                   "drop_points_mean": sum(drops) / len(drops), "drop_points_max": max(drops),
                   "weight_bytes": per_seed[0][k]["weight_bytes"]}
    return {"test_images": len(xte), "calibration_images": calib_n, "seeds": seeds,
            "note": "BatchNorm folded into the convs before every variant; drop = fp32 accuracy - variant's, "
                    "same seed", "rows": rows}


# ---- MiniLM ---------------------------------------------------------------------------------------
def _clean_rst(p: str) -> str:
    p = re.sub(r":[\w:]+:`~?([^`<]*?)(\s*<[^>]*>)?`", r"\1", p)
    p = re.sub(r"`+([^`]*)`+_?", r"\1", p)
    return " ".join(p.split())


def retrieval_pairs(text: str, n: int) -> list[tuple[str, str]]:
    """(query, document) from prose paragraphs: the first sentence, and the rest of the paragraph."""
    pairs, seen = [], set()
    for para in text.split("\n\n"):
        lines = para.strip("\n").splitlines()
        if not lines or any(ln.startswith((" ", "\t", "..", "=", "-", "*", ">>>", ":", "+", "|")) for ln in lines):
            continue
        p = _clean_rst(para)
        parts = re.split(r"(?<=[.!?])\s+(?=[A-Z])", p, maxsplit=1)
        if len(parts) != 2 or not 30 <= len(parts[0]) <= 300 or not 80 <= len(parts[1]) <= 1500:
            continue
        if parts[0] in seen:
            continue
        seen.add(parts[0])
        pairs.append((parts[0], parts[1]))
        if len(pairs) == n:
            break
    return pairs


def held_sentences(text: str, n: int) -> list[str]:
    out = [s.strip() for s in re.split(r"(?<=[.!?])\s+", _clean_rst(text)) if 40 <= len(s.strip()) <= 400]
    return out[:n]


def minilm(n_calib: int, n_sentences: int, n_pairs: int, calib_kind: str = "sentences", nf4: bool = False) -> dict:
    from lowbit.calibration import calibration_batches, load_text_or_pydoc

    model, tok, _ = load_minilm()
    source, split = load_text_or_pydoc("python-docs")
    if calib_kind == "windows":
        ids = calibration_batches(tok, split.calibration, n_calib, 126)
        ids = torch.cat([torch.full((n_calib, 1), tok.cls_token_id), ids, torch.full((n_calib, 1), tok.sep_token_id)],
                        1)
        calib = [{"input_ids": c, "attention_mask": torch.ones_like(c), "token_type_ids": torch.zeros_like(c)}
                 for c in ids.split(32)]
    else:  # sentences of the calibration text, padded per batch (padding stays out of the Hessians)
        cal = held_sentences(split.calibration, n_calib)
        calib = [dict(tok(cal[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt"))
                 for i in range(0, len(cal), 64)]
    sents = held_sentences(split.evaluation, n_sentences)
    pairs = retrieval_pairs(split.evaluation, n_pairs)

    def embed(m, texts, max_length):
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), 64):
                e = tok(texts[i:i + 64], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                out.append(mean_pooled(m(**e).last_hidden_state, e["attention_mask"]))
        return torch.cat(out)

    def measure(m):
        s = embed(m, sents, 128)
        qv, dv = embed(m, [p[0] for p in pairs], 128), embed(m, [p[1] for p in pairs], 256)
        top = (qv @ dv.T).topk(10, dim=1).indices
        recall = float((top == torch.arange(len(pairs))[:, None]).any(1).float().mean()) * 100
        return s, recall

    ref, ref_recall = measure(model)
    rows = {"fp32": {"cosine_mean": 1.0, "cosine_min": 1.0, "recall@10": ref_recall, "linear_weight_bytes":
                     sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))}}

    def record(name, m, **extra):
        s, recall = measure(m)
        cos = (s * ref).sum(-1)
        rows[name] = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "recall@10": recall,
                      "recall_drop_points": ref_recall - recall, **extra}
        log.info("%s: %s", name, rows[name])

    variants = (("rtn", "int"), ("gptq", "int")) + ((("rtn", "nf4"), ("gptq", "nf4")) if nf4 else ())
    for method, dtype in variants:
        q = copy.deepcopy(model)
        t0 = time.time()
        lowbit.quantize_module(q, calib, method=method, bits=4, group_size=32, symmetric=dtype != "int", dtype=dtype,
                               progress=False)
        label = "W4 g32 asym" if dtype == "int" else "NF4 g32"
        record(f"lowbit {method.upper()} {label}", q, seconds=time.time() - t0,
               linear_weight_bytes=sum(m.nbytes() for m in q.modules() if isinstance(m, lowbit.nn.QuantLinear)))
    q = _peer(rows, "bitsandbytes NF4 blocksize 32", lambda: bnb_nf4(model, 32))
    if q is not None:
        record("bitsandbytes NF4 blocksize 32", q)
    what = f"{n_calib} x 128-token windows" if calib_kind == "windows" else f"{n_calib} sentences, padded batches of 64"
    return {"text": source, "calibration": what, "sentences": len(sents),
            "retrieval_pairs": len(pairs), "rows": rows}


def bnb_nf4(model, blocksize: int):
    import bitsandbytes as bnb

    q = copy.deepcopy(model)
    for name, lin in [(n, m) for n, m in q.named_modules() if isinstance(m, nn.Linear)]:
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                compute_dtype=torch.float32, quant_type="nf4")
        new.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                       blocksize=blocksize)
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        lowbit.nn.replace_linear(q, name, new.to("cpu"))
    return q


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="digits,minilm")
    ap.add_argument("--seeds", type=int, default=3, help="Digits CNN training seeds")
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--calib", choices=("sentences", "windows"), default="sentences",
                    help="MiniLM calibration: sentences of the calibration text, or 128-token windows of it")
    ap.add_argument("--calib-n", type=int, default=512, help="MiniLM calibration sentences (or windows)")
    ap.add_argument("--nf4", action="store_true", help="MiniLM: also lowbit's own NF4 g32 rows (RTN, GPTQ)")
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=500)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import lowbit.nn  # noqa: F401 - QuantLinear for the byte counts

    machine = {"threads": torch.get_num_threads(), "load_avg_at_start": os.getloadavg()[0], "torch": torch.__version__}
    for section in args.only.split(","):
        t0 = time.time()
        if section == "digits":
            res = digits(args.seeds, args.calib_images)
        elif section == "minilm":
            res = minilm(args.calib_n, args.sentences, args.pairs, args.calib, args.nf4)
        else:
            sys.exit(f"unknown section {section}")
        res["seconds"] = time.time() - t0
        res["load_avg_at_end"] = os.getloadavg()[0]
        RESULTS.parent.mkdir(exist_ok=True)
        merged = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        merged.update({"machine": machine, section: res})
        tmp = RESULTS.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(merged, indent=2) + "\n")
        tmp.replace(RESULTS)
        print(json.dumps({section: res}, indent=1), flush=True)


if __name__ == "__main__":
    main()
