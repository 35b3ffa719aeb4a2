"""W8A8 dynamic on the bundled SmolLM2-135M holds perplexity (slow: the real model)."""

import copy

import pytest

pytestmark = pytest.mark.slow


def test_w8a8_dynamic_perplexity(smol, eval_ids):
    from lowbit.eval.quality import quality_pair
    from lowbit.nn.int8_linear import Int8Linear
    from lowbit.ptq.llm import quantize_llm

    model = smol[0]
    q = quantize_llm(copy.deepcopy(model), "w8a8-dynamic", None, progress=False)
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == 30 * 7
    orig, res = quality_pair(model, q, eval_ids, progress=False)
    # measured +0.6% perplexity, KL 0.03 on 2 x 512 held-out tokens (bench/actquant.py)
    assert res["perplexity"] / orig["perplexity"] < 1.015
    assert res["kl"] < 0.06
