"""Adapters in peft's format: real peft loads them on the original model with identical outputs;
merging gives the same model; targets and ranks are checked."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowbit.errors import LowbitError
from lowbit.qlora.adapt import LoraConfig, adapt
from lowbit.qlora.merge import merge
from lowbit.qlora.peft_io import load_adapter, read_adapter_config, save_adapter

peft = pytest.importorskip("peft")


@pytest.fixture
def tiny(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def _randomize(adapted, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapted.lora_modules().values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj", "down_proj"), r"model\.layers\.1\..*_proj"])
def test_peft_loads_adapter_with_identical_outputs(tiny, tiny_dir, tmp_path, targets):
    original = copy.deepcopy(tiny)
    adapted = adapt(tiny, LoraConfig(r=4, alpha=8, dropout=0.0, targets=targets, quant_type=None),
                    base_name=str(tiny_dir))
    _randomize(adapted)
    save_adapter(adapted, tmp_path / "adapter")
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        ours = adapted.model(ids).logits
        pm = peft.PeftModel.from_pretrained(original, tmp_path / "adapter").eval()
        theirs = pm(ids).logits
    assert torch.equal(ours, theirs)
    assert len(adapted.targets) == (6 if isinstance(targets, tuple) else 7)

    cfg = read_adapter_config(tmp_path / "adapter")
    assert cfg.r == 4 and cfg.alpha == 8
    again = adapt(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval(),
                  LoraConfig(r=4, alpha=8, dropout=0.0, targets=targets, quant_type=None))
    load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, ours)
        merged = merge(again.model)
        assert (merged(ids).logits - ours).abs().max() < 1e-4
        assert (pm.merge_and_unload()(ids).logits - merged(ids).logits).abs().max() < 1e-4


def test_qlora_adapter_merges_into_original(tiny, tiny_dir, tmp_path):
    original = copy.deepcopy(tiny)
    adapted = adapt(tiny, LoraConfig(r=4, alpha=8, dropout=0.0))
    _randomize(adapted, 1)
    save_adapter(adapted, tmp_path / "a")
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "a").eval()
        want = pm(ids).logits
        merged = merge(adapted.model, original)
        assert (merged(ids).logits - want).abs().max() < 1e-4
    assert not any(p.requires_grad for p in merged.parameters())


def test_bad_targets_and_rank(tiny):
    with pytest.raises(LowbitError, match="candidates: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        adapt(copy.deepcopy(tiny), LoraConfig(targets=("qkv_proj",)))
    with pytest.raises(LowbitError, match="matches no Linear"):
        adapt(copy.deepcopy(tiny), LoraConfig(targets=r"attn\.c_attn"))
    with pytest.raises(LowbitError, match="larger than"):
        adapt(copy.deepcopy(tiny), LoraConfig(r=512))
    with pytest.raises(LowbitError, match="at least 1"):
        LoraConfig(r=0)
