"""Needle in a haystack and greedy agreement at a long context: fp cache vs the quantized cache (slow)."""

import pytest
import torch
from transformers import DynamicCache

from lowbit.kv import QuantizedKVCache

pytestmark = pytest.mark.slow

CTX = 1024  # SmolLM2 supports 8192; 1024 keeps the test near a minute on a loaded 2-core machine


@torch.no_grad()
def test_needle_and_greedy_agreement_at_long_context(smol):
    from lowbit.calibration import load_text

    model, tok = smol
    hay = tok(load_text().evaluation, add_special_tokens=False).input_ids
    needle = tok("\nThe secret passcode is 48613. Remember the secret passcode.\n", add_special_tokens=False).input_ids
    question = tok("\nQuestion: what is the secret passcode mentioned above?\nAnswer: The secret passcode is",
                   add_special_tokens=False).input_ids
    n_hay = CTX - len(needle) - len(question)
    hay = hay[:n_hay]
    ids = torch.tensor([hay[: n_hay // 2] + needle + hay[n_hay // 2:] + question])
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    fp = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kw)[0, ids.shape[1]:]
    q = model.generate(ids, past_key_values=QuantizedKVCache("turboquant", 4, model.config, norm_bits=8), **kw)[0, ids.shape[1]:]
    assert "48613" in tok.decode(fp).replace(" ", "")
    assert "48613" in tok.decode(q).replace(" ", "")
    assert (fp == q).float().mean() >= 0.5
