"""ONNX export of an activation-quantized model (lowbit.ptq), run by onnxruntime.

Static layers are QDQ: QuantizeLinear / DequantizeLinear on the input with the calibrated scale
(symmetric specs as int8 [-128, 127] around zero 0; per-channel input scales as a Mul by 1/s then
unit-scale codes), the weight an int8 initializer with its per-channel scales into
DequantizeLinear, an output spec as one more Q/DQ pair. Dynamic Linears keep lowbit's per-token
arithmetic in standard ops: scale = ReduceMax(|x|) / 127 per row, codes by Round / Clip, then
MatMulInteger against the int8 weight, the two scales and the bias after it. Dynamic Conv2d (one
scale per patch) has no such form and is refused.

How: every int8 module of a copy of the model becomes a float "shadow" whose forward spells its
arithmetic with torch's fake-quantize ops (exported as Q/DQ), the TorchScript exporter writes the
graph, and `onnx_graph` turns constant weights into int8 initializers (and the dynamic MatMuls into
MatMulInteger). The file is written atomically.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_write_bytes
from lowbit.nn.int8_conv import Int8Conv2d
from lowbit.nn.int8_linear import Int8Linear
from lowbit.nn.replace import replace_linear

OPSET = 17


def _fq_act(x, scale, zero, spec):
    """Q/DQ of an activation with lowbit's parameters (int8 [-128, 127] or uint8 [0, 255])."""
    lo, hi = (-128, 127) if spec.symmetric else (0, 255)
    if scale.dim() > 0 and scale.numel() > 1:  # per channel: x / s, then codes with unit scale
        x = x * (1.0 / scale)
        z = torch.zeros(scale.numel(), dtype=torch.int32) if zero is None else zero.round().to(torch.int32)
        axis = 1
        return torch.fake_quantize_per_channel_affine(x, torch.ones(scale.numel()), z, axis, lo, hi)
    z = 0 if zero is None else int(zero)
    return torch.fake_quantize_per_tensor_affine(x, float(scale), z, lo, hi)


class _Shadow(nn.Module):
    """A float stand-in for one Int8Linear (over 2-D inputs) or Int8Conv2d, for export only."""

    def __init__(self, lin: Int8Linear, conv: Int8Conv2d | None = None):
        super().__init__()
        self.lin, self.conv = lin, conv
        w = lin.weight_codes.float() * lin.weight_scale[:, None]
        self.weight = nn.Parameter(w, requires_grad=False)
        self.register_buffer("wscale", lin.weight_scale.clone())
        self.register_buffer("codes_t", lin.weight_codes.float().t().contiguous())

    def _weight(self):
        zeros = torch.zeros(self.wscale.numel(), dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(self.weight, self.wscale, zeros, 0, -128, 127)

    def forward(self, x):
        lin, a = self.lin, self.lin.scheme.input
        if self.conv is not None:
            c = self.conv
            if a.granularity == "channel":
                area = c.kernel_size[0] * c.kernel_size[1]
                s = lin.input_scale.reshape(c.in_channels, area)[:, 0].reshape(1, -1, 1, 1)
                z = None if lin.input_zero is None else lin.input_zero.reshape(c.in_channels, area)[:, 0]
                x = x * (1.0 / s)
                lo, hi = (-128, 127) if a.symmetric else (0, 255)
                zz = torch.zeros(c.in_channels, dtype=torch.int32) if z is None else z.round().to(torch.int32)
                xq = torch.fake_quantize_per_channel_affine(x, torch.ones(c.in_channels), zz, 1, lo, hi)
                w = self._weight().reshape(c.out_channels, c.in_channels, *c.kernel_size)  # x already / s
            else:
                xq = _fq_act(x, lin.input_scale, lin.input_zero, a)
                w = self._weight().reshape(c.out_channels, c.in_channels, *c.kernel_size)
            y = F.conv2d(xq, w, lin.bias, c.stride, c.padding, c.dilation)
        else:
            shape = x.shape
            x2 = x.reshape(-1, lin.in_features)
            if a.dynamic:
                if a.granularity == "token":
                    s = x2.abs().amax(dim=1, keepdim=True) / 127.0
                else:
                    s = x2.abs().amax().reshape(1, 1) / 127.0
                s = torch.clamp(s, min=1e-12)
                q = torch.clamp(torch.round(x2 / s), -127, 127)
                y = torch.matmul(q, self.codes_t) * s * self.wscale
                if lin.bias is not None:
                    y = y + lin.bias
            else:
                y = F.linear(_fq_act(x2, lin.input_scale, lin.input_zero, a), self._weight(), lin.bias)
            y = y.reshape(*shape[:-1], lin.out_features)
        o = lin.scheme.output
        if o is not None:
            y = _fq_act(y, lin.output_scale, lin.output_zero, o)
        return y


def shadow_model(model: nn.Module) -> tuple[nn.Module, set[str]]:
    """A copy of `model` with every int8 module replaced by its export shadow; the names of the
    dynamic layers' code tensors (for MatMulInteger)."""
    m = copy.deepcopy(model).eval()
    dynamic = set()
    targets = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, Int8Conv2d)
               or (isinstance(mod, Int8Linear) and not n.endswith(".inner"))]
    if not targets:
        raise LowbitError(f"{type(model).__name__} holds no int8 modules; run lowbit.ptq.convert before exporting")
    for name, mod in targets:
        if isinstance(mod, Int8Conv2d):
            if mod.scheme.input.dynamic:
                raise LowbitError(f"{name}: a dynamic Conv2d (one scale per patch) has no ONNX form; quantize convs "
                                  "with a static scheme for export")
            replace_linear(m, name, _Shadow(mod.inner, mod))
        else:
            replace_linear(m, name, _Shadow(mod))
            if mod.scheme.input.dynamic:
                dynamic.add(f"{name}.codes_t")
    return m, dynamic


def export(model: nn.Module, example_inputs: tuple, out: str | Path, *, input_names=None, output_names=None,
           dynamic_axes=None) -> Path:
    """Write the ONNX file of a converted model (QDQ / MatMulInteger, int8 weights)."""
    import onnx

    from lowbit.export.onnx_graph import fold_constant_quantize, to_matmul_integer

    shadow, dynamic = shadow_model(model)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(shadow, tuple(example_inputs), buf, dynamo=False, opset_version=OPSET,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                          do_constant_folding=False)
    proto = onnx.load_from_string(buf.getvalue())
    fold_constant_quantize(proto)
    _codes_to_int8(proto, dynamic)
    to_matmul_integer(proto, {n + "_int8" for n in dynamic})
    onnx.checker.check_model(proto)
    out = Path(out)
    atomic_write_bytes(out, proto.SerializeToString())
    return out


def _codes_to_int8(proto, names: set[str]) -> None:
    """The dynamic layers' float code tensors -> int8 initializers behind a Cast to float."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = proto.graph
    for init in list(g.initializer):
        if init.name in names:
            arr = numpy_helper.to_array(init).astype(np.int8)
            g.initializer.remove(init)
            g.initializer.append(numpy_helper.from_array(arr, init.name + "_int8"))
            g.node.insert(0, helper.make_node("Cast", [init.name + "_int8"], [init.name], to=1))
