"""Save / load a weight-quantized model of any architecture (`lowbit.quantize_module`'s result):
`module.json` (each quantized layer's spec, shape, kind and measured error) + `model.safetensors`
(the records in lowbit's packed layout, `export.lowbit.layer_tensors`, and every other tensor of
the model). Loading fills a fresh float instance of the architecture with the other tensors, then
swaps in QuantLinear / QuantConv2d built from the records, bit-identical to the saved ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.core.quantize import QuantizedWeight
from lowbit.errors import LowbitError
from lowbit.export.lowbit import layer_tensors, read_layer
from lowbit.io.atomic import atomic_dir, check_output_dir
from lowbit.io.manifest import read_manifest
from lowbit.nn.quant_conv import QuantConv2d, conv_weight_2d
from lowbit.spec import QuantSpec

FORMAT = "lowbit-module"
MANIFEST = "module.json"
WEIGHTS = "model.safetensors"
PREFIX = "lowbit_records."


def _float_state(model: nn.Module, records: dict) -> dict[str, torch.Tensor]:
    """The model's state dict outside the quantized layers, plus each quantized layer's bias."""
    def quantized(key: str) -> bool:
        return any(key.startswith(name + ".") for name in records)

    out = {k: v.detach() for k, v in model.state_dict().items() if not quantized(k)}
    for name in records:
        mod = model.get_submodule(name)
        bias = (mod.inner.bias if isinstance(mod, QuantConv2d) else mod.bias)
        if bias is not None:
            out[f"{name}.bias"] = bias.detach()
    return out


def save_module(model: nn.Module, records: dict[str, QuantizedWeight], out: str | Path,
                overwrite: bool = False) -> Path:
    """Write `model` (quantized by `lowbit.quantize_module`, swapped or not) and its `records`."""
    out = check_output_dir(out, overwrite, replaceable=lambda p: (p / MANIFEST).is_file(),
                           hint="name a new folder, e.g. out/cnn-w4")
    tensors = {k: v.contiguous() for k, v in _float_state(model, records).items()}
    layers = {}
    for name, qw in records.items():
        mod = model.get_submodule(name)
        kind = "conv" if isinstance(mod, (nn.Conv2d, QuantConv2d)) else "linear"
        layers[name] = {"kind": kind, "spec": qw.spec.to_dict(), "shape": list(qw.shape), "error": qw.error}
        tensors.update({PREFIX + k: v for k, v in layer_tensors(name, qw).items()})
    manifest = {"format": FORMAT, "version": 1, "model": type(model).__name__, "layers": layers}
    with atomic_dir(out) as tmp:
        save_file(dict(sorted(tensors.items())), str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def load_module(model: nn.Module, path: str | Path, kernel: str | None = None) -> tuple[nn.Module, dict]:
    """(model, records): `model`, a fresh float instance of the saved architecture, with the saved
    tensors and QuantLinear / QuantConv2d layers in place."""
    from lowbit.module_pipeline import swap_layers

    path = Path(path)
    manifest = read_manifest(path, MANIFEST, FORMAT, "saved lowbit module")
    state = load_file(str(path / WEIGHTS))
    packed = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    rest = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    records = {}
    for name, info in manifest["layers"].items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise LowbitError(f"{path}: the saved model has a layer {name!r} this model lacks") from None
        want = "conv" if isinstance(mod, nn.Conv2d) else "linear" if isinstance(mod, nn.Linear) else None
        shape = tuple(info["shape"])
        if want != info["kind"] or tuple(weight_shape(mod)) != shape:
            raise LowbitError(f"{path}: layer {name} was a {info['kind']} of {shape}; here it is {mod}")
        records[name] = read_layer(packed, name, QuantSpec.from_dict(info["spec"]), shape, info["error"])
    model.eval()
    missing, unexpected = model.load_state_dict(rest, strict=False)
    quantized_weights = {f"{n}.weight" for n in records}
    missing = [k for k in missing if k not in quantized_weights]
    if missing or unexpected:
        raise LowbitError(f"{path}: the saved tensors do not fit this model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    swap_layers(model, records, kernel=kernel)
    return model, records


def weight_shape(mod: nn.Module) -> tuple[int, int]:
    return tuple(conv_weight_2d(mod).shape) if isinstance(mod, nn.Conv2d) else tuple(mod.weight.shape)
