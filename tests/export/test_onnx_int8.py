"""ONNX export of activation-quantized models, run by onnxruntime: outputs within one quantization
step of lowbit's, int8 weights in the file, QDQ for static and MatMulInteger for dynamic layers."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lowbit import ptq
from lowbit.core.cpu_features import fast_int8
from lowbit.errors import LowbitError
from lowbit.export.onnx import export
from lowbit.spec import W8, ActSpec, LayerScheme


def _cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                      nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    m[1].running_mean.normal_()
    m[1].running_var.uniform_(0.5, 2)
    return m


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.numpy()})[0]


def _ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _int8_weights(path):
    return [i for i in onnx.load(str(path)).graph.initializer if i.data_type == onnx.TensorProto.INT8]


# onnxruntime runs per-tensor QDQ convs as u8 x s8 products; without VNNI (AVX2) its kernels add them in
# pairs into saturating 16-bit lanes (vpmaddubsw), so outputs move by up to ~20 output steps there
# (measured on an AVX2-only EPYC; ORT's own quantize_static graphs have the same limit)
_SATURATES = pytest.mark.xfail(not fast_int8(), strict=False,
                               reason="onnxruntime's u8 x s8 kernels saturate on CPUs without VNNI")


@pytest.mark.parametrize("act", [pytest.param(ActSpec(granularity="tensor", dynamic=False), marks=_SATURATES),
                                 pytest.param(ActSpec(granularity="tensor", dynamic=False, symmetric=False,
                                                      observer="percentile"), marks=_SATURATES),
                                 ActSpec(granularity="channel", dynamic=False)])
def test_static_qdq_matches_lowbit(tmp_path, act):
    x = torch.randn(32, 1, 8, 8)
    out = ActSpec(granularity="tensor", dynamic=False)
    q = ptq.prepare(_cnn(), ptq.PTQConfig(LayerScheme(W8, act), overrides=((r"^8$", LayerScheme(W8, act, out)),)))
    ptq.calibrate(q, [x[:16], x[16:]])
    ptq.convert(q)
    path = export(q, (x[:2],), tmp_path / "cnn.onnx", input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    got = _run(path, x)
    with torch.no_grad():
        ref = q(x).numpy()
    step = float(q[8].output_scale)
    assert np.abs(got - ref).max() <= step * 1.001  # within one step of the output grid
    assert np.mean(np.abs(got - ref) > 1e-5) < 0.01  # and almost everywhere identical
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(path)
    assert len(_int8_weights(path)) == 4


def test_dynamic_matmulinteger_matches_lowbit_on_3d_inputs(tmp_path):
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 16)).eval()
    q = ptq.convert(ptq.prepare(m, ptq.ptq_config("w8a8-dynamic")))
    x = torch.randn(3, 7, 24)
    path = export(q, (x,), tmp_path / "mlp.onnx", input_names=["x"], dynamic_axes={"x": {0: "b", 1: "t"}})
    got = _run(path, torch.randn(5, 11, 24).mul(0).add(x[:1, :1]).expand(5, 11, 24).contiguous())
    with torch.no_grad():
        ref = q(x[:1, :1].expand(5, 11, 24)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    got = _run(path, x)
    with torch.no_grad():
        ref = q(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert "MatMulInteger" in _ops(path)
    assert len(_int8_weights(path)) == 2


def test_refuses_what_it_cannot_express(tmp_path):
    q = ptq.convert(ptq.prepare(_cnn(), ptq.ptq_config("w8a8-dynamic")))
    with pytest.raises(LowbitError, match="^0: a dynamic Conv2d"):
        export(q, (torch.randn(1, 1, 8, 8),), tmp_path / "x.onnx")
    with pytest.raises(LowbitError, match="no int8 modules"):
        export(copy.deepcopy(_cnn()), (torch.randn(1, 1, 8, 8),), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
