"""TFLite export of weight-only quantized CNNs (GPTQ per channel), run by ai-edge-litert's interpreter:
the file holds the integer codes as int8 with lowbit's per-channel scales and zero points, outputs equal
the model's with its dequantized weights (float32 rounding), groups and codebooks are refused."""

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import LowbitError
from lowbit.export.onnx_weights import float_copy
from lowbit.export.tflite_weights import export_weight_only, int8_codes

from export_helpers import run_tflite, small_cnn

litert = pytest.importorskip("ai_edge_litert.interpreter")


def cnn():
    return small_cnn()


def _run(path, x):
    y, it = run_tflite(path, x)
    return torch.from_numpy(y.copy()), it


@pytest.mark.parametrize("kw", [dict(bits=4, symmetric=True), dict(bits=3, symmetric=False),
                                dict(bits=8, symmetric=False), dict(bits=2, symmetric=True)],
                         ids=["w4", "w3a", "w8a", "w2"])
def test_cnn_runs_in_litert_like_its_dequantized_weights(kw, tmp_path):
    m = cnn()
    x = torch.randn(64, 3, 8, 8)
    rec = lowbit.quantize_module(m, [x[:32]], method="gptq", group_size=None, progress=False, **kw)
    path = export_weight_only(m, rec, x[:2], tmp_path / "m.tflite")
    y, it = _run(path, x)
    with torch.no_grad():
        ref = float_copy(m, rec)(x)
        ours = m(x)
    assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5
    assert float((y - ours).abs().max() / ours.abs().max()) < 2e-2  # lowbit's kernels multiply in bf16
    ops = [op["op_name"] for op in it._get_ops_details()]
    assert ops.count("DEQUANTIZE") == 4 and ops.count("CONV_2D") == 2 and ops.count("FULLY_CONNECTED") == 2
    filters = {t["name"]: t for t in it.get_tensor_details() if t["dtype"] == np.int8}
    assert sorted(filters) == sorted(f"{n}.weight" for n in rec)
    for name, qw in rec.items():
        t = filters[f"{name}.weight"]
        codes, zero = int8_codes(qw)
        q = t["quantization_parameters"]
        assert np.array_equal(q["scales"], qw.scale.float().reshape(-1).numpy())  # float16 scales, exact
        assert np.array_equal(q["zero_points"], zero)
        stored = it.get_tensor(t["index"])
        if stored.ndim == 4:  # [Cout, kh, kw, Cin] back to torch's [Cout, Cin·kh·kw]
            stored = stored.transpose(0, 3, 1, 2)
        if name == "6":  # reads the flatten of NHWC data: its columns in (h, w, c) order
            codes = codes[:, np.arange(32 * 2 * 2).reshape(32, 2, 2).transpose(1, 2, 0).reshape(-1)]
        assert np.array_equal(stored.reshape(len(stored), -1), codes)  # the codes themselves, bit for bit


def test_digits_gptq_w4_predictions_match(digits_cnn, tmp_path):
    import copy

    model, x, y = digits_cnn
    m = copy.deepcopy(model)
    rec = lowbit.quantize_module(m, [x[:512]], method="gptq", bits=4, group_size=None, progress=False)
    test = x[1400:]
    out, _ = _run(export_weight_only(m, rec, test[:1], tmp_path / "d.tflite"), test)
    with torch.no_grad():
        ref = float_copy(m, rec)(test)  # lowbit's own kernels multiply in bf16: a near-tie image may flip
        ours = m(test)
    assert torch.equal(out.argmax(1), ref.argmax(1))
    acc = [float((o.argmax(1) == y[1400:]).float().mean()) for o in (out, ours)]
    assert abs(acc[0] - acc[1]) <= 1.5 / len(test) and acc[0] > 0.8  # the fixture trains a few seconds
    assert (tmp_path / "d.tflite").stat().st_size < 0.3 * sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.parametrize("kw, needle", [(dict(bits=4, group_size=16), "per output channel only"),
                                        (dict(bits=4, group_size=None, dtype="nf4"), "integer codes only")])
def test_what_tflite_cannot_hold_is_refused(kw, needle, tmp_path):
    m = cnn()
    x = torch.randn(32, 3, 8, 8)
    rec = lowbit.quantize_module(m, [x], method="rtn", progress=False, **kw)
    with pytest.raises(LowbitError, match=needle):
        export_weight_only(m, rec, x[:1], tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()
