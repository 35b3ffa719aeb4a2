"""A TFLite flatbuffer (schema v3, file identifier "TFL3") written with the `tflite` package's
generated builders: one subgraph of tensors (shape, type, buffer, quantization), constant buffers
(16-byte aligned, buffer 0 the empty sentinel), operator codes and operators with builtin options.

Quantization follows the TFLite int8 spec: real = (q - zero_point) * scale; weights int8 in
[-127, 127] with zero point 0, per axis along `quantized_dimension` (0: output channels of conv /
fully-connected filters); activations int8 [-128, 127] with one scale and zero point per tensor;
biases int32 with scale = input scale x weight scale, zero point 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TYPES = {np.dtype(np.float32): 0, np.dtype(np.int32): 2, np.dtype(np.int64): 4, np.dtype(np.int8): 9}
EXTENDED_CODES = 127  # PLACEHOLDER_FOR_GREATER_OP_CODES: builtins past 127 live in `builtin_code` only


def schema(table: str):
    """The `tflite` package's generated module of one schema table (its builder functions)."""
    import importlib

    return importlib.import_module(f"tflite.{table}")


def options(table: str, **fields):
    """A builtin-options table for `TFLiteFile.op`: options("Conv2DOptions", StrideW=2, ...) calls
    the schema's Conv2DOptionsStart / Conv2DOptionsAddStrideW / ... / Conv2DOptionsEnd."""
    def build(b):
        m = schema(table)
        getattr(m, f"{table}Start")(b)
        for k, v in fields.items():
            getattr(m, f"{table}Add{k}")(b, v)
        return getattr(m, f"{table}End")(b)
    return build


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    buffer: int
    scale: np.ndarray | None
    zero: np.ndarray | None
    axis: int
    batch_dim: bool  # an activation: its dimension 0 is the batch (shape signature -1 there)


@dataclass
class _Op:
    opcode: int
    inputs: list[int]
    outputs: list[int]
    options_type: int
    options: object  # callable(builder) -> offset, or None


class TFLiteFile:
    """Collects tensors and operators, then `to_bytes()` serializes the model."""

    def __init__(self, description: str = "lowbit"):
        self.description = description
        self.buffers: list[bytes] = [b""]
        self.tensors: list[_Tensor] = []
        self.opcodes: dict[tuple[int, int], int] = {}
        self.ops: list[_Op] = []
        self.inputs: list[int] = []
        self.outputs: list[int] = []

    def tensor(self, name: str, shape, dtype, *, data: np.ndarray | None = None, scale=None, zero=None,
               axis: int = 0, batch_dim: bool = False) -> int:
        """A tensor; `data` makes it a constant. scale / zero: per tensor (scalars) or per axis."""
        buf = 0
        if data is not None:
            arr = np.ascontiguousarray(data, dtype=dtype)
            buf = len(self.buffers)
            self.buffers.append(arr.tobytes())
        sc = None if scale is None else np.atleast_1d(np.asarray(scale, dtype=np.float32))
        zp = None if scale is None else np.atleast_1d(np.asarray(0 if zero is None else zero, dtype=np.int64))
        if sc is not None and zp.size == 1 and sc.size > 1:
            zp = np.full(sc.size, int(zp[0]), dtype=np.int64)
        self.tensors.append(_Tensor(name, tuple(int(d) for d in shape), np.dtype(dtype), buf, sc, zp, axis,
                                    batch_dim))
        return len(self.tensors) - 1

    def const(self, name: str, data: np.ndarray, **quant) -> int:
        data = np.asarray(data)
        return self.tensor(name, data.shape, data.dtype, data=data, **quant)

    def op(self, code: int, inputs: list[int], outputs: list[int], options_type: int = 0, options=None,
           version: int = 1) -> None:
        key = (code, version)
        if key not in self.opcodes:
            self.opcodes[key] = len(self.opcodes)
        self.ops.append(_Op(self.opcodes[key], list(inputs), list(outputs), options_type, options))

    # ---- serialization ------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        import flatbuffers

        Buffer, Model, Operator, OperatorCode, QuantizationParameters, SubGraph, Tensor = (schema(n) for n in (
            "Buffer", "Model", "Operator", "OperatorCode", "QuantizationParameters", "SubGraph", "Tensor"))

        b = flatbuffers.Builder(1024 + sum(len(x) for x in self.buffers))

        def ivec(start, values, dtype=np.int32):
            return b.CreateNumpyVector(np.asarray(values, dtype=dtype)) if len(values) else _empty(b, start)

        def _empty(builder, start):
            start(builder, 0)
            return builder.EndVector()

        def table_vec(start, offsets):
            start(b, len(offsets))
            for o in reversed(offsets):
                b.PrependUOffsetTRelative(o)
            return b.EndVector()

        # buffers: raw bytes, aligned so int32 / float32 constants are read in place
        buf_offs = []
        for data in self.buffers:
            vec = None
            if data:
                b.StartVector(1, len(data), 16)
                b.head -= len(data)
                b.Bytes[b.head:b.head + len(data)] = data
                vec = b.EndVector()
            Buffer.BufferStart(b)
            if vec is not None:
                Buffer.BufferAddData(b, vec)
            buf_offs.append(Buffer.BufferEnd(b))

        tensor_offs = []
        for t in self.tensors:
            name = b.CreateString(t.name)
            shape = ivec(Tensor.TensorStartShapeVector, t.shape)
            sig = None
            if t.batch_dim and t.shape:
                sig = ivec(Tensor.TensorStartShapeSignatureVector, (-1, *t.shape[1:]))
            q = None
            if t.scale is not None:
                sc = b.CreateNumpyVector(t.scale)
                zp = b.CreateNumpyVector(t.zero)
                QuantizationParameters.QuantizationParametersStart(b)
                QuantizationParameters.QuantizationParametersAddScale(b, sc)
                QuantizationParameters.QuantizationParametersAddZeroPoint(b, zp)
                QuantizationParameters.QuantizationParametersAddQuantizedDimension(b, t.axis)
                q = QuantizationParameters.QuantizationParametersEnd(b)
            Tensor.TensorStart(b)
            Tensor.TensorAddShape(b, shape)
            if sig is not None:
                Tensor.TensorAddShapeSignature(b, sig)
            Tensor.TensorAddType(b, TYPES[t.dtype])
            Tensor.TensorAddBuffer(b, t.buffer)
            Tensor.TensorAddName(b, name)
            if q is not None:
                Tensor.TensorAddQuantization(b, q)
            tensor_offs.append(Tensor.TensorEnd(b))

        op_offs = []
        for o in self.ops:
            opts = o.options(b) if o.options is not None else None
            ins = ivec(Operator.OperatorStartInputsVector, o.inputs)
            outs = ivec(Operator.OperatorStartOutputsVector, o.outputs)
            Operator.OperatorStart(b)
            Operator.OperatorAddOpcodeIndex(b, o.opcode)
            Operator.OperatorAddInputs(b, ins)
            Operator.OperatorAddOutputs(b, outs)
            if opts is not None:
                Operator.OperatorAddBuiltinOptionsType(b, o.options_type)
                Operator.OperatorAddBuiltinOptions(b, opts)
            op_offs.append(Operator.OperatorEnd(b))

        tensors = table_vec(SubGraph.SubGraphStartTensorsVector, tensor_offs)
        ops = table_vec(SubGraph.SubGraphStartOperatorsVector, op_offs)
        ins = ivec(SubGraph.SubGraphStartInputsVector, self.inputs)
        outs = ivec(SubGraph.SubGraphStartOutputsVector, self.outputs)
        sg_name = b.CreateString("main")
        SubGraph.SubGraphStart(b)
        SubGraph.SubGraphAddTensors(b, tensors)
        SubGraph.SubGraphAddInputs(b, ins)
        SubGraph.SubGraphAddOutputs(b, outs)
        SubGraph.SubGraphAddOperators(b, ops)
        SubGraph.SubGraphAddName(b, sg_name)
        subgraph = SubGraph.SubGraphEnd(b)

        code_offs = []
        for code, version in self.opcodes:  # dicts keep insertion order = opcode index
            OperatorCode.OperatorCodeStart(b)
            OperatorCode.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, EXTENDED_CODES))
            OperatorCode.OperatorCodeAddBuiltinCode(b, code)
            OperatorCode.OperatorCodeAddVersion(b, version)
            code_offs.append(OperatorCode.OperatorCodeEnd(b))

        codes = table_vec(Model.ModelStartOperatorCodesVector, code_offs)
        subgraphs = table_vec(Model.ModelStartSubgraphsVector, [subgraph])
        buffers = table_vec(Model.ModelStartBuffersVector, buf_offs)
        desc = b.CreateString(self.description)
        Model.ModelStart(b)
        Model.ModelAddVersion(b, 3)
        Model.ModelAddOperatorCodes(b, codes)
        Model.ModelAddSubgraphs(b, subgraphs)
        Model.ModelAddDescription(b, desc)
        Model.ModelAddBuffers(b, buffers)
        b.Finish(Model.ModelEnd(b), file_identifier=b"TFL3")
        return bytes(b.Output())
