"""TFLite full-integer export of a static-int8 model (lowbit.ptq), run by ai-edge-litert's interpreter.

The converted model is traced with torch.fx (Int8Conv2d / Int8Linear as leaves) and each node is
lowered to TFLite builtins: CONV_2D / FULLY_CONNECTED with lowbit's int8 codes as per-channel
filters (zero point 0) and int32 biases at scale = input scale x weight scale, activations int8
per tensor with lowbit's calibrated scales (asymmetric uint8 codes q as int8 q - 128 with zero
point z - 128), QUANTIZE at the float input, DEQUANTIZE at the output, RELU fused into the layer
before it, RESHAPE / TRANSPOSE / PAD / MAX_POOL_2D / AVERAGE_POOL_2D in int8.

Each int8 layer's output tensor takes the input parameters of the int8 layer that reads it (through
ReLU, Flatten, pooling): lowbit rounds the float result onto exactly that grid, so TFLite's
requantization gives the same codes up to its fixed-point rounding. Outputs no int8 layer reads (the
model's logits) get a scheme's output spec when it has one, else a min-max range over
`example_inputs` (asymmetric int8). Convolutions run NHWC (TRANSPOSE after the input's QUANTIZE and
before a Flatten, so torch's NCHW order is kept; a Flatten read only by Linears permutes their
weight columns instead). Dynamic input specs and per-channel input scales
have no full-integer form in TFLite and are refused. The file is written atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from lowbit.errors import LowbitError
from lowbit.export.tflite_file import TFLiteFile, options
from lowbit.io.atomic import atomic_write_bytes
from lowbit.nn.int8_conv import Int8Conv2d
from lowbit.nn.int8_linear import Int8Linear
from lowbit.observers.qparams import range_qparams
from lowbit.spec import ActSpec

# builtin operator codes, builtin option types, fused activations, paddings (TFLite schema v3)
CONV_2D, FULLY_CONNECTED, QUANTIZE, DEQUANTIZE, RESHAPE, TRANSPOSE, PAD = 3, 9, 114, 6, 22, 39, 34
MAX_POOL_2D, AVERAGE_POOL_2D, RELU = 17, 1, 19
OPT_CONV, OPT_POOL, OPT_FC = 1, 5, 8
ACT_NONE, ACT_RELU = 0, 1
SAME, VALID = 0, 1
# versions that declare what the ops take: int8 conv per channel (3), int8 FC (4), int8 quantize (2)
VERSIONS = {CONV_2D: 3, FULLY_CONNECTED: 4, QUANTIZE: 2, DEQUANTIZE: 2, TRANSPOSE: 2, PAD: 2, MAX_POOL_2D: 2,
            AVERAGE_POOL_2D: 2, RELU: 2, RESHAPE: 1}
NHWC, NCHW = (0, 2, 3, 1), (0, 3, 1, 2)
OUTPUT_SPEC = ActSpec(symmetric=False, granularity="tensor", dynamic=False)

Qp = tuple[float, int]  # (scale, int8 zero point); None stands for float32


def _relu(n: fx.Node, modules) -> bool:
    if n.op == "call_module":
        return isinstance(modules[n.target], nn.ReLU)
    return n.op in ("call_function", "call_method") and n.target in (F.relu, torch.relu, "relu")


def _passthrough(n: fx.Node, modules) -> bool:
    return n.op == "call_module" and isinstance(modules[n.target], (nn.Identity, nn.Dropout))


def _reshape(n: fx.Node, modules) -> bool:
    if n.op == "call_module":
        return isinstance(modules[n.target], nn.Flatten)
    return n.target in (torch.flatten, torch.reshape, "view", "reshape", "flatten")


def _pool(n: fx.Node, modules) -> bool:
    return n.op == "call_module" and isinstance(modules[n.target], (nn.MaxPool2d, nn.AvgPool2d))


def _layer(n: fx.Node, modules):
    if n.op == "call_module" and isinstance(modules[n.target], (Int8Conv2d, Int8Linear)):
        return modules[n.target]
    return None


def input_qparams(layer, name: str) -> Qp:
    """A static per-tensor input spec as TFLite int8 (scale, zero point)."""
    lin = layer.inner if isinstance(layer, Int8Conv2d) else layer
    a = lin.scheme.input
    if a.dynamic or a.granularity != "tensor" or a.bits != 8:
        raise LowbitError(f"{name}: TFLite full-integer needs static per-tensor 8-bit inputs, this layer has "
                          f"{a.describe()}; quantize with the w8a8-static scheme (granularity 'tensor')")
    zero = 0 if lin.input_zero is None else int(lin.input_zero) - 128
    return float(lin.input_scale), zero


def spec_qparams(scale, zero) -> Qp:
    """lowbit's (scale, zero) of an activation grid as TFLite int8 (scale, zero point)."""
    return float(scale), 0 if zero is None else int(zero) - 128


def int8_filter(f: TFLiteFile, name: str, lin: Int8Linear, in_qp: Qp, conv: tuple | None = None,
                rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> tuple[int, int]:
    """The layer's int8 codes as a per-output-channel filter (zero point 0; a conv's [Cout, kh, kw, Cin])
    and its bias as int32 at scale input scale x weight scale; `rows`: only these output channels;
    `cols`: the input features in this order."""
    codes, w_scale = lin.weight_codes.numpy(), lin.weight_scale.double().numpy()
    bias = lin.bias.double().numpy() if lin.bias is not None else np.zeros(len(w_scale))
    if rows is not None:
        codes, w_scale, bias = codes[rows], w_scale[rows], bias[rows]
    if cols is not None:
        codes = codes[:, cols]
    if conv is not None:
        cin, kh, kw = conv
        codes = codes.reshape(len(codes), cin, kh, kw).transpose(0, 2, 3, 1)
    flat = codes.reshape(len(codes), -1)
    big = np.abs(bias) / (in_qp[0] * w_scale) > 2**31 - 1  # the bias past int32 at input x weight scale
    empty = ~flat.any(axis=1)
    if (big & ~empty).any():
        raise LowbitError(f"{name}: a bias of {np.abs(bias[big]).max():.3g} does not fit int32 at input scale x weight "
                          "scale; TFLite cannot hold this layer")
    w_scale = np.where(big & empty, np.abs(bias) / (in_qp[0] * 2**30), w_scale)  # all-zero rows: any scale is exact
    b_scale = (in_qp[0] * w_scale).astype(np.float32)
    b_codes = np.round(bias / b_scale.astype(np.float64)).astype(np.int32)
    wt = f.const(f"{name}.weight", codes, scale=w_scale.astype(np.float32), axis=0)
    bt = f.const(f"{name}.bias", b_codes, scale=b_scale, zero=np.zeros(len(b_scale), np.int64))
    return wt, bt


def fully_connected(f: TFLiteFile, name: str, lin: Int8Linear, x: int, in_qp: Qp, out: int, act: int = ACT_NONE,
                    keep_dims: bool = False, rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> None:
    """FULLY_CONNECTED int8 x -> int8 out (their grids set on the tensors) with the layer's filter."""
    wt, bt = int8_filter(f, name, lin, in_qp, rows=rows, cols=cols)
    opts = options("FullyConnectedOptions", FusedActivationFunction=act, KeepNumDims=keep_dims)
    f.op(FULLY_CONNECTED, [x, wt, bt], [out], OPT_FC, opts, VERSIONS[FULLY_CONNECTED])


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, (Int8Conv2d, Int8Linear)) or super().is_leaf_module(m, qualname)


class _Record(fx.Interpreter):
    """Runs the graph on sample inputs, keeping each node's output shape and min / max."""

    def __init__(self, gm):
        super().__init__(gm)
        self.shapes, self.ranges = {}, {}

    def run_node(self, n):
        out = super().run_node(n)
        if torch.is_tensor(out):
            if out.is_floating_point() and not bool(torch.isfinite(out).all()):
                raise LowbitError(f"{n.name}: NaN/Inf values on the example inputs; export needs finite examples "
                                  "(they set the grids of outputs no int8 layer reads)")
            self.shapes[n.name] = tuple(out.shape)
            lo, hi = float(out.min()), float(out.max())
            plo, phi = self.ranges.get(n.name, (lo, hi))
            self.ranges[n.name] = (min(lo, plo), max(hi, phi))
        return out


@dataclass
class _Value:
    """One torch tensor of the graph and the TFLite tensors holding it, keyed by (qparams, layout)."""

    shape: tuple[int, ...]
    layout: str  # "nchw" (torch's order) or "nhwc" (as convolutions produce it)
    reps: dict = field(default_factory=dict)
    range: tuple[float, float] = (0.0, 0.0)
    columns: np.ndarray | None = None  # a flatten of NHWC data: torch's feature index of each column


class _Lowering:
    def __init__(self, gm: fx.GraphModule, rec: _Record):
        self.gm, self.rec = gm, rec
        self.modules = dict(gm.named_modules())
        self.f = TFLiteFile()
        self.values: dict[str, _Value] = {}
        self.count = 0

    # ---- the layers this lowering takes (a weight-only lowering takes float layers with records) ----
    def layer_of(self, n: fx.Node):
        return _layer(n, self.modules)

    def is_linear(self, n: fx.Node) -> bool:
        return isinstance(self.layer_of(n), Int8Linear)

    # ---- tensors ------------------------------------------------------------------------------------
    def _act(self, name: str, shape, qp: Qp | None) -> int:
        shape = (1, *shape[1:]) if shape else shape
        if qp is None:
            return self.f.tensor(name, shape, np.float32, batch_dim=True)
        return self.f.tensor(name, shape, np.int8, scale=qp[0], zero=qp[1], batch_dim=True)

    def _name(self, base: str) -> str:
        self.count += 1
        return f"{base}:{self.count}"

    def need(self, v: _Value, qp: Qp | None, layout: str | None = None) -> int:
        """The TFLite tensor holding `v` as int8 with `qp` (None: float32) in `layout`, made by
        QUANTIZE / DEQUANTIZE / TRANSPOSE from a representation it already has."""
        layout = layout or v.layout
        if len(v.shape) != 4:
            layout = v.layout
        key = (qp, layout)
        if key in v.reps:
            return v.reps[key]
        shape = v.shape if layout == "nchw" or len(v.shape) != 4 else tuple(v.shape[i] for i in NHWC)
        if layout != v.layout:
            src = self.need(v, qp, v.layout)
            perm = NHWC if layout == "nhwc" else NCHW
            out = self._act(self._name("transpose"), shape, qp)
            if v.shape[1] == 1:  # one channel: NCHW and NHWC hold the same bytes
                new = self.f.const(self._name("shape"), np.array((-1, *shape[1:]), np.int32))
                self.f.op(RESHAPE, [src, new], [out], version=VERSIONS[RESHAPE])
            else:
                self.f.op(TRANSPOSE, [src, self.f.const(self._name("perm"), np.array(perm, np.int32))], [out],
                          version=VERSIONS[TRANSPOSE])
        else:
            have = [k for k in v.reps if k[1] == layout]
            ints = [k for k in have if k[0] is not None]
            src_key = ints[0] if (qp is not None and ints) or not [k for k in have if k[0] is None] else \
                next(k for k in have if k[0] is None)
            src = v.reps[src_key]
            out = self._act(self._name("quantize" if qp is not None else "dequantize"), shape, qp)
            code = QUANTIZE if qp is not None else DEQUANTIZE
            self.f.op(code, [src], [out], version=VERSIONS[code])
        v.reps[key] = out
        return out

    # ---- choosing the grid of an int8 layer's output ------------------------------------------------
    def consumer_qparams(self, n: fx.Node) -> Qp | None:
        """The input grid of the int8 layers reading n, if they agree, through ops that commute with
        rounding onto it and clipping (ReLU, reshapes, max pooling; an average of clipped values is
        not the clipped average, so average pooling keeps the grid of its own input's range)."""
        found = set()
        for u in n.users:
            layer = _layer(u, self.modules)
            if layer is not None:
                found.add(input_qparams(layer, u.target))
            elif _relu(u, self.modules) or _passthrough(u, self.modules) or _reshape(u, self.modules) or (
                    _pool(u, self.modules) and isinstance(self.modules[u.target], nn.MaxPool2d)):
                found.add(self.consumer_qparams(u))
            else:
                found.add(None)
        return found.pop() if len(found) == 1 else None

    def calibrated(self, n: fx.Node) -> Qp:
        lo, hi = self.rec.ranges[n.name]
        s, z = range_qparams(torch.tensor(lo), torch.tensor(hi), OUTPUT_SPEC)
        return spec_qparams(s, z)

    # ---- nodes --------------------------------------------------------------------------------------
    def lower(self) -> TFLiteFile:
        fused = set()
        for n in self.gm.graph.nodes:
            if n.name in fused:
                continue
            shape = self.rec.shapes.get(n.name)
            if n.op == "placeholder":
                t = self._act(n.name, shape, None)
                self.f.inputs.append(t)
                self.values[n.name] = _Value(shape, "nchw", {(None, "nchw"): t})
            elif n.op == "output":
                outs = n.args[0] if isinstance(n.args[0], (tuple, list)) else (n.args[0],)
                for o in outs:
                    self.f.outputs.append(self.need(self.values[o.name], None, "nchw"))
            elif self.layer_of(n) is not None:
                chain = [n]  # n, the Identity / Dropout nodes after it, and a ReLU to fuse
                while len(chain[-1].users) == 1 and _passthrough(next(iter(chain[-1].users)), self.modules):
                    chain.append(next(iter(chain[-1].users)))
                after = list(chain[-1].users)
                relu = len(after) == 1 and _relu(after[0], self.modules)
                if relu:
                    chain.append(after[0])
                value = self.layer(n, self.layer_of(n), chain[-1], relu)
                for c in chain:
                    self.values[c.name] = value
                    fused.add(c.name)
            elif _passthrough(n, self.modules):
                self.values[n.name] = self.values[n.args[0].name]
            elif _relu(n, self.modules):
                self.values[n.name] = self.relu(n)
            elif _reshape(n, self.modules):
                self.values[n.name] = self.reshape(n, shape)
            elif _pool(n, self.modules):
                self.values[n.name] = self.pool(n, self.modules[n.target], shape)
            else:
                what = n.target if n.op != "call_module" else type(self.modules[n.target]).__name__
                where = n.target if n.op == "call_module" else n.name
                raise LowbitError(f"{where}: {what} has no TFLite int8 lowering in lowbit (supported: Int8Conv2d, "
                                  "Int8Linear, ReLU, Flatten / reshape, MaxPool2d, AvgPool2d, Identity, Dropout)")
        return self.f

    def layer(self, n: fx.Node, layer, last: fx.Node, relu: bool) -> _Value:
        in_qp = input_qparams(layer, n.target)
        lin = layer.inner if isinstance(layer, Int8Conv2d) else layer
        out_qp = spec_qparams(lin.output_scale, lin.output_zero) if lin.scheme.output is not None else \
            self.consumer_qparams(last) or self.calibrated(last)
        src = self.values[n.args[0].name]
        act = ACT_RELU if relu else ACT_NONE
        shape = self.rec.shapes[n.name]
        out_name = last.target if last.op == "call_module" else last.name
        if isinstance(layer, Int8Conv2d):
            if len(src.shape) != 4:
                raise LowbitError(f"{n.target}: a Conv2d input of shape {src.shape}")
            wt, bt = int8_filter(self.f, n.target, lin, in_qp, (layer.in_channels, *layer.kernel_size))
            return self.conv2d(n, layer, src, wt, bt, in_qp, out_qp, out_name, act, last, VERSIONS[CONV_2D])
        out = self._act(out_name, shape, out_qp)
        fully_connected(self.f, n.target, lin, self.need(src, in_qp, "nchw"), in_qp, out, act, len(shape) > 2,
                        cols=src.columns)
        return _Value(shape, "nchw", {(out_qp, "nchw"): out}, self.rec.ranges[last.name])

    def conv2d(self, n: fx.Node, layer, src: _Value, wt: int, bt: int, in_qp: Qp | None, out_qp: Qp | None,
               out_name: str, act: int, last: fx.Node, version: int) -> _Value:
        """CONV_2D of `src` (NHWC, padded as torch pads) with filter `wt` and bias `bt`."""
        shape = self.rec.shapes[n.name]
        x = self.need(src, in_qp, "nhwc")
        padding, x = self.pad(n, x, src.shape, in_qp, layer.kernel_size, layer.stride, layer.padding, layer.dilation)
        out = self._act(out_name, tuple(shape[i] for i in NHWC), out_qp)
        (sh, sw), (dh, dw) = layer.stride, layer.dilation
        opts = options("Conv2DOptions", Padding=padding, StrideW=sw, StrideH=sh, DilationWFactor=dw,
                       DilationHFactor=dh, FusedActivationFunction=act)
        self.f.op(CONV_2D, [x, wt, bt], [out], OPT_CONV, opts, version)
        return _Value(shape, "nhwc", {(out_qp, "nhwc"): out}, self.rec.ranges[last.name])

    def pad(self, n, x: int, shape, qp: Qp, kernel, stride, padding, dilation) -> tuple[int, int]:
        """torch's symmetric zero padding as TFLite SAME when that is the same windows, else PAD + VALID."""
        if padding == (0, 0):
            return VALID, x
        same = True
        for i, (k, s, p, d) in enumerate(zip(kernel, stride, padding, dilation)):
            size = shape[2 + i]
            out = (size + 2 * p - d * (k - 1) - 1) // s + 1
            out_same = -(-size // s)
            total = max((out_same - 1) * s + d * (k - 1) + 1 - size, 0)
            same &= out == out_same and total // 2 == p and total - total // 2 == p
        if same:
            return SAME, x
        (ph, pw) = padding
        nhwc = (shape[0], shape[2] + 2 * ph, shape[3] + 2 * pw, shape[1])
        out = self._act(self._name(f"{n.target}.pad"), nhwc, qp)
        pads = self.f.const(self._name("paddings"), np.array([[0, 0], [ph, ph], [pw, pw], [0, 0]], np.int32))
        self.f.op(PAD, [x, pads], [out], version=VERSIONS[PAD])  # int8 PAD fills with the zero point: real 0
        return VALID, out

    def relu(self, n: fx.Node) -> _Value:
        src = self.values[n.args[0].name]
        qp = next((k[0] for k in src.reps if k[0] is not None), None)
        x = self.need(src, qp)
        out = self._act(self._name("relu"), self.f.tensors[x].shape, qp)
        self.f.op(RELU, [x], [out], version=VERSIONS[RELU] if qp is not None else 1)
        return _Value(src.shape, src.layout, {(qp, src.layout): out}, self.rec.ranges[n.name])

    def reshape(self, n: fx.Node, shape) -> _Value:
        """RESHAPE in torch's (NCHW) order; a flatten of NHWC data read only by Linears skips the
        TRANSPOSE back: the Linears' weight columns are permuted instead (`_Value.columns`)."""
        src = self.values[n.args[0].name]
        qp = next((k[0] for k in src.reps if k[0] is not None), None)
        fold = src.layout == "nhwc" and len(src.shape) == 4 and len(shape) == 2 and src.shape[1] > 1 and all(
            self.is_linear(u) for u in n.users)
        x = self.need(src, qp, "nhwc" if fold else "nchw")
        new = np.array((-1, *shape[1:]), np.int32)
        out = self._act(self._name("reshape"), shape, qp)
        self.f.op(RESHAPE, [x, self.f.const(self._name("shape"), new)], [out], version=VERSIONS[RESHAPE])
        cols = None
        if fold:
            c, h, w = src.shape[1:]
            cols = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)
        return _Value(shape, "nchw", {(qp, "nchw"): out}, self.rec.ranges[n.name], cols)

    def pool(self, n: fx.Node, m, shape) -> _Value:
        pair = nn.modules.utils._pair
        k, s, p = pair(m.kernel_size), pair(m.stride or m.kernel_size), pair(m.padding)
        if p != (0, 0) or m.ceil_mode or (isinstance(m, nn.MaxPool2d) and pair(m.dilation) != (1, 1)):
            raise LowbitError(f"{n.target}: only unpadded pooling without ceil_mode / dilation is lowered to TFLite")
        src = self.values[n.args[0].name]
        qp = next((k_[0] for k_ in src.reps if k_[0] is not None), None)
        x = self.need(src, qp, "nhwc")
        out = self._act(n.target, tuple(shape[i] for i in NHWC), qp)
        code = MAX_POOL_2D if isinstance(m, nn.MaxPool2d) else AVERAGE_POOL_2D

        opts = options("Pool2DOptions", Padding=VALID, StrideW=s[1], StrideH=s[0], FilterWidth=k[1],
                       FilterHeight=k[0])
        self.f.op(code, [x], [out], OPT_POOL, opts, VERSIONS[code])
        return _Value(shape, "nhwc", {(qp, "nhwc"): out}, self.rec.ranges[n.name])


def to_tflite(model: nn.Module, example_inputs) -> bytes:
    """The .tflite bytes of a converted static-int8 model; `example_inputs`: a tensor or a tuple of
    tensors (the batch sets the ranges of outputs no int8 layer reads)."""
    if not any(isinstance(m, (Int8Conv2d, Int8Linear)) for m in model.modules()):
        raise LowbitError(f"{type(model).__name__} holds no int8 modules; run lowbit.ptq.convert before exporting")
    gm, rec = traced(model, example_inputs, _Tracer())
    return _Lowering(gm, rec).lower().to_bytes()


def traced(model: nn.Module, example_inputs, tracer: fx.Tracer) -> tuple[fx.GraphModule, _Record]:
    """The fx graph of `model` and each node's shape and range on `example_inputs` (a tensor or a
    tuple of tensors)."""
    example_inputs = (example_inputs,) if torch.is_tensor(example_inputs) else tuple(example_inputs)
    try:
        graph = tracer.trace(model.eval())
    except Exception as e:  # noqa: BLE001 - fx raises many types for untraceable Python
        raise LowbitError(f"{type(model).__name__} cannot be traced by torch.fx for TFLite export: "
                          f"{' '.join(str(e).split())[:300]}") from None
    gm = fx.GraphModule(model, graph)
    rec = _Record(gm)
    try:
        with torch.no_grad():
            rec.run(*example_inputs)
    except LowbitError as e:  # fx appends the node's trace to the message: keep the first line
        raise LowbitError(str(e).split("\n")[0]) from None
    return gm, rec


def export(model: nn.Module, example_inputs, out: str | Path) -> Path:
    """Write the .tflite file of a converted static-int8 model (atomically)."""
    data = to_tflite(model, example_inputs)
    out = Path(out)
    atomic_write_bytes(out, data)
    return out


__all__ = ["export", "input_qparams", "to_tflite"]
