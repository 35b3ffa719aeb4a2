"""Calibrated weight quantization of a CNN and an encoder, lowbit beside its peers, one run, same inputs.

    make bench-venv-peers                                         # torchao + optimum-quanto beside the main venv
    PYTHONPATH=src bench/.venv-peers/bin/python bench/cnn_encoder.py                  # digits, minilm
    PYTHONPATH=src bench/.venv-peers/bin/python bench/cnn_encoder.py --only digits    # one section (merged)
    PYTHONPATH=src bench/.venv-peers/bin/python bench/cnn_encoder.py --only onnx      # ONNX export + onnxruntime
    .venv/bin/python bench/cnn_encoder.py --only tflite                               # TFLite export + ai-edge-litert

digits:  the Digits CNN (bench_data: trained here on load_digits, BatchNorm folded into the convs),
         for several training seeds: fp32; lowbit RTN, AWQ (scales folded into the conv / Linear
         before each ReLU, `module_awq`) and GPTQ (`lowbit.quantize_module`, convs on
         their unfolded-patch Hessian) at W4 and W3 symmetric per output channel, every conv and
         Linear; optimum-quanto qint4 weights (convs and Linears; it has no 3-bit type); torchao
         IntxWeightOnly int4 / int3 per channel (it quantizes the Linears only; the convs stay fp32);
         lowbit GPTQ mixed precision at 3.0 bits per weight (`target_bpw`, scales included) beside
         uniform GPTQ W3 and W2 per channel.
         Test accuracy (540 held-out images), its drop from fp32, bytes of the state dict.
minilm:  all-MiniLM-L6-v2 at W4 g32: lowbit RTN, AWQ (post-LN: only value -> attention output can
         absorb a scale; the rest is AWQ's clip search) and GPTQ, int4 asymmetric (fp16 scale + zero per 32:
         5 bits per weight; with --nf4 also NF4, fp16 scale per 32: 4.5 bits), against bitsandbytes NF4
         blocksize 32 (fp32 absmax per 32: 5 bits) on the CPU. Calibration (--calib): 512 sentences of
         the python-docs calibration text in padded batches (default; padding stays out of the
         Hessians), or 128-token windows of it. Held out: cosine of the mean-pooled sentence
         embeddings to fp32 on evaluation-text sentences, and retrieval
         recall@10 on evaluation-text paragraphs (query = first sentence, document = the rest,
         ranked against all documents).
onnx:    lowbit's results exported to ONNX (DequantizeLinear of the integer codes) and run by
         onnxruntime: Digits GPTQ W4 and mixed 3.0 bpw, MiniLM RTN W4 g32; accuracy / cosine beside
         lowbit's own kernels, file sizes.
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
from lowbit.calibration.sentences import clean_rst, sentence_batches, text_sentences
from lowbit.mixed.measure import storage_bits
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

    def lowbit_row(label, **kw):
        q = copy.deepcopy(model)
        t0 = time.time()
        rec = lowbit.quantize_module(q, calib, group_size=None, progress=False, **kw)
        rows[label] = {**acc(q), "weight_bytes": nbytes(q), "layers": len(rec), "seconds": time.time() - t0,
                       "bits_per_weight": sum(storage_bits(n, r) for n, r in rec.items())
                       / sum(r.codes.numel() for r in rec.values())}

    for bits in (4, 3):
        for method in ("rtn", "awq", "gptq"):
            lowbit_row(f"lowbit {method.upper()} W{bits} per-channel", method=method, bits=bits, symmetric=True)
        name = f"torchao IntxWeightOnly int{bits} per-channel (Linears only)"
        q = _peer(rows, name, lambda b=bits: torchao_intx(model, b))
        if q is not None:
            rows[name] = {**acc(q), "weight_bytes": nbytes(q)}
    # mixed precision at 3.0 bits per weight (scales included) against uniform 3 and 2 bits
    lowbit_row("lowbit GPTQ mixed 3.0 bpw (2/3/4/8 bits x g32/g64/g128/channel)", method="gptq", target_bpw=3.0)
    for sym in (True, False):
        lowbit_row(f"lowbit GPTQ W2 {'sym' if sym else 'asym'} per-channel", method="gptq", bits=2, symmetric=sym)
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
                   "weight_bytes": per_seed[0][k]["weight_bytes"],
                   **({"bits_per_weight": per_seed[0][k]["bits_per_weight"]} if "bits_per_weight" in per_seed[0][k] else {})}
    return {"test_images": len(xte), "calibration_images": calib_n, "seeds": seeds,
            "note": "BatchNorm folded into the convs before every variant; drop = fp32 accuracy - variant's, "
                    "same seed", "rows": rows}


# ---- MiniLM ---------------------------------------------------------------------------------------
def retrieval_pairs(text: str, n: int) -> list[tuple[str, str]]:
    """(query, document) from prose paragraphs: the first sentence, and the rest of the paragraph."""
    pairs, seen = [], set()
    for para in text.split("\n\n"):
        lines = para.strip("\n").splitlines()
        if not lines or any(ln.startswith((" ", "\t", "..", "=", "-", "*", ">>>", ":", "+", "|")) for ln in lines):
            continue
        p = clean_rst(para)
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


held_sentences = text_sentences  # the library's sentence split (also the encoder CLI's calibration)


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
        calib = sentence_batches(tok, split.calibration, n_calib, 128)
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

    variants = (("rtn", "int"), ("awq", "int"), ("gptq", "int")) + ((("rtn", "nf4"), ("gptq", "nf4")) if nf4 else ())
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


# ---- ONNX ----------------------------------------------------------------------------------------
def tflite_export(calib_images: int) -> dict:
    """lowbit's weight-only GPTQ results on the Digits CNN (seed 0) exported to TFLite
    (export/tflite_weights.py: int8 codes per channel, DEQUANTIZE, float ops) and run by
    ai-edge-litert's interpreter, beside lowbit's own kernels."""
    import tempfile

    from ai_edge_litert.interpreter import Interpreter

    from lowbit.export.tflite_weights import export_weight_only

    tmp = Path(tempfile.mkdtemp(prefix="lowbit-tflite-"))
    rows = {}
    xtr, xte, ytr, yte = digits_data()
    model = train_digits_cnn(xtr, ytr, seed=0)
    fold_batchnorm(model)
    calib = list(xtr[:calib_images].split(128))
    rows["digits fp32 parameters"] = {"bytes": sum(p.numel() * 4 for p in model.parameters())}
    for bits in (4, 3):
        q = copy.deepcopy(model)
        rec = lowbit.quantize_module(q, calib, method="gptq", bits=bits, group_size=None, progress=False)
        path = export_weight_only(q, rec, xte[:1], tmp / f"w{bits}.tflite")
        it = Interpreter(model_path=str(path))
        inp = it.get_input_details()[0]
        it.resize_tensor_input(inp["index"], list(xte.shape))
        it.allocate_tensors()
        it.set_tensor(inp["index"], xte.numpy())
        it.invoke()
        y = torch.from_numpy(it.get_tensor(it.get_output_details()[0]["index"]).copy())
        with torch.no_grad():
            ours = q(xte)
        label = f"digits lowbit GPTQ W{bits} per-channel -> TFLite (ai-edge-litert)"
        rows[label] = {
            "file_bytes": path.stat().st_size, "accuracy_tflite": float((y.argmax(1) == yte).float().mean()) * 100,
            "accuracy_lowbit": float((ours.argmax(1) == yte).float().mean()) * 100,
            "same_prediction_as_lowbit": float((y.argmax(1) == ours.argmax(1)).float().mean()) * 100,
            "logits_max_rel_diff_to_lowbit": float((y - ours).abs().max() / ours.abs().max())}
        log.info("%s: %s", label, rows[label])
    return rows


def onnx_export(calib_images: int, n_sentences: int) -> dict:
    """lowbit's weight-only results exported to ONNX (export/onnx_weights.py) and run by onnxruntime:
    the Digits CNN (seed 0) at GPTQ W4 per channel and mixed 3.0 bpw, MiniLM at RTN W4 g32 asym
    (GPTQ's records export the same way; RTN keeps the run short)."""
    import tempfile

    import onnxruntime as ort

    from lowbit.export.onnx_weights import export_weight_only

    tmp = Path(tempfile.mkdtemp(prefix="lowbit-onnx-"))
    rows = {}
    xtr, xte, ytr, yte = digits_data()
    model = train_digits_cnn(xtr, ytr, seed=0)
    fold_batchnorm(model)
    calib = list(xtr[:calib_images].split(128))
    torch.onnx.export(model, (xte[:2],), str(tmp / "fp32.onnx"), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    rows["digits fp32 (torch.onnx.export)"] = {"file_bytes": (tmp / "fp32.onnx").stat().st_size}
    for label, kw in (("GPTQ W4 per-channel", dict(bits=4)), ("GPTQ mixed 3.0 bpw", dict(target_bpw=3.0))):
        q = copy.deepcopy(model)
        rec = lowbit.quantize_module(q, calib, method="gptq", group_size=None, progress=False, **kw)
        path = export_weight_only(q, rec, (xte[:2],), tmp / "q.onnx", input_names=["x"], dynamic_axes={"x": {0: "n"}})
        y = torch.from_numpy(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                             .run(None, {"x": xte.numpy()})[0])
        with torch.no_grad():
            ours = q(xte)
        rows[f"digits lowbit {label} -> onnxruntime"] = {
            "file_bytes": path.stat().st_size, "accuracy_onnxruntime": float((y.argmax(1) == yte).float().mean()) * 100,
            "accuracy_lowbit": float((ours.argmax(1) == yte).float().mean()) * 100,
            "same_prediction_as_lowbit": float((y.argmax(1) == ours.argmax(1)).float().mean()) * 100,
            "logits_max_rel_diff_to_lowbit": float((y - ours).abs().max() / ours.abs().max())}
        log.info("%s: %s", label, rows[f"digits lowbit {label} -> onnxruntime"])

    m, tok, _ = load_minilm()
    from lowbit.calibration import load_text_or_pydoc

    _, split = load_text_or_pydoc("python-docs")
    sents = held_sentences(split.evaluation, n_sentences)
    enc = dict(tok(sents, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    names = ["input_ids", "attention_mask"]

    class Hidden(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    with torch.no_grad():
        ref = mean_pooled(Hidden(m)(*(enc[n] for n in names)), enc["attention_mask"])
    q = copy.deepcopy(m)
    rec = lowbit.quantize_module(q, [dict(tok(sents[:2], padding=True, return_tensors="pt"))], method="rtn",
                                 bits=4, group_size=32, symmetric=False, progress=False)
    w = Hidden(q).eval()
    path = export_weight_only(w, {f"m.{k}": v for k, v in rec.items()}, tuple(enc[n][:2] for n in names), tmp / "minilm.onnx", input_names=names,
                              dynamic_axes={n: {0: "b", 1: "t"} for n in names})
    y = torch.from_numpy(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                         .run(None, {n: enc[n].numpy() for n in names})[0])
    e_ort = mean_pooled(y, enc["attention_mask"])
    with torch.no_grad():
        e_ours = mean_pooled(w(*(enc[n] for n in names)), enc["attention_mask"])
    rows["minilm lowbit RTN W4 g32 asym -> onnxruntime"] = {
        "file_bytes": path.stat().st_size,
        "cosine_onnxruntime_to_lowbit_min": float((e_ort * e_ours).sum(-1).min()),
        "cosine_onnxruntime_to_fp32_mean": float((e_ort * ref).sum(-1).mean()),
        "cosine_lowbit_to_fp32_mean": float((e_ours * ref).sum(-1).mean()),
        "note": "file includes the float32 word embeddings (46.9 MB), which lowbit leaves unquantized"}
    return {"sentences": len(sents), "rows": rows}


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
    ap.add_argument("--only", default="digits,minilm,onnx")
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
        elif section == "onnx":
            res = onnx_export(args.calib_images, args.sentences)
        elif section == "tflite":
            res = tflite_export(args.calib_images)
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
