"""The calibrated methods through the block pipeline, on tiny random Llamas (MHA and GQA)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.methods import get_method
from lowbit.calibration.capture import BlockInputs, capture_first_block_inputs, run_block
from lowbit.models.arch import arch_for, blocks_of
from lowbit.pipeline import quantize_model
from lowbit.recipe import Recipe
from lowbit.spec import QuantSpec

CALIB = torch.randint(0, 512, (4, 48), generator=torch.Generator().manual_seed(1))
EVAL = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(2))


def tiny(kv_heads: int, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=512, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # outlier input channels and non-trivial norms, as in trained models
        for block in model.model.layers:
            block.input_layernorm.weight.uniform_(0.5, 1.5)
            block.input_layernorm.weight[:4] *= 8
            block.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    return model


def logits(model, ids=EVAL):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_awq_folding_alone_leaves_model_outputs_unchanged(kv_heads):
    model = tiny(kv_heads)
    ref = logits(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    arch = arch_for(model)
    method = get_method("awq", search_samples=2, n_grid=5)
    plan = {n: QuantSpec(3, symmetric=False, group_size=32) for n in arch.linears}
    inputs, per_block = capture_first_block_inputs(model, arch, CALIB)
    for i, block in enumerate(blocks_of(model, arch)):
        inputs = BlockInputs(inputs.hidden, per_block[i])
        method.prepare_block(block, lambda b=block, x=inputs: run_block(b, x), arch, plan)
        inputs = BlockInputs(run_block(block, inputs), per_block[i])
    out = logits(model)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "model.layers.0.input_layernorm.weight" in changed and "model.layers.0.mlp.up_proj.weight" in changed
    # v -> o is folded only when the shapes allow (no grouped-query attention)
    assert ("model.layers.0.self_attn.o_proj.weight" in changed) == (kv_heads == 4)


def test_every_method_quantizes_every_linear_and_calibrated_ones_beat_rtn():
    spec = QuantSpec(3, symmetric=False, group_size=32)
    ref = logits(tiny(2))
    err = {}
    for name in ("rtn", "hqq", "gptq", "awq", "awq+gptq"):
        model = tiny(2)
        opts = {"search_samples": 2, "n_grid": 8} if name.startswith("awq") else {}
        qws = quantize_model(model, Recipe(spec, method=name), get_method(name, **opts), CALIB,
                             progress=False, swap=False)
        assert len(qws) == 2 * 7
        for qw in qws.values():
            assert int(qw.codes.max()) <= 7
        err[name] = float(((logits(model) - ref) ** 2).mean())
    for name in ("gptq", "awq", "awq+gptq"):
        assert err[name] < 0.8 * err["rtn"], err
    assert err["hqq"] < err["rtn"], err
