"""Sentences of a calibration or evaluation text, for models that embed sentences (encoders).

A sentence encoder sees short inputs: [CLS] sentence [SEP]; calibrating it on long windows of
running text under-weights the special tokens and the first positions (the bench:
all-MiniLM-L6-v2 W4 g32 GPTQ cosine 0.9937 with sentences, 0.9893 with 128-token windows).
"""

from __future__ import annotations

import re

from lowbit.errors import LowbitError

MIN_CHARS, MAX_CHARS = 40, 400


def clean_rst(text: str) -> str:
    """reST roles and literals to their text (`:func:\\`len\\`` -> len), whitespace collapsed."""
    text = re.sub(r":[\w:]+:`~?([^`<]*?)(\s*<[^>]*>)?`", r"\1", text)
    text = re.sub(r"`+([^`]*)`+_?", r"\1", text)
    return " ".join(text.split())


def text_sentences(text: str, n: int) -> list[str]:
    """The first `n` sentences of 40-400 characters of `text` (reST markup removed)."""
    out = [s.strip() for s in re.split(r"(?<=[.!?])\s+", clean_rst(text)) if MIN_CHARS <= len(s.strip()) <= MAX_CHARS]
    return out[:n]


def sentence_batches(tokenizer, text: str, n_samples: int, max_len: int = 128, batch: int = 64) -> list[dict]:
    """Calibration inputs for an encoder: `n_samples` sentences of `text`, tokenized as the model
    embeds them ([CLS] ... [SEP]), padded per batch (the walk keeps padding out of the Hessians)."""
    sents = text_sentences(text, n_samples)
    if not sents:
        raise LowbitError(f"the calibration text has no sentence of {MIN_CHARS}-{MAX_CHARS} characters; "
                          "give another --calib or use --calib-shape windows")
    return [dict(tokenizer(sents[i:i + batch], padding=True, truncation=True, max_length=max_len,
                           return_tensors="pt")) for i in range(0, len(sents), batch)]
