"""`lowbit report`: any set of checkpoints against the original, every figure in one JSON.

    check_report_inputs(...)          before anything loads: paths, output folder, text source
    build_report(original, ckpts)     -> dict (quality, KL percentiles, size, bits, speed, tasks,
                                         per-layer error, quantize stats, Pareto fronts)
    write_report(report, out)         report.json, report.md, report.html and the PNG plots, atomically

Quality reuses `lowbit eval`'s code and text split (`eval.quality.quality_many`,
`calibration.eval_windows` on the held-out part); speed reuses `eval.speed`. Checkpoints in any
format `lowbit.export` reads (lowbit, gptq, awq, compressed-tensors, bnb-nf4, gguf) load through
their readers into the same tables.
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.io.atomic import check_output_dir

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_KIND = "lowbit-report"
REPORT_VERSION = 1
# config fields that must agree between the original and a checkpoint of it
SAME_MODEL_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads")


@dataclass(frozen=True)
class ReportOptions:
    text: str = "pydoc"
    seq_len: int = 512
    windows: int = 16
    speed: bool = True
    decode_tokens: int = 32
    prefill_len: int = 256
    tasks: bool = True
    task_questions: int = 100
    lm_eval_tasks: tuple[str, ...] = ("arc_easy", "piqa", "hellaswag", "lambada_openai", "winogrande")
    lm_eval_limit: int | None = 100
    layer_windows: int = 4
    layer_seq_len: int = 256
    seed: int = 0
    progress: bool = True
    labels: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------------------------------------
# checks before any model loads


def check_report_dir(out: str | Path, overwrite: bool, protect: tuple = ()) -> Path:
    """Refuse an output folder before any work (io.atomic.check_output_dir's rules); with `overwrite`
    only an earlier report (a folder with report.json) or an empty folder is replaced."""
    return check_output_dir(
        out, overwrite, protect, replaceable=lambda p: (p / REPORT_JSON).is_file(),
        hint="name a new folder, e.g. -o report",
        refusal=f"output folder {{path}} holds no {REPORT_JSON} and is not empty; --overwrite only replaces an "
                "earlier report or an empty folder: choose another output folder")


def check_report_inputs(original: str, checkpoints: list[str], out, overwrite: bool, text: str) -> None:
    """Every path exists and names something lowbit reads, the output folder may be written, the
    text source reads; nothing loads."""
    from lowbit.calibration.text import check_text_source
    from lowbit.models.loader import resolve_source

    if not checkpoints:
        raise LowbitError("no checkpoint given; pass the original and one or more checkpoints: "
                          "lowbit report ORIGINAL CKPT... -o DIR")
    resolve_source(original)
    for ckpt in checkpoints:
        kind, _ = resolve_source(ckpt)
        if kind == "hub":
            raise LowbitError(f"{ckpt} does not exist (no such file or folder); a report reads local checkpoints")
    check_text_source(text)
    check_report_dir(out, overwrite, protect=tuple(c for c in [original, *checkpoints] if c != "default"))


def read_config(source: str):
    """The transformers config of a model argument, without loading weights."""
    from transformers import AutoConfig

    from lowbit.models.loader import default_model_dir, resolve_source

    kind, path = resolve_source(source)
    if kind == "default":
        path = default_model_dir()
    try:
        if path is not None and path.is_file():
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoConfig.from_pretrained(str(path) if path is not None else source)
    except Exception as e:
        raise LowbitError(f"{source}: cannot read its configuration ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]})") from None


def check_same_model(original_config, config, original: str, ckpt: str) -> None:
    """A checkpoint of another model (another architecture or shape) is bad input naming the file."""
    for key in SAME_MODEL_FIELDS:
        a, b = getattr(original_config, key, None), getattr(config, key, None)
        if a is not None and b is not None and a != b:
            raise LowbitError(f"{ckpt} is a checkpoint of another model than {original}: its {key} is {b}, the "
                              f"original's {a}; pass checkpoints quantized from {original}")


# ---------------------------------------------------------------------------------------------
# loading


def load_checkpoint(path: str):
    """(model, QuantizedModel or None, format) — through the export readers for quantized
    checkpoints (gguf included, as its quantized records), else as a plain model."""
    from lowbit.export import detect_format, read
    from lowbit.models import load_model
    from lowbit.models.validate import check_finite_model

    fmt = detect_format(path)
    if fmt is None:
        model, _ = load_model(path)
        return model, None, "hf"
    qm = read(path, fmt)
    model = qm.to_module()
    check_finite_model(model, str(path))
    return model, qm, fmt


def disk_bits_per_weight(model, summary: dict | None, names: list[str]) -> float:
    """Storage bits per weight of the decoder blocks' Linears `names`: the records' (codes, fp16
    scales, zeros, g_idx: lowbit's layout; `layer_error.record_summary`) for quantized ones, the
    dtype's width for the others."""
    bits = n = 0.0
    for name in names:
        if summary is not None and name in summary:
            count = summary[name]["count"]
            bits += summary[name]["bits_per_weight"] * count
        else:
            weight = model.get_submodule(name).weight
            count = weight.numel()
            bits += torch.finfo(weight.dtype).bits * count
        n += count
    return bits / n


def _unique_labels(paths: list[str], given: tuple[str, ...]) -> list[str]:
    labels = list(given) if given else [Path(p).name.removesuffix(".gguf") if p != "default" else p for p in paths]
    if len(labels) != len(paths):
        raise LowbitError(f"--label given {len(given)} times for {len(paths)} checkpoints; give one per checkpoint")
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return out


# ---------------------------------------------------------------------------------------------
# measuring


def build_report(original: str, checkpoints: list[str], opts: ReportOptions = ReportOptions()) -> dict:
    """Every figure of the report as plain data (see the module docstring)."""
    from lowbit import __version__
    from lowbit.calibration import calibration_batches, eval_windows, load_text
    from lowbit.eval import layer_error
    from lowbit.eval.kl_stats import kl_summary
    from lowbit.eval.pareto import pareto_front
    from lowbit.eval.quality import quality_many
    from lowbit.eval.size import bits_per_weight, disk_bytes, memory_bytes
    from lowbit.models import load_model
    from lowbit.models.loader import default_model_dir

    torch.manual_seed(opts.seed)
    orig_config = read_config(original)
    for ckpt in checkpoints:  # another model's checkpoint fails before anything heavy loads
        check_same_model(orig_config, read_config(ckpt), original, ckpt)
    labels = _unique_labels(checkpoints, opts.labels)
    orig_model, tokenizer = load_model(original)
    orig_path = default_model_dir() if original == "default" else Path(original)
    names = layer_error.block_linear_names(orig_model)

    loaded, summaries = {}, {}
    for label, ckpt in zip(labels, checkpoints):
        log.info("loading %s", ckpt)
        loaded[label] = (ckpt, *load_checkpoint(ckpt))
        qm = loaded[label][2]
        summaries[label] = None if qm is None else layer_error.record_summary(qm.layers, names)

    split = load_text(opts.text)
    windows = eval_windows(tokenizer, split.evaluation, opts.seq_len, opts.windows)
    models = {label: entry[1] for label, entry in loaded.items()}
    names_of = {"original": f"the original model {original}",
                **{label: f"the checkpoint {entry[0]}" for label, entry in loaded.items()}}
    orig_q, quals = quality_many(orig_model, models, windows, opts.progress, labels=names_of, kl_values=True)

    rows = [{"label": "original", "path": str(original), "format": "original", "method": None,
             "perplexity": orig_q["perplexity"], "kl": 0.0, "kl_stats": None, "top1_agreement": 1.0,
             "bits_per_weight": disk_bits_per_weight(orig_model, None, names),
             "bits_per_weight_memory": bits_per_weight(orig_model), "size_bytes": disk_bytes(orig_path),
             "memory_bytes": memory_bytes(orig_model), "quantize_stats": None}]
    for label, (ckpt, model, qm, fmt) in loaded.items():
        q = quals[label]
        meta = qm.meta if qm is not None else {}
        rows.append({"label": label, "path": str(ckpt), "format": fmt, "method": meta.get("method"),
                     "perplexity": q["perplexity"], "kl": q["kl"], "kl_stats": kl_summary(q["kl_values"]),
                     "top1_agreement": q["top1_agreement"],
                     "bits_per_weight": disk_bits_per_weight(model, summaries[label], names),
                     "bits_per_weight_memory": bits_per_weight(model), "size_bytes": disk_bytes(ckpt),
                     "memory_bytes": memory_bytes(model), "quantize_stats": meta.get("quantize_stats")})
    del quals

    all_models = {"original": orig_model, **models}
    if opts.speed:
        from lowbit.eval.speed import (decode_tokens_per_s, machine_busy, prefill_tokens_per_s,
                                       runtime_decode_tokens_per_s)

        busy, load, cores = machine_busy()
        prompt, prefill = windows[:1, :16], windows[:1, :opts.prefill_len]
        for row in _progress(rows, "speed", opts.progress):
            model = all_models[row["label"]]
            row["decode_tokens_per_s"] = decode_tokens_per_s(model, prompt, opts.decode_tokens)
            row["runtime_decode_tokens_per_s"] = runtime_decode_tokens_per_s(model, prompt, opts.decode_tokens)
            row["prefill_tokens_per_s"] = prefill_tokens_per_s(model, prefill)
        speed_note = {"busy": busy, "load_average": load, "cores": cores, "decode_tokens": opts.decode_tokens,
                      "prompt_tokens": int(prompt.shape[1]), "prefill_tokens": int(prefill.shape[1]),
                      "threads": torch.get_num_threads()}
    else:
        for row in rows:
            row["decode_tokens_per_s"] = row["prefill_tokens_per_s"] = row["runtime_decode_tokens_per_s"] = None
        speed_note = None

    task_info = None
    if opts.tasks:
        task_info = _run_tasks(all_models, tokenizer, rows, opts)

    # per-layer error: stored by the record, else measured on calibration windows
    layers, hessians = {}, None
    for label, (ckpt, model, qm, fmt) in loaded.items():
        if qm is None:
            continue
        errs = layer_error.record_errors(summaries[label])
        missing = [n for n in summaries[label] if n not in errs]
        note = None
        if missing and opts.layer_windows > 0:
            if not layer_error.norms_match(orig_model, qm.tensors):
                note = ("the checkpoint's norm weights differ from the original's (scales folded in, as AWQ "
                        "does): its layers cannot be compared with the original's weights")
            else:
                if hessians is None:
                    ids = calibration_batches(tokenizer, split.calibration, opts.layer_windows, opts.layer_seq_len,
                                              seed=opts.seed)
                    hessians = layer_error.input_hessians(orig_model, ids, opts.progress)
                errs.update(layer_error.measured_errors(orig_model, qm.layers, missing, hessians, opts.progress,
                                                        f"layer errors of {label}"))
        layers[label] = {"layers": {n: errs[n] for n in names if n in errs}, "note": note}
    del hessians

    points = [(r["bits_per_weight"], r["perplexity"]) for r in rows]
    kl_points = [(r["bits_per_weight"], r["kl"]) for r in rows[1:]]
    pareto = {"perplexity": [rows[i]["label"] for i in pareto_front(points)],
              "kl": [rows[1:][i]["label"] for i in pareto_front(kl_points)]}
    return {
        "kind": REPORT_KIND, "version": REPORT_VERSION, "lowbit_version": __version__,
        "original": str(original),
        "text": {"source": opts.text, "part": "held-out", "windows": int(windows.shape[0]), "seq_len": int(opts.seq_len),
                 "tokens": orig_q["eval_tokens"]},
        "seed": opts.seed, "options": {k: v for k, v in asdict(opts).items() if k != "progress"},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
        "checkpoints": rows, "pareto": pareto, "speed": speed_note, "tasks": task_info, "layer_errors": layers,
    }


def _progress(items, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not enabled, unit="model")


def _run_tasks(all_models: dict, tokenizer, rows: list[dict], opts: ReportOptions) -> dict:
    """lm-eval's tasks whose data loads offline; lowbit's own multiple-choice task where none does."""
    from lowbit.eval import lm_eval_tasks, tasks

    runnable, why = lm_eval_tasks.offline_tasks(tuple(opts.lm_eval_tasks)) if opts.lm_eval_tasks else ([], {})
    if runnable:
        for row in _progress(rows, "lm-eval tasks", opts.progress):
            row["tasks"] = lm_eval_tasks.run_tasks(all_models[row["label"]], tokenizer, runnable,
                                                   opts.lm_eval_limit, opts.seed)
        return {"scorer": "lm-eval", "tasks": runnable, "limit": opts.lm_eval_limit, "unavailable": why}
    questions = tasks.pydoc_questions(opts.task_questions, seed=opts.seed)
    requests = tasks.requests_of(questions)
    for row in _progress(rows, "multiple-choice task", opts.progress):
        lls = tasks.loglikelihoods(all_models[row["label"]], tokenizer, requests, progress=False)
        row["tasks"] = {tasks.TASK_NAME: tasks.score_questions(questions, [ll for ll, _ in lls])}
    return {"scorer": "lowbit", "tasks": [tasks.TASK_NAME], "questions": len(questions),
            "choices": len(questions[0].choices) if questions else 0, "unavailable": why,
            "why": ("no lm-eval task's data loads offline" if why else "no lm-eval task requested")
            + "; lowbit's own multiple-choice scoring (lm-eval's log-likelihood arithmetic) on stdlib "
              "pydoc_data.topics paragraphs"}


# ---------------------------------------------------------------------------------------------
# writing


def write_report(report: dict, out: str | Path, overwrite: bool = False) -> Path:
    """report.json, report.md, report.html and the PNG plots into `out`, atomically (all or nothing)."""
    from lowbit.eval import plots, report_render
    from lowbit.io.atomic import atomic_dir

    out = check_report_dir(out, overwrite)
    with atomic_dir(out) as tmp:
        figures = plots.write_plots(report, tmp)
        report = {**report, "figures": figures}
        (tmp / REPORT_JSON).write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        (tmp / "report.md").write_text(report_render.markdown(report))
        (tmp / "report.html").write_text(report_render.html(report))
    log.info("wrote the report to %s", out)
    return out


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
