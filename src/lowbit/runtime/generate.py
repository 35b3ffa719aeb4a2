"""Generate text from a model lowbit loads, streaming the decoded tokens."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def _streamer(tokenizer, emit: Callable[[str], None]):
    from transformers.generation.streamers import BaseStreamer

    class Streamer(BaseStreamer):
        """Decodes the growing token list and emits only the new text (multi-byte safe)."""

        def __init__(self):
            self.ids: list[int] = []
            self.printed = 0
            self.prompt_seen = False
            self.count = 0

        def put(self, value):
            if not self.prompt_seen:  # generate() first passes the prompt
                self.prompt_seen = True
                return
            self.ids += value.reshape(-1).tolist()
            self.count += value.numel()
            text = tokenizer.decode(self.ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):
                emit(text[self.printed:])
                self.printed = len(text)

        def end(self):
            text = tokenizer.decode(self.ids, skip_special_tokens=True)
            emit(text[self.printed:])

    return Streamer()


@torch.no_grad()
def generate_text(source, prompt: str, *, max_new_tokens: int = 128, chat: bool = True, temperature: float = 0.0,
                  seed: int = 0, stream: Callable[[str], None] | None = None) -> dict:
    """Load `source` (anything `lowbit.load` takes), generate after `prompt` (with the model's
    chat template when it has one and `chat`), call `stream` with each new piece of text.
    Returns {"text", "new_tokens", "seconds", "tokens_per_s"}."""
    from lowbit.api import load

    model, tokenizer = load(source)
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    pieces: list[str] = []

    def emit(t: str) -> None:
        pieces.append(t)
        if stream is not None and t:
            stream(t)

    streamer = _streamer(tokenizer, emit)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, streamer=streamer,
              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if temperature > 0:
        torch.manual_seed(seed)
        kw.update(temperature=temperature, top_k=0, top_p=1.0)
    else:
        kw.update(temperature=None, top_k=None, top_p=None)
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    seconds = time.perf_counter() - t0
    n = streamer.count
    return {"text": "".join(pieces), "new_tokens": n, "seconds": seconds, "tokens_per_s": n / seconds if seconds else 0.0}
