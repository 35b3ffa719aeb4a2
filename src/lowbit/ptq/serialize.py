"""Save / load a converted model of any architecture: `ptq.json` (the plan and the BatchNorm folds)
+ `model.safetensors` (its whole state dict, int8 codes and scales included). Loading replays the
folds and swaps on a fresh float model of the same architecture, then loads the tensors strictly.
Hugging Face causal LMs are saved as lowbit checkpoints instead (`lowbit.ptq.llm`)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_dir, check_output_dir
from lowbit.io.tensor_file import write_safetensors
from lowbit.io.manifest import read_manifest
from lowbit.nn.int8_conv import Int8Conv2d
from lowbit.nn.int8_linear import Int8Linear
from lowbit.nn.replace import replace_linear
from lowbit.ptq.fold_bn import fold_batchnorm
from lowbit.spec import LayerScheme

FORMAT = "lowbit-ptq"
MANIFEST = "ptq.json"
WEIGHTS = "model.safetensors"


def save(model: nn.Module, out: str | Path, overwrite: bool = False) -> Path:
    info = getattr(model, "_lowbit_converted", None)
    if info is None:
        raise LowbitError(f"{type(model).__name__} is not a converted model; run lowbit.ptq.convert first")
    out = check_output_dir(out, overwrite)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    manifest = {"format": FORMAT, "version": 1, "model": type(model).__name__, **info}
    with atomic_dir(out) as tmp:
        write_safetensors(tmp / WEIGHTS, tensors, metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def empty_int8(mod: nn.Module, scheme: LayerScheme, name: str) -> nn.Module:
    if isinstance(mod, nn.Conv2d):
        return Int8Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                          scheme=scheme, bias=mod.bias is not None, name=name)
    if isinstance(mod, nn.Linear):
        return Int8Linear(mod.in_features, mod.out_features, scheme, bias=mod.bias is not None, name=name)
    raise LowbitError(f"{name}: the saved plan quantizes it, but in this model it is a {type(mod).__name__}")


def load(model: nn.Module, path: str | Path) -> nn.Module:
    """`model`: a fresh float instance of the saved model's architecture (its weights are replaced)."""
    path = Path(path)
    manifest = read_manifest(path, MANIFEST, FORMAT, "saved lowbit PTQ model")
    model.eval()
    fold_batchnorm(model, [tuple(p) for p in manifest["folded"]])
    for name, d in manifest["plan"].items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise LowbitError(f"{path}: the saved model has a module {name!r} this model lacks") from None
        s = LayerScheme.from_dict(d)
        replace_linear(model, name, empty_int8(mod, s, name))
    state = load_file(str(path / WEIGHTS))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LowbitError(f"{path}: the saved tensors do not fit this model ({' '.join(str(e).split())[:300]})") \
            from None
    model._lowbit_converted = {"plan": manifest["plan"], "folded": manifest["folded"]}
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m._derived = None
    return model
