"""Helpers for the format tests: quantized tiny models, logits comparisons."""

import torch

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return", "1, 2, 3, 4,"]


def make_qm(tiny_dir, method="rtn", **spec):
    """(QuantizedModel, lowbit's own runnable model) of the tiny Llama quantized per `spec`."""
    from lowbit.api import make_recipe
    from lowbit.export import QuantizedModel
    from lowbit.methods import get_method
    from lowbit.models import load_model
    from lowbit.pipeline import quantize_model

    recipe = make_recipe(method=method, **spec)
    model, tok = load_model(str(tiny_dir))
    records = quantize_model(model, recipe, get_method(recipe.method, recipe.options), None, progress=False)
    return QuantizedModel.from_model(model, tok, records), model



def prompt_ids(tok):
    return [tok(p, return_tensors="pt").input_ids for p in PROMPTS]


def compare_logits(ours, theirs, tok, dtype=torch.float32):
    """max |Δlogit| and top-1 agreement (over all positions of the fixed prompts)."""
    worst, agree, total = 0.0, 0, 0
    with torch.no_grad():
        for ids in prompt_ids(tok):
            a = ours(ids).logits.float()
            b = theirs(ids).logits.float()
            worst = max(worst, float((a - b).abs().max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[1]
    return worst, agree / total


def assert_same_records(a, b):
    assert set(a.layers) == set(b.layers)
    for name in a.layers:
        assert torch.equal(a.layers[name].dequantize(), b.layers[name].dequantize()), name
