"""Generate text from a model lowbit loads, streaming the decoded tokens."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


class _Detokenizer:
    """Decodes the growing token list and emits only the new text (multi-byte safe)."""

    def __init__(self, tokenizer, emit: Callable[[str], None]):
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.printed = 0

    def add(self, ids: list[int]) -> None:
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.emit(text[self.printed:])
            self.printed = len(text)

    def end(self) -> None:
        self.emit(self.tokenizer.decode(self.ids, skip_special_tokens=True)[self.printed:])


def _streamer(detok: _Detokenizer):
    from transformers.generation.streamers import BaseStreamer

    class Streamer(BaseStreamer):
        def __init__(self):
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:  # generate() first passes the prompt
                self.prompt_seen = True
                return
            detok.add(value.reshape(-1).tolist())

        def end(self):
            detok.end()

    return Streamer()


def _eos_ids(model, tokenizer) -> set[int]:
    """The ids that end generation, as generate() takes them: the generation config's, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


@torch.no_grad()
def generate_text(source, prompt: str, *, max_new_tokens: int = 128, chat: bool = True, temperature: float = 0.0,
                  seed: int = 0, stream: Callable[[str], None] | None = None) -> dict:
    """Load `source` (anything `lowbit.load` takes), generate after `prompt` (with the model's
    chat template when it has one and `chat`), call `stream` with each new piece of text. Greedy
    generation of a model lowbit's runtime covers runs on it (lowbit.runtime.decoder); sampling and
    other architectures go through transformers' generate().
    Returns {"text", "new_tokens", "seconds", "tokens_per_s"}."""
    from lowbit.api import load
    from lowbit.runtime.decoder import Decoder, supports

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

    detok = _Detokenizer(tokenizer, emit)
    if temperature == 0 and supports(model):  # lowbit's own runtime: greedy, batch 1
        r = Decoder(model, ids.shape[1] + max_new_tokens).generate(
            ids, max_new_tokens, eos=_eos_ids(model, tokenizer), on_token=lambda t: detok.add([t]))
        detok.end()
        seconds = r["prefill_s"] + r["decode_s"]
        n = len(r["tokens"])
        return {"text": "".join(pieces), "new_tokens": n, "seconds": seconds, "tokens_per_s": n / seconds}
    kw = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, streamer=_streamer(detok),
              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if temperature > 0:
        torch.manual_seed(seed)
        kw.update(temperature=temperature, top_k=0, top_p=1.0)
    else:
        kw.update(temperature=None, top_k=None, top_p=None)
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    seconds = time.perf_counter() - t0
    n = len(detok.ids)
    return {"text": "".join(pieces), "new_tokens": n, "seconds": seconds, "tokens_per_s": n / seconds if seconds else 0.0}
