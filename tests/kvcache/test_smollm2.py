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
        "tq4-plain": lambda: QuantizedKVCache("turboquant", 4, cfg, plain=True),
    }, progress=False)
    assert r["tq8"]["kl"] < 0.005 and r["tq8"]["top1_agreement"] > 0.97
    assert abs(r["tq8"]["perplexity_change_pct"]) < 1.0
    assert r["tq4"]["kl"] < 0.04 and r["tq4"]["top1_agreement"] > 0.83
    # the key frame (RoPE undone, centred, rescaled) and the sink token: measured 0.026 vs 0.088 KL
    assert r["tq4-plain"]["kl"] > 2.5 * r["tq4"]["kl"]
    # codes + fp16 norm per vector, one fp16 sink token, fp16 key mean + key scale + value mean per head
    n = windows.shape[1]
    assert r["tq4"]["kv_bits_per_coordinate"] == pytest.approx(((n - 1) * (4 + 16 / 64) + 16 + 3 * 16 / 2) / n)
    assert r["tq4"]["kv_memory_ratio"] > 3.5  # 128 tokens: the fixed side data still weighs


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


def test_calibrated_key_basis_lowers_kl_at_fractional_bits(smol, windows):
    from lowbit.calibration import eval_windows, load_text
    from lowbit.kv import calibrate_key_bases

    model, tok = smol
    cal = eval_windows(tok, load_text("pydoc").calibration, seq_len=256, max_windows=1)
    bases = calibrate_key_bases(model, cal, progress=False)
    assert len(bases) == model.config.num_hidden_layers and bases[0].shape == (3, 64, 64)
    cfg = model.config
    r = kv_eval(model, windows, {
        "frame": lambda: QuantizedKVCache("turboquant", 2.5, cfg),
        "basis": lambda: QuantizedKVCache("turboquant", 2.5, cfg, key_basis=bases),
    }, progress=False)
    assert r["basis"]["kl"] < 0.85 * r["frame"]["kl"]  # measured 0.093 vs 0.120
    assert r["basis"]["kv_bits_per_coordinate"] == r["frame"]["kv_bits_per_coordinate"]
