"""Real-model checks on the bundled SmolLM2-135M (Llama architecture, head_dim 64)."""

import json

import pytest
import torch

from lowbit.kv import QuantizedKVCache, greedy_agreement, kv_eval

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def windows(smol):
    from lowbit.calibration import eval_windows, load_text

    _, tok = smol
    return eval_windows(tok, load_text("pydoc").evaluation, seq_len=128, max_windows=1)


def test_quality_ladder_on_held_out_text(smol, windows):
    model, _ = smol
    cfg = model.config
    r = kv_eval(model, windows, {
        "tq4": lambda: QuantizedKVCache("turboquant", 4, cfg),
        "tq8": lambda: QuantizedKVCache("turboquant", 8, cfg),
    }, progress=False)
    assert r["tq8"]["kl"] < 0.005 and r["tq8"]["top1_agreement"] > 0.97
    assert abs(r["tq8"]["perplexity_change_pct"]) < 1.0
    assert r["tq4"]["kl"] < 0.15 and r["tq4"]["top1_agreement"] > 0.8
    # codes + fp16 norm per vector + fp16 per-head mean per layer
    assert r["tq4"]["kv_bits_per_coordinate"] == pytest.approx(4 + 16 / 64 + 16 / 128)
    assert r["tq4"]["kv_memory_ratio"] > 3.6


@torch.no_grad()
def test_generate_with_quantized_cache_matches_prefix(smol):
    model, tok = smol
    prompt = tok("The Python language reference describes", return_tensors="pt").input_ids[0]
    r = greedy_agreement(model, prompt, lambda: QuantizedKVCache("turboquant", 4, model.config, window=16),
                         n_tokens=12)
    assert len(r["reference"]) == 12
    assert r["greedy_prefix"] >= 6 and r["greedy_match"] > 0.5


def test_kv_eval_cli_json(smol):
    from typer.testing import CliRunner

    import typer
    from lowbit.cli.kv import register

    app = typer.Typer()
    register(app)

    @app.callback()
    def _root():  # keep kv-eval a named sub-command
        pass

    res = CliRunner().invoke(app, ["kv-eval", "default", "--method", "kivi", "--bits", "4", "--windows", "1",
                                   "--seq-len", "64", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    for key in ("perplexity", "kl", "top1_agreement", "kv_bits_per_coordinate", "kv_memory_ratio"):
        assert key in out
    assert out["kv_memory_ratio"] > 2
