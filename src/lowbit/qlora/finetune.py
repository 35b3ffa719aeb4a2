"""`lowbit finetune` end to end: load, adapt, train (resumable), save the adapters in peft's format,
optionally merge them into the original model and save it as a Hugging Face folder.

OUT/ after a run: adapter/ (peft LoRA folder), metrics.json, checkpoint/ (for resuming),
merged/ with --merge (quantize it with any lowbit method: `lowbit quantize OUT/merged ...`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from lowbit.calibration.text import check_text_source
from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_dir, atomic_write_bytes
from lowbit.qlora import checkpoint
from lowbit.qlora.adapt import LoraConfig, adapt
from lowbit.qlora.data import load_dataset
from lowbit.qlora.peft_io import save_adapter
from lowbit.qlora.trainer import TrainConfig, perplexity, train

log = logging.getLogger(__name__)


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LowbitError(f"-o {out} is a file; name a folder for the fine-tuning run")
    if out.is_dir() and any(out.iterdir()) and not ((out / checkpoint.FOLDER).is_dir() or (out / "adapter").is_dir()):
        raise LowbitError(f"-o {out} exists and is not a lowbit finetune folder; name a new folder")
    if Path.cwd().resolve() == out.resolve() or out.resolve() in Path.cwd().resolve().parents:
        raise LowbitError(f"-o {out} is the current folder or one of its parents; name a new folder")


def finetune(model_source: str, data: str, out: str | Path, lora: LoraConfig, cfg: TrainConfig, *,
             seq_len: int = 256, eval_windows: int = 16, max_chars: int | None = 2_000_000,
             merge: bool = False, eval_before: bool = False) -> dict:
    from lowbit.models import load_model

    out = Path(out)
    check_out(out)
    if not (data.endswith(".jsonl") and Path(data).is_file()):
        check_text_source(data)
    lazy = lora.quant_type is not None
    try:
        model, tokenizer = load_model(model_source, dtype=torch.float32, lazy=lazy)
    except LowbitError:
        if not lazy:
            raise
        model, tokenizer = load_model(model_source, dtype=torch.float32)
    dataset = load_dataset(data, tokenizer, seq_len=seq_len, max_eval_windows=eval_windows, max_chars=max_chars)
    log.info("data %s: %d training and %d held-out %s examples of %d tokens", data, len(dataset.train),
             len(dataset.eval), dataset.kind, seq_len)
    adapted = adapt(model, lora, base_name=str(model_source))
    before = perplexity(adapted.model, dataset.eval, cfg.eval_batch) if eval_before else None
    metrics = train(adapted, dataset.train, dataset.eval, out, cfg)
    metrics.update({"model": str(model_source), "data": data, "kind": dataset.kind, "seq_len": seq_len,
                    "lora": lora.to_dict(), "eval_ppl_before": before})
    save_adapter(adapted, out / "adapter", {"metrics": {k: v for k, v in metrics.items() if k != "losses"}})
    if merge:
        from lowbit.qlora.merge import merge as merge_into

        del model
        original, _ = load_model(model_source, dtype=torch.float32)
        merged = merge_into(adapted.model, original)
        with atomic_dir(out / "merged") as tmp:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        metrics["merged"] = str(out / "merged")
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=1).encode())
    return metrics
