"""convert_qat(model): each FakeQuantLayer becomes the real quantized module — QuantLinear /
QuantConv2d (weight-only) or Int8Linear / Int8Conv2d (with activations) — holding exactly the
integer codes, scales and zeros the fake-quant forward used."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core.quantize import QuantizedWeight
from lowbit.nn.int8_conv import Int8Conv2d
from lowbit.nn.int8_linear import Int8Linear
from lowbit.nn.quant_conv import QuantConv2d
from lowbit.nn.quant_linear import QuantLinear
from lowbit.nn.replace import replace_linear
from lowbit.qat.fake_quant_layer import FakeQuantLayer
from lowbit.qat.prepare import ATTR, qat_layers


def _real_module(layer: FakeQuantLayer, qw: QuantizedWeight, kernel: str | None) -> nn.Module:
    bias = None if layer.bias is None else layer.bias.detach()
    s = layer.scheme
    if s.input is None:
        inner = QuantLinear.from_quantized(qw, bias, name=layer.name, kernel=kernel)
        if not layer.is_conv:
            return inner
        k, st, p, d = layer.geometry
        return QuantConv2d(inner, layer.in_channels, layer.out_channels, k, st, p, d, name=layer.name)
    scale, zero = layer.input_qparams()
    lin = Int8Linear.from_record(qw, bias, s, scale, zero, name=layer.name)
    if not layer.is_conv:
        return lin
    k, st, p, d = layer.geometry
    conv = Int8Conv2d(layer.in_channels, layer.out_channels, k, st, p, d, scheme=s, bias=bias is not None,
                      name=layer.name)
    conv.inner = lin
    return conv


@torch.no_grad()
def convert_qat(model: nn.Module, kernel: str | None = None) -> dict[str, QuantizedWeight]:
    """In place; returns {name: record} of the converted layers (what `export/` writers take).
    `kernel` picks QuantLinear's kernel ("cpu" / "torch"; None: the fastest available)."""
    records = {}
    for name, layer in qat_layers(model).items():
        qw = layer.record()
        replace_linear(model, name, _real_module(layer, qw, kernel))
        records[name] = qw
    model.__dict__.pop(ATTR, None)
    return records
