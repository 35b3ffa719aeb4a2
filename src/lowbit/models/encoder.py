"""Hugging Face encoders (BERT, sentence-transformers' MiniLM, RoBERTa, ...): weight quantization
through the generic walk (`lowbit.module_pipeline`), saved as a lowbit module checkpoint beside the
model's config and tokenizer.

    lowbit quantize path/to/all-MiniLM-L6-v2 --method gptq --bits 4 --group-size 32 --asym -o out/minilm-w4
    model, tok = lowbit.models.encoder.load_encoder("out/minilm-w4")
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)


def is_encoder_folder(path: Path) -> bool:
    """A model folder whose config.json names no decoder lowbit's block tables know and no causal LM:
    an encoder the generic walk quantizes."""
    from lowbit.models.arch import ARCHS

    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        config = json.loads(cfg.read_text())
    except ValueError:
        return False
    archs = config.get("architectures") or []
    causal = config.get("is_decoder") or any(a.endswith("ForCausalLM") for a in archs)
    return config.get("model_type") not in ARCHS and not causal and not config.get("is_encoder_decoder")


def encoder_batches(tokenizer, text: str, n_samples: int, seq_len: int, batch: int = 16) -> list[dict]:
    """Calibration inputs: `n_samples` windows of the text, each [CLS] + tokens + [SEP] (when the
    tokenizer has them) of `seq_len` tokens in all, no padding."""
    from lowbit.calibration import calibration_batches

    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    extra = (cls_id is not None) + (sep_id is not None)
    if seq_len <= extra:
        raise LowbitError(f"--seq-len {seq_len} leaves no room for text between the special tokens")
    ids = calibration_batches(tokenizer, text, n_samples, seq_len - extra)
    parts = ([torch.full((n_samples, 1), cls_id)] if cls_id is not None else []) + [ids] + (
        [torch.full((n_samples, 1), sep_id)] if sep_id is not None else [])
    ids = torch.cat(parts, 1)
    return [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in ids.split(batch)]


def quantize_encoder_to(folder: str | Path, out: str | Path, recipe, *, calib_text: str | None = None,
                        n_samples: int = 64, seq_len: int = 128, overwrite: bool = False, progress: bool = True):
    """Load the encoder in `folder` (AutoModel, float32), quantize it per `recipe`, save to `out`
    (module checkpoint + config + tokenizer); returns (model, tokenizer)."""
    from transformers import AutoModel, AutoTokenizer

    from lowbit.calibration import load_text
    from lowbit.export.module_checkpoint import MANIFEST, save_module
    from lowbit.io.atomic import check_output_dir
    from lowbit.methods import get_method
    from lowbit.module_pipeline import quantize_module

    folder = Path(folder)
    method = get_method(recipe.method, recipe.options)
    check_output_dir(out, overwrite, protect=(folder,), replaceable=lambda p: (p / MANIFEST).is_file())
    split = load_text(calib_text or "pydoc") if method.needs_calibration else None
    if recipe.quantize_head or recipe.head_spec is not None:
        raise LowbitError("--quantize-head / --head-bits are for causal LMs; an encoder's layers all follow the recipe")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    batches = encoder_batches(tokenizer, split.calibration, n_samples, seq_len) if split is not None else [
        tokenizer(["lowbit"], return_tensors="pt").data]
    records = quantize_module(model, recipe, method, batches, progress=progress)
    saved = save_module(model, records, out, overwrite=overwrite)
    model.config.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    return model, tokenizer


def load_encoder(path: str | Path, kernel: str | None = None):
    """(model, tokenizer) of an encoder saved by `quantize_encoder_to`, QuantLinear layers in place."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from lowbit.export.module_checkpoint import load_module

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    model = AutoModel.from_config(config).eval()
    load_module(model, path, kernel=kernel)
    return model, AutoTokenizer.from_pretrained(path)
