"""TFLite export of a weight-only quantized model (any nn.Module through `quantize_module`: a CNN),
run by ai-edge-litert's interpreter.

Each recorded Conv2d / Linear keeps its integer codes in the file: an int8 constant with lowbit's
scales (float16, exactly as float32) and integer zero points per output channel (TFLite's per-axis
quantization, axis 0), read by a DEQUANTIZE into the float filter of a float CONV_2D /
FULLY_CONNECTED; activations stay float32 (the file holds the bits, the runtime computes in float,
as onnxruntime does with `export.onnx_weights`). A conv's filter is [Cout, kh, kw, Cin] (lowbit's
records run along Cin·kh·kw in torch's order and are permuted, per channel the same codes). The
graph lowering (tracing, NHWC, padding, ReLU fusion, pooling, flatten) is `export.tflite`'s.

Not expressible, refused with the layer's name: groups along the inputs (TFLite quantizes per
axis only: quantize per channel, --group-size 0), codebook / float formats, float or scaled zero
points, act-order columns (g_idx). The file is written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.export.onnx_weights import check_exportable, checked_float_copy
from lowbit.export.tflite import (ACT_NONE, ACT_RELU, DEQUANTIZE, FULLY_CONNECTED, OPT_FC, _Lowering, _Record, _Value,
                                  traced)
from lowbit.export.tflite_file import options
from lowbit.io.atomic import atomic_write_bytes

DEQUANTIZE_PER_CHANNEL = 5  # the DEQUANTIZE version that takes per-axis int8 (TFLite's op versioning)


def check_tflite_record(name: str, qw: QuantizedWeight) -> None:
    check_exportable(name, qw)
    if qw.spec.granularity != "channel":
        raise LowbitError(f"{name}: {qw.spec.describe()}: TFLite quantizes per output channel only; quantize "
                          "per channel (--group-size 0) for TFLite")


def int8_codes(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """The record's codes as int8 and the int8 zero point of each output channel: symmetric codes as
    they are (zero 0); asymmetric unsigned codes of up to 7 bits as they are (zero z), 8-bit ones
    shifted by -128 with their zero (the same real values)."""
    codes = qw.codes.to(torch.int32)
    zero = torch.zeros(qw.shape[0], dtype=torch.int32) if qw.zero is None else \
        qw.zero.reshape(-1).round().to(torch.int32)
    if qw.zero is not None and qw.spec.bits == 8:
        codes, zero = codes - 128, zero - 128
    return codes.numpy().astype(np.int8), zero.numpy().astype(np.int64)


class _WeightOnly(_Lowering):
    """The lowering of `export.tflite` with float activations and the recorded layers' int8 filters."""

    def __init__(self, gm: fx.GraphModule, rec: _Record, records: dict[str, QuantizedWeight]):
        super().__init__(gm, rec)
        self.records = records

    def layer_of(self, n: fx.Node):
        if n.op == "call_module" and n.target in self.records and isinstance(self.modules[n.target],
                                                                             (nn.Conv2d, nn.Linear)):
            return self.modules[n.target]
        return None

    def is_linear(self, n: fx.Node) -> bool:
        return isinstance(self.layer_of(n), nn.Linear)

    def filter(self, name: str, conv: tuple | None = None, cols: np.ndarray | None = None) -> int:
        qw = self.records[name]
        codes, zero = int8_codes(qw)
        if conv is not None:
            cin, kh, kw = conv
            codes = codes.reshape(len(codes), cin, kh, kw).transpose(0, 2, 3, 1)
        if cols is not None:
            codes = codes[:, cols]
        scale = qw.scale.float().reshape(-1).numpy()
        q = self.f.const(f"{name}.weight", np.ascontiguousarray(codes), scale=scale, zero=zero, axis=0)
        w = self.f.tensor(self._name(f"{name}.weight_float"), codes.shape, np.float32)
        self.f.op(DEQUANTIZE, [q], [w], version=DEQUANTIZE_PER_CHANNEL)
        return w

    def bias(self, name: str, layer) -> int:
        b = layer.bias.detach().float().numpy() if layer.bias is not None else np.zeros(self.records[name].shape[0])
        return self.f.const(f"{name}.bias", b.astype(np.float32))

    def layer(self, n: fx.Node, layer, last: fx.Node, relu: bool) -> _Value:
        src = self.values[n.args[0].name]
        act = ACT_RELU if relu else ACT_NONE
        shape = self.rec.shapes[n.name]
        out_name = last.target if last.op == "call_module" else last.name
        if isinstance(layer, nn.Conv2d):
            if len(src.shape) != 4 or layer.groups != 1:
                raise LowbitError(f"{n.target}: only groups=1 Conv2d on 4-D inputs is lowered to TFLite")
            wt = self.filter(n.target, (layer.in_channels, *layer.kernel_size))
            return self.conv2d(n, layer, src, wt, self.bias(n.target, layer), None, None, out_name, act, last, 1)
        wt = self.filter(n.target, cols=src.columns)
        out = self._act(out_name, shape, None)
        keep = len(shape) > 2
        opts = options("FullyConnectedOptions", FusedActivationFunction=act, KeepNumDims=keep)
        self.f.op(FULLY_CONNECTED, [self.need(src, None, "nchw"), wt, self.bias(n.target, layer)], [out], OPT_FC,
                  opts, 5 if keep else 1)
        return _Value(shape, "nchw", {(None, "nchw"): out}, self.rec.ranges[last.name])


def to_tflite_weight_only(model: nn.Module, records: dict[str, QuantizedWeight], example_inputs) -> bytes:
    """The .tflite bytes of a model quantized by `quantize_module` (its returned `records`, or those
    `load_module` reads back); `example_inputs`: a tensor or a tuple of tensors (shapes only)."""
    gm, rec = traced(checked_float_copy(model, records, check_tflite_record), example_inputs, fx.Tracer())
    return _WeightOnly(gm, rec, records).lower().to_bytes()


def export_weight_only(model: nn.Module, records: dict[str, QuantizedWeight], example_inputs,
                       out: str | Path) -> Path:
    """Write the .tflite file of a weight-only quantized model (atomically; see the module doc)."""
    data = to_tflite_weight_only(model, records, example_inputs)
    out = Path(out)
    atomic_write_bytes(out, data)
    return out


__all__ = ["export_weight_only", "int8_codes", "to_tflite_weight_only"]
