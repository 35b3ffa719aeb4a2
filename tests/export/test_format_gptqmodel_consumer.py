"""GPTQ and AWQ exports loaded by transformers through GPTQModel, the consumer's own kernels.

GPTQModel 7.6 (the last release for torch 2.13) pins numpy 2.2.6 while lowbit pins 2.4.6, so it lives
in its own venv: `make bench-venv-gptq`, then
`bench/.venv-gptq/bin/python -m pytest tests/export/test_format_gptqmodel_consumer.py -s`.
In the project venv these tests are skipped (gptqmodel is not installed there).
"""

import pytest
import torch

from export_helpers import compare_logits
from lowbit.export import awq, gptq

pytest.importorskip("gptqmodel")


def _load(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("bits,sym,fmt", [(4, True, "gptq"), (3, False, "gptq"), (2, False, "gptq_v2"),
                                          (8, True, "gptq")])
def test_gptq_export_runs_in_gptqmodel_with_lowbits_logits(qm_factory, tmp_path, bits, sym, fmt):
    qm, model = qm_factory(bits=bits, symmetric=sym, group_size=64)
    gptq.write(qm, tmp_path / "q", checkpoint_format=fmt)
    theirs = _load(tmp_path / "q")
    assert type(theirs.model.layers[0].self_attn.q_proj).__module__.startswith("gptqmodel.")
    worst, top1 = compare_logits(model, theirs, qm.tokenizer)
    print(f"gptq {bits}-bit sym={sym} {fmt}: max |dlogit| {worst:.2e}, top-1 {top1:.3f}")
    assert top1 == 1.0 and worst < 2e-2  # GPTQModel's torch kernel dequantizes in fp16


@pytest.mark.parametrize("sym", [True, False])
def test_awq_export_runs_in_gptqmodel_with_lowbits_logits(qm_factory, tmp_path, sym):
    qm, model = qm_factory(bits=4, symmetric=sym, group_size=64)
    awq.write(qm, tmp_path / "q")
    theirs = _load(tmp_path / "q")
    assert type(theirs.model.layers[0].self_attn.q_proj).__module__.startswith("gptqmodel.")
    worst, top1 = compare_logits(model, theirs, qm.tokenizer)
    print(f"awq sym={sym}: max |dlogit| {worst:.2e}, top-1 {top1:.3f}")
    assert top1 == 1.0 and worst < 2e-2

