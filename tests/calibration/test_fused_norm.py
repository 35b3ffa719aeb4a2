"""The calibration working copy's fused RMSNorm gives the block's outputs bit for bit."""

import copy

import torch
from transformers import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from lowbit.models import load_model
from lowbit.models.fused_norm import FusedRMSNorm, fuse_norms


def test_fused_norm_block_outputs_bit_identical(tiny_dir):
    model, _ = load_model(tiny_dir)
    block = copy.deepcopy(model.model.layers[0]).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
    fused = copy.deepcopy(block)
    assert fuse_norms(fused) == 2 and isinstance(fused.input_layernorm, FusedRMSNorm)
    x = (3 * torch.randn(2, 64, 128, generator=g)).to(torch.bfloat16)
    pos = torch.arange(64)[None].expand(2, -1)
    cos, sin = (t.to(torch.bfloat16) for t in model.model.rotary_emb(x, pos))
    with torch.no_grad():
        outs = [b(x, position_embeddings=(cos, sin), attention_mask=None, position_ids=pos) for b in (block, fused)]
    a, b = (o[0] if isinstance(o, tuple) else o for o in outs)
    assert torch.equal(a, b)
    assert not torch.equal(fused.input_layernorm(x), torch.nn.functional.rms_norm(x, (128,), None, 1e-6))


def test_gemma_norm_is_left_alone():
    norm = torch.nn.Sequential(Gemma3RMSNorm(Gemma3TextConfig().hidden_size))
    assert fuse_norms(norm) == 0 and isinstance(norm[0], Gemma3RMSNorm)
