"""ONNX export of a weight-only quantized model (any nn.Module through `quantize_module`: CNNs,
encoders), run by onnxruntime.

Each quantized layer's record (what `quantize_module` returns, or `load_module` reads back; nothing is
read out of a kernel's packed layout) becomes a DequantizeLinear (opset 21) of its integer codes:
int4 / uint4 initializers for up to 4 bits (two codes a byte), int8 / uint8 up to 8; symmetric codes
signed with no zero point, asymmetric codes unsigned with lowbit's integer zero points; scales as
float32 (lowbit's float16 scales exactly), one per output channel (axis 0) or one per group of
`group_size` inputs (axis 1, block_size). A conv's [Cout, Cin·kh·kw] weight is dequantized in that
2-D form (lowbit's groups run along Cin·kh·kw) and reshaped to [Cout, Cin, kh, kw]. The rest of the
graph is torch's export of the model with those weights in float; the runtime dequantizes the
weights and runs the float ops, so outputs equal the model's with its dequantized weights up to
float32 rounding (lowbit's own kernels multiply in bf16).

Not expressible, refused with the layer's name: float (non-integer) zero points, llama.cpp-style
scaled zeros, codebook / float formats (nf4, fp8), act-order columns (g_idx).
"""

from __future__ import annotations

import copy
import io
import logging
from pathlib import Path

import torch
from torch import nn

from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_write_bytes
from lowbit.nn.quant_conv import QuantConv2d
from lowbit.nn.quant_linear import QuantLinear
from lowbit.nn.replace import replace_linear

EXPORT_OPSET = 17  # what torch's TorchScript exporter writes; then converted
OPSET = 21  # blocked DequantizeLinear, int4 / uint4

log = logging.getLogger(__name__)


def check_exportable(name: str, qw: QuantizedWeight) -> None:
    spec = qw.spec
    if spec.dtype != "int":
        raise LowbitError(f"{name}: {spec.describe()} has no DequantizeLinear form (integer codes only); "
                          "quantize with --dtype int for ONNX")
    if spec.scaled_zero:
        raise LowbitError(f"{name}: a scaled zero (q·s - m) has no DequantizeLinear form")
    if qw.zero is not None and not torch.equal(qw.zero.float(), qw.zero.float().round()):
        raise LowbitError(f"{name}: float zero points have no DequantizeLinear form; quantize with integer zeros")
    if qw.g_idx is not None:
        raise LowbitError(f"{name}: act-order groups (g_idx) have no DequantizeLinear form; quantize with "
                          "static groups (GPTQ's default)")
    if spec.granularity not in ("channel", "group", "tensor"):
        raise LowbitError(f"{name}: {spec.describe()} has no DequantizeLinear form")


def float_copy(model: nn.Module, records: dict[str, QuantizedWeight]) -> nn.Module:
    """A copy of `model` with each recorded layer (QuantLinear / QuantConv2d, or the float layer
    itself when not swapped) as the nn.Linear / nn.Conv2d of its dequantized weight."""
    m = copy.deepcopy(model).eval()
    for name, qw in records.items():
        mod = m.get_submodule(name)
        if isinstance(mod, (QuantConv2d, nn.Conv2d)):
            bias = mod.inner.bias if isinstance(mod, QuantConv2d) else mod.bias
            new = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                            bias=bias is not None)
        elif isinstance(mod, (QuantLinear, nn.Linear)):
            bias = mod.bias
            new = nn.Linear(mod.in_features, mod.out_features, bias=bias is not None)
        else:
            raise LowbitError(f"{name}: a {type(mod).__name__}, not a quantized Linear / Conv2d; the records do not "
                              "belong to this model")
        if tuple(qw.shape) != (new.weight.shape[0], new.weight[0].numel()):
            raise LowbitError(f"{name}: record of shape {tuple(qw.shape)} does not fit the layer's weight "
                              f"{tuple(new.weight.shape)}")
        new.weight.data = qw.dequantize().reshape(new.weight.shape)
        if bias is not None:
            new.bias.data = bias.detach().float().clone()
        replace_linear(m, name, new)
    return m


def checked_float_copy(model: nn.Module, records: dict[str, QuantizedWeight], check) -> nn.Module:
    """`float_copy` once every record passed `check(name, record)` (a format's own refusals)."""
    if not records:
        raise LowbitError(f"no quantized layer records for {type(model).__name__}; pass what "
                          "lowbit.quantize_module returned")
    for name, qw in records.items():
        check(name, qw)
    return float_copy(model, records)


def _int_tensor(name: str, elem: int, dims: list[int], values: torch.Tensor, small: bool):
    """An integer initializer as raw bytes: one a byte, or two 4-bit values a byte (first in the low nibble)."""
    from onnx import helper

    v = values.to(torch.int32).flatten()
    if small:
        v = v & 0xF
        if v.numel() % 2:
            v = torch.cat([v, v.new_zeros(1)])
        raw = (v[0::2] | (v[1::2] << 4)).to(torch.uint8)
    else:
        raw = v.to(torch.uint8)  # two's complement bytes for int8
    return helper.make_tensor(name, elem, dims, raw.numpy().tobytes(), raw=True)


def _weight_nodes(name: str, qw: QuantizedWeight, shape: tuple[int, ...]):
    """(initializers, nodes) producing the float weight tensor `name` of `shape` from qw's codes."""
    from onnx import TensorProto, helper

    spec = qw.spec
    signed = spec.symmetric
    small = spec.bits <= 4
    elem = {(True, True): TensorProto.INT4, (True, False): TensorProto.UINT4,
            (False, True): TensorProto.INT8, (False, False): TensorProto.UINT8}[(small, signed)]
    rows, cols = qw.shape
    inits = [_int_tensor(f"{name}_q", elem, [rows, cols], qw.codes, small)]
    scale = qw.scale.float()
    attrs = {}
    if spec.granularity == "group":
        sdims = [rows, cols // spec.group_size]
        attrs = {"axis": 1, "block_size": spec.group_size}
    elif spec.granularity == "channel":
        sdims = [rows]
        attrs = {"axis": 0}
    else:
        sdims = []
    inits.append(helper.make_tensor(f"{name}_scale", TensorProto.FLOAT, sdims, scale.flatten().tolist()))
    ins = [f"{name}_q", f"{name}_scale"]
    if qw.zero is not None:
        inits.append(_int_tensor(f"{name}_zero", elem, sdims, qw.zero.float().round(), small))
        ins.append(f"{name}_zero")
    nodes = []
    flat = f"{name}_2d" if len(shape) != 2 else name
    nodes.append(helper.make_node("DequantizeLinear", ins, [flat], name=f"{name}_dequantize", **attrs))
    if flat != name:
        inits.append(helper.make_tensor(f"{name}_shape", TensorProto.INT64, [len(shape)], list(shape)))
        nodes.append(helper.make_node("Reshape", [flat, f"{name}_shape"], [name], name=f"{name}_reshape"))
    return inits, nodes


def export_weight_only(model: nn.Module, records: dict[str, QuantizedWeight], example_inputs: tuple,
                       out: str | Path, *, input_names=None, output_names=None, dynamic_axes=None) -> Path:
    """Write the ONNX file of a model quantized by `quantize_module` (its returned `records`, or
    those `load_module` reads back): DequantizeLinear of integer codes for every recorded weight
    (see the module doc)."""
    import onnx
    from onnx import version_converter

    from lowbit.export.onnx_graph import prune

    shadow = checked_float_copy(model, records, check_exportable)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(shadow, tuple(example_inputs), buf, dynamo=False, opset_version=EXPORT_OPSET,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                          do_constant_folding=False)
    proto = version_converter.convert_version(onnx.load_from_string(buf.getvalue()), OPSET)
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes, absent = [], []
    for name, qw in records.items():
        wname = f"{name}.weight"
        if wname not in inits:  # not on the path to the outputs (a pooler when exporting the hidden states)
            absent.append(name)
            continue
        shape = tuple(inits[wname].dims)
        g.initializer.remove(inits[wname])
        add_inits, nodes = _weight_nodes(wname, qw, shape)
        g.initializer.extend(add_inits)
        new_nodes += nodes
    for k, node in enumerate(new_nodes):
        g.node.insert(k, node)
    prune(g)
    left = {tuple(i.dims) for i in g.initializer if len(i.dims) >= 2 and i.data_type == onnx.TensorProto.FLOAT}
    for name in absent:
        mod = model.get_submodule(name)
        rows, cols = records[name].shape
        if (rows, cols) in left or (cols, rows) in left or (isinstance(mod, (QuantConv2d, nn.Conv2d)) and any(
                d[0] == rows and len(d) == 4 for d in left)):
            raise LowbitError(f"{name}: torch's ONNX export did not keep its weight as {name}.weight; cannot place "
                              "its DequantizeLinear")
    if absent:
        log.info("not in the exported graph (unused by its outputs): %s", ", ".join(absent))
    onnx.checker.check_model(proto)
    out = Path(out)
    atomic_write_bytes(out, proto.SerializeToString())
    return out
