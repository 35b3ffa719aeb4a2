"""Block-AP (EfficientQAT) on a tiny 2-block Llama: from an RTN start each block's output MSE
drops, a run killed after block 0 and rerun ends bit-identical to an uninterrupted one, the same
seed gives the same model; held-code scale gradients are the exact derivative at a PTQ start
(where LSQ's are zero)."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.core.fake_quant import fake_quantize_grouped
from lowbit.core.qparams import choose_qparams
from lowbit.core.quantize import dequantize, quantize_codes
from lowbit.errors import LowbitError
from lowbit.qat import QATConfig, convert_qat, prepare_qat, qat_scheme
from lowbit.qat.block_ap import STATE, BlockAPConfig, block_ap
from lowbit.spec import QuantSpec


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    return model, ids


def rtn_student(teacher):
    """The teacher with its blocks' Linears fake-quantized at W3 g64 from their RTN records."""
    from lowbit.methods import get_method
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    scheme = qat_scheme("w3g64")
    student = copy.deepcopy(teacher)
    records = dict(quantize_model(student, Recipe(spec=scheme.weight, method="rtn"), get_method("rtn"), None,
                                  progress=False, swap=False))
    records = {n: r for n, r in records.items() if ".layers." in n}
    return prepare_qat(student, QATConfig(scheme, targets=tuple(records), learn_zero=True), init=records)


CFG = BlockAPConfig(steps=12, batch=2, lr=1e-3, qparam_lr=1e-3, seed=3)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_block_mse_drops_and_the_result_converts(tiny_llama):
    teacher, ids = tiny_llama
    student = rtn_student(teacher)
    res = block_ap(student, teacher, ids, CFG, progress=False)
    assert res.blocks == 2 and res.stopped_at is None
    for i in (0, 1):
        assert len(res.losses[i]) == CFG.steps
        assert res.end_mse[i] < 0.9 * res.start_mse[i], (i, res.start_mse[i], res.end_mse[i])
    with torch.no_grad():
        fake = student(input_ids=ids[:2]).logits
    convert_qat(student)  # the trained grid is a real quantized model
    with torch.no_grad():
        real = student(input_ids=ids[:2]).logits
    assert float((real - fake).abs().max()) < 0.05 * float(fake.abs().max())  # QuantLinear runs bf16 activations


class Killed(Exception):
    pass


def test_resume_after_kill_is_bit_identical_and_seeded(tiny_llama, tmp_path):
    teacher, ids = tiny_llama
    a = rtn_student(teacher)
    ra = block_ap(a, teacher, ids, CFG, progress=False, state_dir=tmp_path / "a")
    again = rtn_student(teacher)
    block_ap(again, teacher, ids, CFG, progress=False)
    pa = params(a)
    assert all(torch.equal(pa[n], p) for n, p in params(again).items())  # same seed, same model

    def kill(i, _res):
        if i == 0:
            raise Killed

    b = rtn_student(teacher)
    with pytest.raises(Killed):
        block_ap(b, teacher, ids, CFG, progress=False, state_dir=tmp_path / "b", on_block=kill)
    assert (tmp_path / "b" / STATE).is_file()
    b = rtn_student(teacher)  # a new process: a fresh PTQ start, the same call
    rb = block_ap(b, teacher, ids, CFG, progress=False, state_dir=tmp_path / "b")
    assert rb.resumed_from == 1
    assert rb.losses == ra.losses
    assert all(torch.equal(pa[n], p) for n, p in params(b).items())
    other = rtn_student(teacher)
    with pytest.raises(LowbitError, match="other settings"):
        block_ap(other, teacher, ids, BlockAPConfig(steps=5, batch=2), progress=False, state_dir=tmp_path / "b")


def test_stop_keeps_the_ptq_start(tiny_llama):
    teacher, ids = tiny_llama
    student = rtn_student(teacher)
    before = params(student)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > CFG.steps + 3  # during block 1

    res = block_ap(student, teacher, ids, CFG, progress=False, stop=stop)
    assert res.blocks == 1 and res.stopped_at == 1
    after = params(student)
    block1 = [n for n in after if ".layers.1." in n]
    assert block1 and all(torch.equal(before[n], after[n]) for n in block1)
    assert any(not torch.equal(before[n], after[n]) for n in after if ".layers.0." in n)


def test_bad_settings(tiny_llama):
    teacher, ids = tiny_llama
    with pytest.raises(LowbitError, match="steps=0"):
        BlockAPConfig(steps=0)
    with pytest.raises(LowbitError, match="lr=nan"):
        BlockAPConfig(lr=float("nan"))
    with pytest.raises(LowbitError, match="scale_grad"):
        BlockAPConfig(scale_grad="adam")
    with pytest.raises(LowbitError, match="at least batch=16"):
        block_ap(rtn_student(teacher), teacher, ids, BlockAPConfig(batch=16), progress=False)
    with pytest.raises(LowbitError, match="prepare_qat"):
        block_ap(copy.deepcopy(teacher), teacher, ids, CFG, progress=False)


@given(st.integers(0, 10_000), st.sampled_from([2, 3, 4]))
def test_held_code_gradients_are_exact_on_the_grid(seed, bits):
    """At a PTQ start x sits on the grid: LSQ's scale gradient is 0 (the hybrid run could not move
    its scales); held codes give d/ds of (q - z)·s and d/dz = -s·g exactly."""
    spec = QuantSpec(bits=bits, symmetric=False, granularity="group", group_size=16)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 32, generator=g)
    s, z = choose_qparams(w, spec)
    codes = quantize_codes(w, s, z, spec)
    x = dequantize(codes, s, z, spec, dtype=torch.float32)  # the record's dequantized weights
    up = torch.randn(4, 32, generator=g)
    grads = {}
    for held in (False, True):
        sp, zp = s.clone().requires_grad_(True), z.float().clone().requires_grad_(True)
        dq, q = fake_quantize_grouped(x, sp, zp, spec, held_codes=held)
        assert torch.equal(q, codes.float())
        (dq * up).sum().backward()
        grads[held] = (sp.grad, zp.grad)
    assert float(grads[False][0].abs().max()) < 1e-4 * float(up.abs().sum())
    q3 = codes.float().reshape(4, 2, 16)
    want_s = ((q3 - z.float().unsqueeze(-1)) * up.reshape(4, 2, 16)).sum(-1)
    want_z = (-s.unsqueeze(-1) * up.reshape(4, 2, 16)).sum(-1)
    torch.testing.assert_close(grads[True][0], want_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[True][1], want_z, rtol=1e-5, atol=1e-5)


def logit_mse(a, b, ids) -> float:
    with torch.no_grad():
        return float((a(input_ids=ids).logits - b(input_ids=ids).logits).pow(2).mean())


def test_fp_target_and_keep_better(tiny_llama):
    """Target "fp" (the fp model's stream, EfficientQAT's) brings the logits closer to the
    teacher's; a learning rate that wrecks the blocks is undone block by block (keep_better),
    leaving the PTQ start bit for bit."""
    teacher, ids = tiny_llama
    student = rtn_student(teacher)
    before = logit_mse(student, teacher, ids)
    res = block_ap(student, teacher, ids, BlockAPConfig(steps=12, batch=2, lr=1e-3, qparam_lr=1e-3, seed=3,
                                                        target="fp"), progress=False)
    assert res.kept_start == [] and res.blocks == 2
    assert logit_mse(student, teacher, ids) < 0.7 * before
    wrecked = rtn_student(teacher)
    start = params(wrecked)
    res = block_ap(wrecked, teacher, ids, BlockAPConfig(steps=6, batch=2, lr=0.5, qparam_lr=0.5, holdout=1),
                   progress=False)
    assert res.kept_start == [0, 1]
    assert all(torch.equal(start[n], p) for n, p in params(wrecked).items())
    assert all(res.end_mse[i] == res.start_mse[i] for i in (0, 1))
    with pytest.raises(LowbitError, match="holdout=4"):
        block_ap(rtn_student(teacher), teacher, ids, BlockAPConfig(batch=2, holdout=4), progress=False)
    with pytest.raises(LowbitError, match="target"):
        BlockAPConfig(target="teacher")


def kd(student, teacher, ids) -> float:
    from lowbit.qat.losses import distillation_kl

    with torch.no_grad():
        return float(distillation_kl(student(input_ids=ids).logits, teacher(input_ids=ids).logits))


def test_e2e_qp_trains_only_the_grid(tiny_llama):
    """E2E-QP from an RTN start: the distillation loss on the windows falls, the latent weights
    are untouched, only the scales / zeros moved, and the result converts."""
    from lowbit.qat.e2e_qp import E2EQPConfig, e2e_qp

    teacher, ids = tiny_llama
    student = rtn_student(teacher)
    before, kd0 = params(student), kd(student, teacher, ids)
    res = e2e_qp(student, teacher, ids, E2EQPConfig(steps=16, batch=2, lr=1e-3, seed=1), progress=False)
    after = params(student)
    assert len(res.losses) == 16
    assert kd(student, teacher, ids) < 0.8 * kd0, (kd0, res.losses)
    moved = [n for n in after if not torch.equal(before[n], after[n])]
    assert moved and all(n.endswith(("weight_scale", "weight_zero")) for n in moved)
    with torch.no_grad():
        fake = student(input_ids=ids[:2]).logits
    convert_qat(student)
    with torch.no_grad():
        real = student(input_ids=ids[:2]).logits
    assert float((real - fake).abs().max()) < 0.05 * float(fake.abs().max())
    with pytest.raises(LowbitError, match="loss"):
        E2EQPConfig(loss="mse")
