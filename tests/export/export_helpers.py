"""Helpers for the format tests: quantized tiny models, logits comparisons, a small CNN, the TFLite
interpreter."""

import torch
from torch import nn

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


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.ReLU(),
                         nn.Linear(64, 10)).eval()


def run_tflite(path, x):
    """(output as numpy, the interpreter) of ai-edge-litert on the .tflite file at `path`."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(inp["index"], x.numpy())
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"]), it
