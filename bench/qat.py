"""QAT and hybrid PTQ -> QAT against PTQ, same inputs, one run per section.

    PYTHONPATH=src .venv/bin/python bench/qat.py --only digits
    PYTHONPATH=src .venv/bin/python bench/qat.py --only smollm2 --scheme w3g64 --cpu-minutes 60 --block-steps 40

digits:  the Digits CNN (bench_data, trained here in seconds) at W4A8 and W2A8 (symmetric
         per-channel weights, static per-tensor int8 activations): fp32; PTQ (lowbit.ptq: min-max
         observers, RTN weights); QAT (lowbit.qat: LSQ weights and activation ranges from the same
         observers, BN folded, a few epochs of the trainer) -> convert -> Int8Conv2d / Int8Linear.
         Test accuracy of the converted integer models; recovery = (QAT - PTQ) / (fp32 - PTQ).
smollm2: the bundled SmolLM2-135M at W3 g64 asym (and --scheme w2g64): GPTQ -> Block-AP (hybrid;
         EfficientQAT's block-wise training against the fp blocks' outputs, lowbit.qat.block_ap)
         and RTN -> Block-AP, each the same training budget in process CPU time
         (--cpu-minutes; time.process_time(), all threads; 60 = 30 minutes on 2 idle cores;
         evaluations not counted). Perplexity on held-out windows (the evaluation part of --text,
         never trained on) against cumulative steps: bench/results/qat_<scheme><tag>.png; the
         hybrid result is converted, saved and reloaded through lowbit's checkpoint and written
         in the GPTQ format. On a loaded machine run one init per process (--inits gptq --tag
         _gptq, --inits rtn --tag _rtn) and merge them with --combine KEY (one entry, one plot).
Results: bench/results/qat.json (sections merged).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_data import digits_data, train_digits_cnn  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def digits(epochs: int = 6, seed: int = 0) -> dict:
    from lowbit import ptq
    from lowbit.ptq.config import PTQConfig
    from lowbit.qat import QATConfig, convert_qat, prepare_qat, qat_parameters
    from lowbit.qat.losses import classification_loss
    from lowbit.qat.trainer import TrainConfig, train
    from lowbit.spec import ActSpec, LayerScheme, QuantSpec

    xtr, xte, ytr, yte = digits_data()
    fp = train_digits_cnn(xtr, ytr, seed=seed)
    acc_fp = accuracy(fp, xte, yte)
    calib = list(xtr[:512].split(64))
    out = {"fp32_accuracy": acc_fp, "epochs": epochs, "train_samples": len(xtr), "test_samples": len(xte)}
    for bits in (4, 2):
        scheme = LayerScheme(QuantSpec(bits=bits, granularity="channel", scale_dtype="float32"),
                             ActSpec(granularity="tensor", dynamic=False))
        m = ptq.prepare(copy.deepcopy(fp), PTQConfig(scheme))
        ptq.calibrate(m, calib)
        acc_ptq = accuracy(ptq.convert(m), xte, yte)
        q = prepare_qat(copy.deepcopy(fp), QATConfig(scheme), calib=calib)
        weights, qparams = qat_parameters(q)
        steps = epochs * math.ceil(len(xtr) / 64)

        def batch_fn(step, n=len(xtr)):
            epoch, i = divmod(step, math.ceil(n / 64))
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            idx = perm[i * 64:(i + 1) * 64]
            return xtr[idx], ytr[idx]

        t0 = time.perf_counter()
        q.train()
        res = train(q, classification_loss, batch_fn, TrainConfig(steps=steps, lr=1e-3, qparam_lr=1e-3, seed=seed),
                    weights, qparams, progress=False)
        q.eval()
        secs = time.perf_counter() - t0
        with torch.no_grad():
            fake_acc = accuracy(q, xte, yte)
        convert_qat(q)
        acc_qat = accuracy(q, xte, yte)
        drop = acc_fp - acc_ptq
        key = f"w{bits}a8"
        out[key] = {"ptq_accuracy": acc_ptq, "qat_accuracy": acc_qat, "qat_fake_quant_accuracy": fake_acc,
                    "ptq_drop": drop, "qat_drop": acc_fp - acc_qat,
                    "recovery": None if drop <= 0 else (acc_qat - acc_ptq) / drop, "qat_steps": steps,
                    "qat_seconds": round(secs, 1), "final_loss": res.losses[-1]}
        print(f"digits {key}: fp32 {acc_fp:.4f}  PTQ {acc_ptq:.4f}  QAT {acc_qat:.4f}  recovery "
              f"{out[key]['recovery']}  ({steps} steps, {secs:.0f}s)", flush=True)
    return out


def ppl(model, windows) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None], use_cache=False).logits[0, :-1].float()
            nll += float(nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            n += w.numel() - 1
    return math.exp(nll / n)


def smollm2(scheme: str, cpu_minutes: float, block_steps: int, eval_every: int, eval_windows_n: int, text: str,
            lr: float, qparam_lr: float, batch: int, seq_len: int, calib_windows: int, inits: list[str],
            tag: str = "", target: str = "fp", keep_better: bool = True, holdout: int = 0, e2e_steps: int = 0,
            e2e_lr: float = 2e-5, e2e_batch: int = 1, e2e_eval_every: int = 10, ptq_cache: str | None = None,
            save_partial=None) -> dict:
    """Block-AP (EfficientQAT) from each PTQ start, then E2E-QP (scales / zeros end to end by
    distillation, `e2e_steps` > 0), the same CPU budget each (process CPU time, all threads: 60
    CPU-minutes = 30 minutes on 2 idle cores; evaluations are not counted)."""
    from lowbit.calibration import calibration_batches, eval_windows
    from lowbit.calibration.text import load_text_or_pydoc
    from lowbit.models import load_model
    from lowbit.qat.block_ap import BlockAPConfig, block_ap
    from lowbit.qat.e2e_qp import E2EQPConfig, e2e_qp
    from lowbit.qat.lm import LMQATOptions

    source, split = load_text_or_pydoc(text)
    teacher, tok = load_model("default")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    windows = eval_windows(tok, split.evaluation, 512, eval_windows_n)
    calib = calibration_batches(tok, split.calibration, calib_windows, seq_len, seed=1)
    ppl_fp = ppl(teacher, windows)
    cfg = BlockAPConfig(steps=block_steps, batch=batch, lr=lr, qparam_lr=qparam_lr, target=target,
                        keep_better=keep_better, holdout=holdout)
    e2e_cfg = E2EQPConfig(steps=e2e_steps, batch=e2e_batch, lr=e2e_lr) if e2e_steps > 0 else None
    out = {"scheme": scheme, "text": source, "eval_windows": int(windows.shape[0]), "eval_seq_len": 512,
           "fp32_ppl": ppl_fp, "method": "block-ap" + ("+e2e-qp" if e2e_cfg else ""), "cpu_minutes_budget": cpu_minutes,
           "budget_clock": "time.process_time() of this process (all threads), evaluations excluded",
           "block_ap": {k: v for k, v in cfg.__dict__.items()},
           "e2e_qp": None if e2e_cfg is None else dict(e2e_cfg.__dict__), "calib_windows": calib_windows,
           "seq_len": seq_len,
           "threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg()[0], "runs": {}}
    print(f"smollm2 {scheme}: fp32 ppl {ppl_fp:.3f} on {windows.shape[0]}x512 held-out tokens ({source})", flush=True)
    for init in inits:
        opts = LMQATOptions(scheme=scheme, init=init, data=source, seq_len=seq_len)
        student, ptq_cpu, ptq_wall = ptq_student(teacher, tok, opts, split.calibration, ptq_cache)
        p0 = ppl(student, windows)
        curve = [(0, p0, 0.0)]

        def partial(init=init, p0=p0, curve=curve, ptq_cpu=ptq_cpu):
            """the curve so far in the results file: a run stopped early keeps what it measured"""
            if save_partial is not None:
                entry = dict(out, runs={**out["runs"], init: {"partial": True, "ptq_ppl": p0, "curve": curve,
                                                              "ptq_cpu_seconds": round(ptq_cpu, 1),
                                                              "load_average_now": os.getloadavg()[0]}})
                save_partial(entry)
        print(f"  {init}: PTQ ppl {p0:.3f} ({ptq_cpu:.0f} CPU s)", flush=True)
        budget = cpu_minutes * 60
        eval_cpu = [0.0]
        c_train, t_train = time.process_time(), time.perf_counter()

        def used() -> float:
            return time.process_time() - c_train - eval_cpu[0]

        def on_block(i, res, student=student, curve=curve):
            if (i + 1) % eval_every == 0:
                c_eval = time.process_time()
                steps = sum(len(v) for v in res.losses.values())
                u = round(used(), 1)  # before the evaluation's own CPU time
                curve.append((steps, ppl(student, windows), u))
                partial()
                print(f"    block {i}: MSE {res.start_mse[i]:.4g} -> {res.end_mse[i]:.4g}; {steps} steps "
                      f"ppl {curve[-1][1]:.3f} ({curve[-1][2]:.0f} CPU s)", flush=True)
                eval_cpu[0] += time.process_time() - c_eval

        res = block_ap(student, teacher, calib, cfg, progress=False, stop=lambda: used() > budget, on_block=on_block)
        steps = sum(len(v) for v in res.losses.values())
        if curve[-1][0] != steps:
            c_eval, u = time.process_time(), round(used(), 1)
            curve.append((steps, ppl(student, windows), u))
            eval_cpu[0] += time.process_time() - c_eval
        block_ap_cpu, block_ap_ppl = used(), curve[-1][1]
        print(f"  {init}: Block-AP {block_ap_ppl:.3f} ({block_ap_cpu:.0f} CPU s)", flush=True)
        e2e_done = 0
        if e2e_cfg is not None and used() < budget:
            block_steps_total = steps

            def on_e2e(step, _loss, student=student, curve=curve):
                nonlocal e2e_done
                e2e_done = step + 1
                if e2e_done % e2e_eval_every == 0 or e2e_done == e2e_cfg.steps:
                    c_eval = time.process_time()
                    u = round(used(), 1)
                    curve.append((block_steps_total + e2e_done, ppl(student, windows), u))
                    partial()
                    print(f"    e2e-qp step {e2e_done}: ppl {curve[-1][1]:.3f} ({curve[-1][2]:.0f} CPU s)", flush=True)
                    eval_cpu[0] += time.process_time() - c_eval
                if used() > budget:
                    raise _OverBudget

            try:
                e2e_qp(student, teacher, calib, e2e_cfg, progress=False, on_step=on_e2e)
            except _OverBudget:
                pass
            if curve[-1][0] != block_steps_total + e2e_done:
                c_eval, u = time.process_time(), round(used(), 1)
                curve.append((block_steps_total + e2e_done, ppl(student, windows), u))
                eval_cpu[0] += time.process_time() - c_eval
            steps = block_steps_total + e2e_done
        train_cpu, train_wall = used(), time.perf_counter() - t_train
        p_final = curve[-1][1]
        run = {"ptq_ppl": p0, "qat_ppl": p_final, "block_ap_ppl": block_ap_ppl, "ptq_cpu_seconds": round(ptq_cpu, 1),
               "ptq_wall_seconds": round(ptq_wall, 1), "curve": curve, "steps": steps, "blocks_trained": res.blocks,
               "block_ap_steps": sum(len(v) for v in res.losses.values()), "e2e_qp_steps": e2e_done,
               "block_ap_cpu_seconds": round(block_ap_cpu, 1),
               "stopped_at_block": res.stopped_at, "kept_start_blocks": res.kept_start,
               "train_cpu_seconds_excl_eval": round(train_cpu, 1),
               "train_wall_seconds_incl_eval": round(train_wall, 1), "load_average_at_end": os.getloadavg()[0],
               "block_mse": {i: [res.start_mse[i], res.end_mse[i]] for i in res.end_mse}}
        out["runs"][init] = run
        print(f"  {init}: PTQ {p0:.3f} -> Block-AP {p_final:.3f} ({res.blocks} blocks, {train_cpu:.0f} CPU s, "
              f"{train_wall:.0f} s wall)", flush=True)
        if init == "gptq":
            run["export"] = export_check(student, tok, windows[:2])
        del student
    if "gptq" in out["runs"]:
        g = out["runs"]["gptq"]
        inc = g["ptq_ppl"] - ppl_fp
        out["hybrid_cut_of_gptq_increase"] = (g["ptq_ppl"] - g["qat_ppl"]) / inc if inc > 0 else None
        if "rtn" in out["runs"]:
            out["hybrid_beats_rtn_qat"] = g["qat_ppl"] < out["runs"]["rtn"]["qat_ppl"]
    plot(out, RESULTS / f"qat_{scheme}{tag}.png")
    return out


class _OverBudget(Exception):
    pass


def ptq_student(teacher, tok, opts, calib_text: str, cache: str | None):
    """(student prepared for QAT from its PTQ records, PTQ CPU s, PTQ wall s). With `cache` (a
    folder) the records are saved once per (scheme, init, text, calibration size) and reused, so a
    rerun with other training settings skips GPTQ (its CPU / wall seconds are the first run's)."""
    from lowbit.qat import QATConfig, prepare_qat, qat_scheme
    from lowbit.qat.lm import prepare_lm_student

    file = None if cache is None else Path(cache) / f"{opts.scheme}-{opts.init}-{opts.data}-{opts.calib_samples}x{opts.seq_len}.pt"
    if file is not None and file.is_file():
        saved = torch.load(file, weights_only=False)
        student = copy.deepcopy(teacher)
        prepare_qat(student, QATConfig(qat_scheme(opts.scheme), targets=tuple(saved["records"]),
                                       learn_zero=opts.learn_zero), init=saved["records"])
        return student, saved["cpu"], saved["wall"]
    c0, t0 = time.process_time(), time.perf_counter()
    student, records = prepare_lm_student(teacher, tok, opts, calib_text, progress=False)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"records": records, "cpu": cpu, "wall": wall}, file.with_suffix(".tmp"))
        file.with_suffix(".tmp").rename(file)
    return student, cpu, wall


def export_check(student, tok, windows) -> dict:
    """convert -> lowbit checkpoint -> reload (same logits) -> GPTQ (v2) format written."""
    import lowbit
    from lowbit.export import format_module
    from lowbit.export.model import QuantizedModel
    from lowbit.qat import convert_qat

    with torch.no_grad():
        fake = student(input_ids=windows, use_cache=False).logits
    records = convert_qat(student)
    with torch.no_grad():
        real = student(input_ids=windows, use_cache=False).logits
    with tempfile.TemporaryDirectory() as d:
        qm = QuantizedModel.from_model(student, tok, records, method="qat+gptq")
        format_module("lowbit").write(qm, Path(d) / "ckpt")
        back, _ = lowbit.load(Path(d) / "ckpt")
        with torch.no_grad():
            again = back(input_ids=windows, use_cache=False).logits
        info = {"converted_vs_fake_max_abs_logit": float((real - fake).abs().max()),
                "reloaded_vs_converted_max_abs_logit": float((again - real).abs().max())}
        try:
            # v2: trained asymmetric grids can hold a zero point of 0, which v1 (stores z - 1) cannot
            format_module("gptq").write(qm, Path(d) / "gptq", checkpoint_format="gptq_v2")
            info["gptq_format_files"] = sorted(p.name for p in (Path(d) / "gptq").iterdir())
        except Exception as e:  # a format that cannot hold the spec says so
            info["gptq_format_error"] = f"{type(e).__name__}: {e}"
    return info


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    method = "Block-AP + E2E-QP" if out.get("e2e_qp") else "Block-AP"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for init, label in (("gptq", f"hybrid GPTQ -> {method}"), ("rtn", f"RTN -> {method}")):
        if init not in out["runs"]:
            continue
        c = out["runs"][init]["curve"]
        axes[0].plot([s for s, _, _ in c], [p for _, p, _ in c], marker="o", label=label)
        axes[1].plot([t / 60 for _, _, t in c], [p for _, p, _ in c], marker="o", label=label)
    for ax in axes:
        ax.axhline(out["fp32_ppl"], color="gray", linestyle="--", label=f"fp32 ({out['fp32_ppl']:.2f})")
        ax.set_yscale("log")
    axes[0].set_xlabel("training steps (block-wise, then end-to-end; cumulative)")
    axes[1].set_xlabel("training CPU minutes (process time, evaluations excluded)")
    axes[0].set_ylabel("perplexity (held-out)")
    axes[0].legend()
    fig.suptitle(f"SmolLM2-135M {out['scheme']}: {method}, {out['cpu_minutes_budget']:g} CPU-min/run")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def combine(results: dict, scheme: str, key: str) -> dict:
    """One entry (and the two-curve plot) from runs made one init per process (`--inits gptq
    --tag _gptq`, then `--inits rtn --tag _rtn`): the same settings, one after the other."""
    parts = [results[k] for k in (f"smollm2_{scheme}_gptq", f"smollm2_{scheme}_rtn") if k in results]
    if not parts:
        raise SystemExit(f"no smollm2_{scheme}_gptq / _rtn entries in {RESULTS / 'qat.json'}")
    out = {k: v for k, v in parts[0].items() if k not in ("runs", "hybrid_cut_of_gptq_increase")}
    out["runs"] = {init: run for part in parts for init, run in part["runs"].items()}
    g = out["runs"].get("gptq")
    if g is not None:
        inc = g["ptq_ppl"] - out["fp32_ppl"]
        out["hybrid_cut_of_gptq_increase"] = (g["ptq_ppl"] - g["qat_ppl"]) / inc if inc > 0 else None
        if "rtn" in out["runs"]:
            out["hybrid_beats_rtn_qat"] = g["qat_ppl"] < out["runs"]["rtn"]["qat_ppl"]
    plot(out, RESULTS / f"qat_{key.removeprefix('smollm2_')}.png")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="digits,smollm2")
    ap.add_argument("--scheme", default="w3g64")
    ap.add_argument("--cpu-minutes", type=float, default=60.0,
                    help="training budget per run in process CPU minutes (60 = 30 min on 2 idle cores)")
    ap.add_argument("--block-steps", type=int, default=40, help="Block-AP optimizer steps per block")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--inits", default="gptq,rtn")
    ap.add_argument("--eval-every", type=int, default=10, help="blocks between evaluations")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--text", default="python-docs")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--qparam-lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--tag", default="", help="suffix of the result key and the plot (several settings side by side)")
    ap.add_argument("--combine", default=None, help="only merge smollm2_<scheme>_gptq / _rtn into this key + plot")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1: one process per core)")
    ap.add_argument("--target", default="fp", choices=("fp", "quantized"),
                    help="Block-AP target: the fp model's stream, or the fp block on the quantized stream's inputs")
    ap.add_argument("--no-keep-better", action="store_true", help="keep a block's training even when it made it worse")
    ap.add_argument("--holdout", type=int, default=0, help="calibration chunks that judge keep-better, never trained on")
    ap.add_argument("--e2e-steps", type=int, default=0, help="E2E-QP steps after Block-AP (0: off)")
    ap.add_argument("--e2e-lr", type=float, default=2e-5)
    ap.add_argument("--e2e-batch", type=int, default=1)
    ap.add_argument("--e2e-eval-every", type=int, default=10)
    ap.add_argument("--ptq-cache", default=None, help="folder: save / reuse the PTQ records (reruns skip GPTQ)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from lowbit.nn import cpu_kernels

    cpu_kernels.load()  # the kernels (after torch), or the pure-torch path when not built / not supported

    path = RESULTS / "qat.json"

    def merge(entries: dict) -> None:  # read at write time: runs may overlap; atomic rename
        merged = json.loads(path.read_text()) if path.is_file() else {}
        merged.update(entries)
        tmp = path.parent / f"{path.name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(merged, indent=2))
        tmp.replace(path)

    if args.combine:
        merged = json.loads(path.read_text())
        merged[args.combine] = combine(merged, args.scheme, args.combine)
        c = merged[args.combine]
        print(f"{args.combine}: hybrid cut of GPTQ's increase {c.get('hybrid_cut_of_gptq_increase')}, "
              f"beats RTN -> Block-AP: {c.get('hybrid_beats_rtn_qat')}")
        path.write_text(json.dumps(merged, indent=2))
        return
    only = args.only.split(",")
    results = {}
    if "digits" in only:
        results["digits"] = digits()
    if "smollm2" in only:
        results[f"smollm2_{args.scheme}{args.tag}"] = smollm2(
            args.scheme, args.cpu_minutes, args.block_steps, args.eval_every, args.eval_windows, args.text, args.lr,
            args.qparam_lr, args.batch, args.seq_len, args.calib_windows, args.inits.split(","), args.tag,
            args.target, not args.no_keep_better, args.holdout, args.e2e_steps, args.e2e_lr, args.e2e_batch,
            args.e2e_eval_every, args.ptq_cache,
            save_partial=lambda entry: merge({f"smollm2_{args.scheme}{args.tag}": entry}))
    RESULTS.mkdir(exist_ok=True)
    merge(results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
